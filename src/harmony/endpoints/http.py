"""``http`` endpoint: generic HTTP passthrough under ``path_prefix``.

Everything below the prefix goes to the pipeline as it came: method, sub-path,
query string byte for byte, headers and a streaming body.
"""

from harmony.endpoints.base import HttpEndpointBase


class HttpEndpoint(HttpEndpointBase):
    pass
