"""A DIMSE client that hangs up mid-operation is a client abort, never a failure of the PACS.

The HTTP side counts a client that leaves as nginx's 499 (``client_aborts``) and
keeps the upstream's record clean (tests/test_client_aborts.py).  Here the client
is a real DCMTK tool (findscu, getscu, movescu) killed while Harmony is still
waiting for the PACS; the PACS is a TCP port that accepts and never answers
(a hung PACS, which no real PACS can be made to be on demand).  Before the fix
the abandoned request ran on until the backend's ACSE timeout and was counted
as a failure of the target.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor

from tests.dimse_helpers import silent_peer
from tests.peers import DCMTK, peer_env, require
from tests.test_client_aborts import until
from tests.endpoints.test_dicom_scp_peers import SCP_AET, start

TOOLS = {
    "findscu": ["-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID"],
    "getscu": ["-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=1.2.3.4"],
    "movescu": ["-S", "-aem", "STORESCP", "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=1.2.3.4"],
}


class _Exited(protocol.ProcessProtocol):
    def __init__(self):
        self.exited = defer.Deferred()

    def processEnded(self, reason):
        self.exited.callback(reason.value.exitCode)


@pytest.mark.parametrize("tool", sorted(TOOLS))
@pytest_twisted.ensureDeferred
async def test_a_dimse_client_hanging_up_is_a_client_abort(tmp_path, tool):
    silent = silent_peer()
    # A long ACSE timeout: what ends the attempt must be the client leaving, not the timer.
    running, scp_port = await start(tmp_path, "SILENT", silent.getHost().port, acse=30)
    target = running.service.runtime.backends["pacs"].target_pool.targets[0]
    try:
        client = _Exited()
        tool_path = require(DCMTK[tool])
        process = reactor.spawnProcess(client, tool_path, [tool_path, *TOOLS[tool], "-aec", SCP_AET,
                                                           "127.0.0.1", str(scp_port)], env=peer_env())
        await until(lambda: target.in_flight == 1, "the request is waiting on the PACS")
        process.signalProcess("KILL")
        await client.exited
        await until(lambda: target.in_flight == 0, "the abandoned attempt is accounted", timeout=15)
        assert (target.client_aborts_total, target.failures_total, target.last_error) == (1, 0, None), \
            target.state(0)
        metrics = running.service.metrics.text().decode()
        assert 'harmony_target_client_aborts_total{backend="pacs",target="pacs"} 1.0' in metrics, metrics
    finally:
        await running.stop()
        await silent.stopListening()
