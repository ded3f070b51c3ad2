"""A minimal DIMSE backend for tests: answers every request with the C-ECHO
status of the target the pool chose.  It shows how a DIMSE backend adopts
harmony.targets in a few lines (see docs/targets.md) and lets the tests drive
failover between two real DIMSE peers (Orthanc and DCMTK dcmqrscp)."""

from twisted.internet import defer, reactor

from harmony.backends.base import Backend
from harmony.envelope import ResponseEnvelope
from harmony.errors import BackendUnavailable
from harmony.targets import TargetPool
from harmony.targets.dimse_health import EchoFailed, echo


class EchoScuBackend(Backend):
    def __init__(self, name, pool):
        super().__init__(name)
        self.target_pool = pool

    @classmethod
    def from_config(cls, name, options, ctx):
        return cls(name, TargetPool.from_options(name, options, ctx, kind="dimse"))

    def send(self, request):
        request.metadata.setdefault("dimse_op", "C-ECHO")
        return self.target_pool.call(request, self.echo_to)

    def echo_to(self, target):
        def failed(f):
            f.trap(EchoFailed)
            raise BackendUnavailable(f"C-ECHO to {target.name} failed: {f.getErrorMessage()}")

        d = defer.ensureDeferred(echo(reactor, target.host, target.port, target.aet, "HARMONY", 5))
        return d.addCallbacks(lambda status: ResponseEnvelope.json(200, {"target": target.name, "status": status}),
                              failed)

    def close(self):
        return self.target_pool.stop()
