"""A custom middleware type loaded through ``[middleware_types.*] module``."""

from harmony.middleware.base import Middleware


class Stamp(Middleware):
    def on_request(self, request):
        request.metadata["stamped"] = "yes"
        return request
