"""Between twisted.web requests and envelopes: in, out, and the access log."""

from __future__ import annotations

import re
import time

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer

from harmony import jsonutil
from harmony.compat.twisted import flush_buffered, header_name_encoder
from harmony.envelope import RequestEnvelope, ResponseEnvelope, body_length, is_json_type, new_request_id, parse_query
from harmony.log import enabled, get_logger
from harmony.web import coding
from harmony.web.headers import HOP_BY_HOP, connection_listed, copy_headers
from harmony.web.streaming import INLINE_BODY_LIMIT

log = get_logger("harmony.access")
errlog = get_logger("harmony.web")


def access_log_enabled() -> bool:
    return enabled("harmony.access", "info")

_NOT_COPIED = HOP_BY_HOP | {b"content-length"}
_REQUEST_ID_OK = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")


def _text(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def request_body(request):
    stream = getattr(request, "body_stream", None)
    if stream is not None:
        return stream  # arriving as we go (harmony.web.streaming)
    content = request.content
    if content is None:
        return b""
    content.seek(0, 2)
    size = content.tell()
    content.seek(0, 0)
    if size == 0:
        return b""
    if size <= INLINE_BODY_LIMIT:
        return content.read()
    return FileBodyProducer(content)


def request_id_for(request) -> str:
    """The request's id: the client's ``X-Request-ID`` when it is sane, else a new
    one; decided once per request, so every answer and log line agrees."""
    rid = getattr(request, "_harmony_request_id", None)
    if rid is None:
        headers = request.requestHeaders
        raw = getattr(headers, "_rawHeaders", None)  # keyed as Headers spells names: no encoding a request
        values = raw.get(_X_REQUEST_ID) if raw is not None else headers.getRawHeaders(b"x-request-id")
        incoming = values[0] if values else None
        rid = _text(incoming) if incoming and _REQUEST_ID_OK.match(incoming) else new_request_id()
        request._harmony_request_id = rid
    return rid


_X_REQUEST_ID = header_name_encoder().encode(b"x-request-id")


def envelope_from_request(request, prefix: str, endpoint_name: str, protocol: str = "http") -> RequestEnvelope:
    uri = request.uri
    raw_path, _, raw_query = uri.partition(b"?")
    path = _text(raw_path)
    if prefix == "/":
        subpath = path
    else:
        subpath = path[len(prefix):]
    request_id = request_id_for(request)
    headers = copy_headers(request.requestHeaders)
    body = request_body(request)
    env = RequestEnvelope(
        method=_text(request.method), path=path, subpath=subpath,
        raw_query=raw_query, headers=headers, body=body,
        metadata={"protocol": protocol, "request_id": request_id, "endpoint": endpoint_name},
        client_ip=getattr(request.getClientAddress(), "host", ""),
        scheme="https" if request.isSecure() else "http",
        host=_text(request.getHeader(b"host") or b""),
    )
    env.query = parse_query(raw_query) if raw_query else []
    if isinstance(body, bytes) and body and is_json_type(env.header("content-type")) \
            and not env.headers.hasHeader(b"content-encoding"):  # coded bodies: json_extractor decodes
        try:
            env.normalized = jsonutil.loads(body)
        except ValueError:
            env.normalized = None  # json_extractor(strict) decides whether that is an error
    return env


def stop_producing(_reason, body) -> None:
    """Errback for a request's ``notifyFinish``: its client left, so its body stops."""
    try:
        body.stopProducing()
    except Exception:  # noqa: BLE001 - a producer that already finished may complain
        pass


def send_response(request, response: ResponseEnvelope) -> None:
    """:func:`write_response` for a caller that does not wait for the write (an
    endpoint's answer): on the fast channel, an answer written at once makes no Deferred."""
    own = getattr(request, "send_response", None)
    if own is not None:
        own(response)
    else:
        write_response(request, response)


def write_response(request, response: ResponseEnvelope) -> defer.Deferred:
    """Write *response* to a twisted.web request, streaming producer bodies with
    flow control; fires when the response is finished (or the client left).
    A request that writes its own answers (harmony.web.fast_channel) does so."""
    own = getattr(request, "write_response", None)
    if own is not None:
        return own(response)
    if getattr(request, "_disconnected", False) or request.finished:
        return defer.succeed(None)
    response = coding.compress_for(request, response)  # gzip for clients that ask (harmony.web.coding)
    request.setResponseCode(response.status, response.reason)
    skip = _NOT_COPIED
    if response.headers.hasHeader(b"connection"):
        skip = skip | connection_listed(response.headers)  # RFC 9110 7.6.1: hop-by-hop too
    out = copy_headers(response.headers, skip)
    for name, values in request.responseHeaders.getAllRawHeaders():
        if not out.hasHeader(name):  # e.g. Connection: close, set by twisted.web
            out.setRawHeaders(name, values)
    request.responseHeaders = out
    rid = getattr(request, "_harmony_request_id", None)
    if rid and not request.responseHeaders.hasHeader(b"x-request-id"):
        request.responseHeaders.setRawHeaders(b"x-request-id", [rid.encode()])
    body = response.body
    length = body_length(body)
    if request.method == b"HEAD" or response.status == 304:
        # No body follows: the Content-Length given (by an upstream) describes
        # the representation, and passes through as it is.
        given = response.headers.getRawHeaders(b"content-length")
        if given:
            request.responseHeaders.setRawHeaders(b"content-length", given[:1])
        elif request.method == b"HEAD" and length:
            # A local HEAD answer carries a body object that knows the length
            # it stands for (and sends nothing).
            request.responseHeaders.setRawHeaders(b"content-length", [str(length).encode()])
    elif length is not None and response.status != 204 and not 100 <= response.status < 200:
        request.responseHeaders.setRawHeaders(b"content-length", [str(length).encode()])
    if body is None or isinstance(body, (bytes, bytearray)):
        transport = getattr(getattr(request, "channel", None), "transport", None)  # finish() drops .channel
        if body:
            request.write(bytes(body))
        request.finish()
        if transport is not None:
            # On the wire now, not at the reactor's next turn: the client waits on it, and
            # what this turn still runs (the pipeline's observers, logging) need not delay it.
            flush_buffered(transport)
        return defer.succeed(None)
    # A producer: let the transport pause it when the client reads slowly.
    done: defer.Deferred[None] = defer.Deferred()
    request.registerProducer(body, True)

    request.notifyFinish().addErrback(stop_producing, body)

    def finished(result):
        if request.channel is not None:  # None once the client has gone
            request.unregisterProducer()
        if getattr(request, "_disconnected", False):
            done.callback(None)  # we stopped the stream ourselves (client_gone)
            return None
        if isinstance(result, Failure):
            # Headers are gone already; the only honest signal left is to cut
            # the connection so the client sees a truncated body, not a whole one.
            errlog.warn("response body stream failed (request {request_id}): {error}",
                        request_id=rid, error=result.getErrorMessage())
            if request.channel is not None and request.channel.transport is not None:
                request.channel.transport.abortConnection()
            done.callback(None)
            return None
        if not request.finished and not getattr(request, "_disconnected", False):
            request.finish()
        done.callback(None)
        return None

    body.startProducing(request).addBoth(finished)
    return done


def log_access(request, endpoint_name: str, started: float):
    if not access_log_enabled():
        return

    def _log(_):
        log.info("{method} {path} {status} {bytes}B {duration_ms}ms id={request_id}",
                 method=_text(request.method), path=_text(request.path),
                 status=request.code, bytes=request.sentLength,
                 duration_ms=round((time.monotonic() - started) * 1000, 1),
                 request_id=getattr(request, "_harmony_request_id", ""), endpoint=endpoint_name)
    request.notifyFinish().addBoth(_log)
