"""``http`` endpoint: generic HTTP passthrough under ``path_prefix``.

Everything below the prefix goes to the pipeline as it came: method, sub-path,
query string byte for byte, headers and a streaming body: one larger than
256 KiB, or chunked, is handed on while it is still arriving.
"""

from harmony.endpoints.base import HttpEndpointBase


class HttpEndpoint(HttpEndpointBase):
    #: Large and chunked bodies go upstream as they arrive (harmony.web.streaming).
    stream_request_body = True
