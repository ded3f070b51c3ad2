"""The management API's own listener (when not mounted on a network).

While it runs it also samples the traffic counters every few seconds
(harmony.management.traffic), so the console's Traffic page opens on the
last ten minutes rather than on an empty chart; that costs a read of three
metric families per sample.
"""

from __future__ import annotations

from twisted.internet import task

from harmony.log import get_logger
from harmony.management.api import AdminApi, AdminResource
from harmony.service import NetworkService

log = get_logger("harmony.management")

TRAFFIC_SAMPLE_SECONDS = 5.0


class ManagementService(NetworkService):
    """A NetworkService whose site serves only the management API."""

    def __init__(self, harmony_service, description: str, reactor):
        self.api = AdminApi(harmony_service)
        super().__init__("management", description, AdminResource(self.api), reactor)
        self.setName("management")
        self._sampler = None

    def startService(self):
        result = super().startService()
        service, traffic = self.api.service, self.api.state.traffic
        self._sampler = task.LoopingCall(lambda: traffic.record(service.metrics))
        self._sampler.clock = self.reactor
        self._sampler.start(TRAFFIC_SAMPLE_SECONDS, now=True).addErrback(
            lambda f: log.failure("traffic sampling stopped", f))
        return result

    def stopService(self):
        if self._sampler is not None and self._sampler.running:
            self._sampler.stop()
        self._sampler = None
        return super().stopService()
