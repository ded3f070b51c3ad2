"""The three pluggable roles of a pipeline.

A type implements one of these and offers ``from_config(name, options, ctx)``
(see :class:`IComponentFactory`); registering it in :mod:`harmony.registry` is
all it takes to make it usable from TOML.
"""

from zope.interface import Attribute, Interface


class IComponentFactory(Interface):
    """Provided by the *class* of every endpoint, backend and middleware type."""

    def from_config(name, options, ctx):
        """Build an instance from its TOML options.

        Raise :class:`harmony.config.errors.OptionError` (naming the key) for
        any bad option; the loader turns it into a problem naming file and key.
        """


class IEndpoint(Interface):
    """An entry point: turns a protocol request into a RequestEnvelope."""

    name = Attribute("Config name of this endpoint.")
    #: ``"http"`` for endpoints mounted on a network's web site; ``"dimse"``
    #: (or any other) for endpoints that listen on their own.
    transport = Attribute("'http' or the name of the protocol it listens for itself.")

    def pre_process(request):
        """Adjust the request before middleware sees it (may return a Deferred)."""

    def post_process(request, response):
        """Adjust the response after the right-hand middleware (may return a Deferred)."""

    def error_response(error, request):
        """Render a :class:`harmony.errors.HarmonyError` in this protocol's dialect."""


class IHttpEndpoint(IEndpoint):
    path_prefix = Attribute("Prefix the endpoint is mounted at, e.g. '/api'.")

    def render_http(request, route):
        """Serve one twisted.web request; returns NOT_DONE_YET or bytes."""


class IBackend(Interface):
    """An exit: sends a RequestEnvelope somewhere and answers a ResponseEnvelope."""

    name = Attribute("Config name of this backend.")

    def send(request):
        """Return a Deferred firing with a ResponseEnvelope."""


class IBatchBackend(IBackend):
    """A backend that files several C-STOREs as one group (the instances of
    one STOW-RS upload): one durable commit for the lot rather than one each.
    ``Pipeline.send_batch_after`` uses it when nothing sits between the fanning
    middleware and the backend (a middleware there sees each instance alone)."""

    def send_batch(requests):
        """Return a Deferred firing with one ResponseEnvelope or Failure per
        request, in order (a Failure is that request's alone)."""


class IMiddleware(Interface):
    """A step that runs on the way in (left) and/or on the way out (right)."""

    name = Attribute("Config name of this middleware.")

    def on_request(request):
        """Return the (possibly changed) request, or a ResponseEnvelope to answer
        at once without calling the backend; may return a Deferred of either."""

    def on_response(request, response):
        """Return the (possibly changed) response; may return a Deferred."""
