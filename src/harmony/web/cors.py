"""CORS for HTTP-family endpoints: a browser app from another origin may call them.

A viewer such as OHIF served from ``https://viewer.example`` and pointed at
Harmony's DICOMweb endpoint is another origin: the browser first sends a
preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``)
and then refuses to hand any answer to the page unless it carries
``Access-Control-Allow-Origin``.  This module is the policy an endpoint's
``[endpoints.X.options.cors]`` table configures, and it is off unless that
table exists:

* preflights are answered by the endpoint itself (204, or 403 for an origin
  not on the list), before the pipeline: authentication middleware must not
  see them (browsers never send credentials on a preflight);
* every answer to an allowed origin - the pipeline's, the upstream's, a
  proxy-made error - carries ``Access-Control-Allow-Origin`` (the origin
  echoed, with ``Vary: Origin``), the exposed headers and, when configured,
  ``Access-Control-Allow-Credentials``; the proxy owns CORS, so an upstream's
  own ``Access-Control-*`` headers are replaced, never doubled;
* ``*`` is never sent with credentials: asking for both is a configuration
  error (the Fetch standard forbids the combination).
"""

from __future__ import annotations

import re

import attr
from twisted.web.http_headers import Headers

from harmony.config.errors import OptionError
from harmony.config.options import Options
from harmony.envelope import ResponseEnvelope

#: Response headers a DICOMweb/FHIR/JMIX client script needs to read, beyond the
#: CORS-safelisted ones: where a created resource is (Location, Content-Location),
#: versions (ETag), downloads (Content-Disposition), paging (Link), QIDO's
#: Warning, back-off (Retry-After), auth challenges and the request id.
DEFAULT_EXPOSE = ("Content-Location", "Location", "ETag", "Content-Disposition", "Content-Length",
                  "Content-Type", "Last-Modified", "Link", "Retry-After", "Warning", "WWW-Authenticate",
                  "X-Request-ID")
#: Request headers a browser app may send (besides the safelisted ones).
DEFAULT_ALLOW_HEADERS = ("Accept", "Accept-Language", "Authorization", "Cache-Control", "Content-Type",
                         "If-Match", "If-Modified-Since", "If-None-Match", "Prefer", "X-Request-ID")
DEFAULT_MAX_AGE = 600
_ORIGIN = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]+$")


def _names(options: Options, key: str, default) -> tuple[str, ...]:
    value = options.raw.get(key, None)
    options.used.add(key)
    if value is None:
        return tuple(default)
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise OptionError(key, "must be a list of non-empty strings")
    return tuple(v.strip() for v in value)


@attr.s(auto_attribs=True, frozen=True)
class CorsPolicy:
    #: Allowed origins, lower-case (``scheme://host[:port]``); ``any_origin`` for ``*``.
    origins: frozenset = frozenset()
    any_origin: bool = False
    credentials: bool = False
    methods: tuple = ()
    #: ``("*",)``: allow whatever headers the preflight asks for.
    allow_headers: tuple = DEFAULT_ALLOW_HEADERS
    expose_headers: tuple = DEFAULT_EXPOSE
    max_age: int = DEFAULT_MAX_AGE

    @classmethod
    def from_options(cls, options: Options, methods: tuple, key: str = "cors") -> "CorsPolicy | None":
        """The endpoint's ``cors`` table as a policy, or None when there is none (CORS off).
        Errors name ``cors.<key>``."""
        raw = options.table(key, None)
        if raw is None:
            return None
        sub = Options(raw, options.base_dir)
        try:
            policy = cls._parse(sub, methods)
            unknown = sorted(set(sub.raw) - sub.used)
            if unknown:
                raise OptionError(unknown[0], "unknown option (known: allow_origins, allow_credentials, "
                                              "allow_methods, allow_headers, expose_headers, max_age_secs)")
        except OptionError as e:
            raise OptionError(f"{key}.{e.key}", e.message) from None
        return policy

    @classmethod
    def _parse(cls, sub: Options, methods: tuple) -> "CorsPolicy":
        origins = sub.raw.get("allow_origins")
        sub.used.add("allow_origins")
        if not isinstance(origins, list) or not origins or not all(isinstance(o, str) for o in origins):
            raise OptionError("allow_origins", 'is required: a list of origins such as "https://viewer.example" '
                                               '(or ["*"] for any origin, without credentials)')
        any_origin = "*" in origins
        for origin in origins:
            if origin != "*" and not _ORIGIN.match(origin):
                raise OptionError("allow_origins", f"{origin!r} is not an origin: scheme://host[:port], "
                                                   "no path and no trailing slash")
        credentials = sub.bool("allow_credentials", False)
        if credentials and any_origin:
            raise OptionError("allow_credentials", 'cannot be true when allow_origins has "*": browsers refuse '
                                                   "credentials with a wildcard origin; list the origins")
        allow_methods = tuple(m.upper() for m in _names(sub, "allow_methods", methods))
        allow_headers = _names(sub, "allow_headers", DEFAULT_ALLOW_HEADERS)
        expose = _names(sub, "expose_headers", DEFAULT_EXPOSE)
        max_age = sub.int("max_age_secs", DEFAULT_MAX_AGE, minimum=0, maximum=86400)
        return cls(origins=frozenset(o.lower() for o in origins if o != "*"), any_origin=any_origin,
                   credentials=credentials, methods=allow_methods, allow_headers=allow_headers,
                   expose_headers=expose, max_age=max_age)

    # ------------------------------------------------------------ requests

    def allows(self, origin: str) -> bool:
        return self.any_origin or origin.lower() in self.origins

    def _allow_origin_value(self, origin: str) -> bytes:
        if self.any_origin and not self.credentials and origin.lower() not in self.origins:
            return b"*"
        return origin.encode("latin-1")

    @staticmethod
    def origin_of(request) -> str | None:
        """The ``Origin`` of a twisted.web request (None when absent)."""
        value = request.requestHeaders.getRawHeaders(b"origin")
        return value[0].decode("latin-1") if value else None

    @staticmethod
    def is_preflight(request) -> bool:
        return (request.method == b"OPTIONS" and request.requestHeaders.hasHeader(b"origin")
                and request.requestHeaders.hasHeader(b"access-control-request-method"))

    def preflight(self, request) -> ResponseEnvelope | None:
        """The answer to a preflight: 204 with the allowed methods, headers and
        max age; None for an origin not on the list (the caller refuses it)."""
        origin = self.origin_of(request)
        if origin is None or not self.allows(origin):
            return None
        headers = Headers()
        headers.setRawHeaders(b"access-control-allow-origin", [self._allow_origin_value(origin)])
        headers.setRawHeaders(b"access-control-allow-methods", [", ".join(self.methods).encode()])
        if self.allow_headers == ("*",):
            asked = request.requestHeaders.getRawHeaders(b"access-control-request-headers", [])
            if asked:
                headers.setRawHeaders(b"access-control-allow-headers", [b", ".join(asked)])
        else:
            headers.setRawHeaders(b"access-control-allow-headers", [", ".join(self.allow_headers).encode()])
        headers.setRawHeaders(b"access-control-max-age", [str(self.max_age).encode()])
        if self.credentials:
            headers.setRawHeaders(b"access-control-allow-credentials", [b"true"])
        headers.setRawHeaders(b"vary", [b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"])
        return ResponseEnvelope(status=204, headers=headers, body=b"")

    def decorate(self, request, response: ResponseEnvelope) -> ResponseEnvelope:
        """Give *response* the CORS headers its request's origin is owed."""
        headers = response.headers
        for name, _ in list(headers.getAllRawHeaders()):
            if name.lower().startswith(b"access-control-"):
                headers.removeHeader(name)  # the proxy owns CORS here: never two Allow-Origins
        if not (self.any_origin and not self.credentials):
            # The answer depends on Origin: caches must keep one per origin.
            vary = [v.strip() for value in headers.getRawHeaders(b"vary", []) for v in value.split(b",") if v.strip()]
            if b"origin" not in {v.lower() for v in vary} and b"*" not in vary:
                headers.setRawHeaders(b"vary", [b", ".join(vary + [b"Origin"])])
        origin = self.origin_of(request)
        if origin is None or not self.allows(origin):
            return response
        headers.setRawHeaders(b"access-control-allow-origin", [self._allow_origin_value(origin)])
        if self.expose_headers:
            headers.setRawHeaders(b"access-control-expose-headers", [", ".join(self.expose_headers).encode()])
        if self.credentials:
            headers.setRawHeaders(b"access-control-allow-credentials", [b"true"])
        return response
