"""``passthru``: changes nothing.  Useful as a placeholder in a pipeline."""

from harmony.middleware.base import Middleware


class Passthru(Middleware):
    pass
