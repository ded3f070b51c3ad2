"""A self-listening endpoint type for tests (``transport = "line"``): a TCP
listener whose connections stay open, like DIMSE associations.  Each line a
client sends goes through the endpoint's *current* pipeline, and the answer is
the response body on one line.  It lets the reload tests show that an open
connection on an unchanged listener survives a reload and is served by the new
pipeline, and gives the metrics an ``open_associations`` to report."""

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer, provider

from harmony.envelope import RequestEnvelope, read_body
from harmony.interfaces import IComponentFactory, IEndpoint
from harmony.web.problem import problem_response


class _Line(LineReceiver):
    delimiter = b"\n"

    def connectionMade(self):
        self.factory.endpoint.open_associations += 1

    def connectionLost(self, reason):
        self.factory.endpoint.open_associations -= 1

    def lineReceived(self, line):
        ep = self.factory.endpoint
        env = RequestEnvelope(method="GET", path="/" + line.decode(), subpath="/" + line.decode(),
                              metadata={"protocol": "line", "endpoint": ep.name, "request_id": "r"})
        d = ep.pipeline.handle(env, ep)
        d.addCallback(lambda response: read_body(response.body, 1 << 20))
        d.addCallback(self.sendLine)


@implementer(IEndpoint)
@provider(IComponentFactory)
class LineEndpoint(Service):
    transport = "line"

    def __init__(self, name, listen):
        self.name = name  # also the Service's name: config names are unique per kind
        self.listen_description = listen
        self.pipeline = None
        self.open_associations = 0
        self.port = None
        self.listening = None

    @classmethod
    def from_config(cls, name, options, ctx):
        return cls(name, options.str("listen"))

    def startService(self):
        super().startService()
        from twisted.internet import reactor
        from twisted.internet.protocol import Factory

        factory = Factory.forProtocol(_Line)
        factory.endpoint = self
        factory.noisy = False
        self.listening = serverFromString(reactor, self.listen_description).listen(factory)
        self.listening.addCallback(lambda port: setattr(self, "port", port) or port)

    def stopService(self):
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return defer.maybeDeferred(port.stopListening)

    def pre_process(self, request):
        return request

    def post_process(self, request, response):
        return response

    def error_response(self, error, request):
        return problem_response(error, request.request_id)
