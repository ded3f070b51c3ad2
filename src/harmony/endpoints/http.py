"""``http`` endpoint: generic HTTP passthrough under ``path_prefix``.

Everything below the prefix goes to the pipeline as it came: method, sub-path,
query string byte for byte, headers and a streaming body: one larger than
256 KiB, or chunked, is handed on while it is still arriving.  ``max_body_bytes``
(no limit by default, like a plain reverse proxy) bounds it, refused with 413
on the declared length or cut as a chunked body passes it.
"""

from harmony.endpoints.base import HttpEndpointBase, check_prefix


class HttpEndpoint(HttpEndpointBase):
    #: Large and chunked bodies go upstream as they arrive (harmony.web.streaming).
    stream_request_body = True
    #: Complete bodyless requests are served by harmony.web.fast_channel (the hot path).
    fast_path = True

    @classmethod
    def from_config(cls, name, options, ctx):
        endpoint = cls(name, check_prefix(options.str("path_prefix", "/")))
        endpoint.max_body_bytes = options.int("max_body_bytes", None, minimum=1)
        return endpoint.take_shared_options(options)
