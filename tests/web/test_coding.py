"""harmony.web.coding in memory: decoding is bounded on decoded bytes, negotiation
follows RFC 9110 q-values, and response compression streams."""

from __future__ import annotations

import gzip
import json
import zlib

import pytest
from twisted.internet import task
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from harmony.envelope import BytesProducer, ResponseEnvelope, read_body
from harmony.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from harmony.web import coding

DOC = json.dumps([{"0020000D": {"vr": "UI", "Value": [f"1.2.3.{i}"]}, "00100010": {"vr": "PN"}}
                  for i in range(200)]).encode()


def deflate_raw(data):
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


@pytest.mark.parametrize("encoded,name", [
    (gzip.compress(DOC), "gzip"),
    (zlib.compress(DOC), "deflate"),          # RFC 9110's deflate: zlib-wrapped
    (deflate_raw(DOC), "deflate"),            # what some servers send instead
    (gzip.compress(DOC[:1000]) + gzip.compress(DOC[1000:]), "gzip"),  # two members
])
def test_decodes_whole_and_in_any_chunking(encoded, name):
    assert coding.decode_bytes(encoded, name, len(DOC)) == DOC
    decoder = coding.Decoder(name, len(DOC))
    out = []
    for i in range(0, len(encoded), 7):
        out += decoder.decode(encoded[i:i + 7])
    out += decoder.finish()
    assert b"".join(out) == DOC


def test_bomb_hits_the_cap_on_decoded_bytes_without_inflating_it_all():
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024))  # ~64 KB on the wire
    assert len(bomb) < 100_000
    decoder = coding.Decoder("gzip", 1024 * 1024)
    with pytest.raises(PayloadTooLarge):
        decoder.decode(bomb)
    assert decoder.decoded <= 1024 * 1024 + coding.PIECE


@pytest.mark.parametrize("data", [b"not gzip at all", gzip.compress(DOC)[:-20]])
def test_corrupt_or_truncated_is_a_coding_error(data):
    with pytest.raises(coding.CodingError):
        coding.decode_bytes(data, "gzip")


@pytest.mark.parametrize("value,expected", [
    (None, ""), ("identity", ""), ("GZIP", "gzip"), ("x-gzip", "gzip"), ("deflate", "deflate"),
])
def test_content_coding(value, expected):
    h = Headers({"Content-Encoding": [value]} if value else {})
    assert coding.content_coding(h) == expected


@pytest.mark.parametrize("value", ["br", "gzip, gzip", "zstd"])
def test_unknown_or_stacked_codings_are_refused(value):
    with pytest.raises(coding.UnsupportedCoding):
        coding.content_coding(Headers({"Content-Encoding": [value]}))


def test_decode_request_refuses_unknown_codings_with_415():
    from harmony.envelope import RequestEnvelope
    req = RequestEnvelope(headers=Headers({"Content-Encoding": ["br"]}), body=b"x")
    with pytest.raises(UnsupportedMediaType):
        coding.decode_request(req)


def test_decode_request_streams_a_producer_and_drops_the_coding_headers():
    from harmony.envelope import RequestEnvelope
    body = gzip.compress(DOC)
    req = RequestEnvelope(headers=Headers({"Content-Encoding": ["gzip"], "Content-Length": [str(len(body))]}),
                          body=BytesProducer(body))
    coding.decode_request(req, len(DOC))
    assert not req.headers.hasHeader("content-encoding") and not req.headers.hasHeader("content-length")
    got = []
    read_body(req.body, None).addCallback(got.append)
    assert got == [DOC]


def test_a_producer_bomb_fails_with_413_and_stops_its_source():
    from harmony.envelope import RequestEnvelope
    inner = BytesProducer(gzip.compress(b"\0" * (8 * 1024 * 1024)))
    req = RequestEnvelope(headers=Headers({"Content-Encoding": ["gzip"]}), body=inner)
    coding.decode_request(req, 100_000)
    failures = []
    read_body(req.body, None).addErrback(failures.append)
    assert failures and failures[0].check(PayloadTooLarge)


def test_corrupt_request_bytes_are_400():
    from harmony.envelope import RequestEnvelope
    req = RequestEnvelope(headers=Headers({"Content-Encoding": ["gzip"]}), body=b"plain")
    with pytest.raises(BadRequest):
        coding.decode_request(req)


@pytest.mark.parametrize("value,gzip_ok,identity_refused", [
    (None, False, False),
    ("", False, False),
    ("gzip", True, False),
    ("gzip, deflate, br", True, False),
    ("gzip;q=0", False, False),
    ("deflate", False, False),
    ("*", True, False),
    ("*;q=0.5, identity", False, False),   # identity preferred
    ("br, *;q=0", False, True),
    ("gzip;q=0.5, identity;q=0", True, True),
    ("gzip;q=0.2, identity;q=0.8", False, False),
    ("GZIP;Q=1.0", True, False),
    ("x-gzip", True, False),
    ("gzip;q=abc", False, False),
])
def test_accept_encoding(value, gzip_ok, identity_refused):
    assert coding.wants_gzip(value) == (gzip_ok, identity_refused)


@pytest.mark.parametrize("ctype,yes", [
    ("application/dicom+json", True), ("application/fhir+json; charset=utf-8", True),
    ("application/problem+json", True), ("text/html", True), ("application/fhir+xml", True),
    ('multipart/related; type="application/dicom+json"; boundary=x', True),
    ('multipart/related; type="application/dicom"; boundary=x', False),
    ("application/dicom", False), ("image/jpeg", False), ("application/zip", False),
    ("application/octet-stream", False), (None, False),
])
def test_compressible_types(ctype, yes):
    assert coding.compressible(ctype) is yes


def _response(body, ctype="application/dicom+json", **headers):
    h = Headers({"Content-Type": [ctype]})
    for k, v in headers.items():
        h.setRawHeaders(k.replace("_", "-"), [v])
    return ResponseEnvelope(200, h, body)


def test_bytes_body_is_gzipped_with_vary_and_a_weak_etag():
    r = coding.compress_response(b"gzip", b"GET", _response(DOC, ETag='"abc"', Content_Length=str(len(DOC))))
    assert r.header("content-encoding") == "gzip"
    assert r.header("vary") == "Accept-Encoding"
    assert r.header("etag") == 'W/"abc"'
    assert not r.headers.hasHeader("content-length")
    assert gzip.decompress(r.body) == DOC
    assert len(r.body) * 5 < len(DOC)


def test_vary_is_kept_and_extended_and_identity_answers_still_vary():
    r = coding.compress_response(None, b"GET", _response(DOC, Vary="Origin"))
    assert r.body == DOC and r.header("vary") == "Origin, Accept-Encoding"


@pytest.mark.parametrize("kwargs", [
    {"ctype": "application/dicom"},
    {"Content_Encoding": "gzip"},
    {"Content_Range": "bytes 0-9/100"},
])
def test_not_compressed(kwargs):
    ctype = kwargs.pop("ctype", "application/dicom+json")
    r = coding.compress_response("gzip", "GET", _response(DOC, ctype, **kwargs))
    assert r.body == DOC


def test_small_bodies_only_when_identity_is_refused():
    assert coding.compress_response("gzip", "GET", _response(b"[]")).body == b"[]"
    r = coding.compress_response("gzip, identity;q=0", "GET", _response(b"[]"))
    assert gzip.decompress(r.body) == b"[]"


def test_head_and_passthrough_are_left_alone():
    assert coding.compress_response("gzip", "HEAD", _response(DOC)).body == DOC

    class Upstream(BytesProducer):
        passthrough = True
    body = Upstream(DOC)
    assert coding.compress_response("gzip", "GET", _response(body)).body is body


class _Manual(BytesProducer):
    """A producer the test drives: it writes what the test says, when it says."""

    def __init__(self):
        super().__init__(b"")
        self.length = UNKNOWN_LENGTH

    def startProducing(self, consumer):
        from twisted.internet import defer
        self.consumer, self.done = consumer, defer.Deferred()
        return self.done


class _Sink:
    def __init__(self):
        self.chunks = []

    def write(self, data):
        self.chunks.append(data)

    def registerProducer(self, p, s):
        pass

    def unregisterProducer(self):
        pass


def test_stream_is_compressed_as_it_arrives_and_flushed_once_per_reactor_turn():
    clock = task.Clock()
    source = _Manual()
    body = coding.GzipBody(source, clock=clock)
    sink = _Sink()
    done = body.startProducing(sink)
    matches = [b'{"a":' + b'"x"' * 300 + b"}," for _ in range(20)]
    for m in matches:       # one turn: twenty writes...
        source.consumer.write(m)
    assert len(clock.getDelayedCalls()) == 1  # ...one flush pending
    clock.advance(0)
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    seen = len(b"".join(sink.chunks))
    # Everything written so far is readable before the stream ends (a slow PACS
    # never holds matches back in the compressor).
    assert inflater.decompress(b"".join(sink.chunks)) == b"".join(matches)
    source.consumer.write(b"last")
    source.done.callback(None)
    assert done.called and not clock.getDelayedCalls()
    assert inflater.decompress(b"".join(sink.chunks)[seen:]) == b"last" and inflater.eof
    assert body.raw_bytes == len(b"".join(matches)) + 4


def test_stopped_stream_cancels_its_pending_flush():
    clock = task.Clock()
    source = _Manual()
    body = coding.GzipBody(source, clock=clock)
    body.startProducing(_Sink())
    source.consumer.write(DOC)
    body.stopProducing()
    assert not clock.getDelayedCalls()


def _request(peer="127.0.0.1", **headers):
    from twisted.internet.address import IPv4Address
    from twisted.web.test.requesthelper import DummyRequest
    req = DummyRequest([b""])
    req.client = IPv4Address("TCP", peer, 40000)
    for k, v in headers.items():
        req.requestHeaders.setRawHeaders(k.replace("_", "-"), [v])
    return req


@pytest.mark.parametrize("peer,headers,gzipped", [
    ("203.0.113.9", {"Accept_Encoding": "gzip"}, True),          # a remote client
    ("127.0.0.1", {"Accept_Encoding": "gzip"}, False),           # loopback: gzip only costs
    ("127.0.0.1", {"Accept_Encoding": "gzip", "X_Forwarded_For": "198.51.100.7"}, True),  # relayed
    ("127.0.0.1", {"Accept_Encoding": "gzip", "Forwarded": "for=198.51.100.7"}, True),
    ("127.0.0.1", {"Accept_Encoding": "gzip, identity;q=0"}, True),  # identity refused: honoured
    ("203.0.113.9", {}, False),
])
def test_compress_for_adapts_to_the_link(peer, headers, gzipped):
    r = coding.compress_for(_request(peer, **headers), _response(DOC))
    assert (r.header("content-encoding") == "gzip") is gzipped
    assert r.header("vary") == "Accept-Encoding"


def test_small_known_bodies_get_the_better_level_large_ones_the_fast_one():
    def gz(data, level):
        c = zlib.compressobj(level, zlib.DEFLATED, 31)
        return c.compress(data) + c.flush()
    big_doc = DOC * 40
    assert len(DOC) <= coding.SMALL_BYTES < len(big_doc)
    assert coding.compress_response("gzip", "GET", _response(DOC)).body == gz(DOC, coding.SMALL_LEVEL)
    assert coding.compress_response("gzip", "GET", _response(big_doc)).body == gz(big_doc, coding.LEVEL)


@pytest.mark.parametrize("peer,headers,weak", [
    ("203.0.113.9", {"Accept_Encoding": "gzip"}, True),
    ("127.0.0.1", {"Accept_Encoding": "gzip"}, False),   # its 200 went out plain, strong ETag
    ("203.0.113.9", {}, False),
])
def test_a_304_carries_the_etag_its_200_would_have(peer, headers, weak):
    r = ResponseEnvelope(304, Headers({"ETag": ['"abc"']}), b"")
    r = coding.compress_for(_request(peer, **headers), r)
    assert r.header("etag") == ('W/"abc"' if weak else '"abc"')
