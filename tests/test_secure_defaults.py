"""Security defaults a platform engineer relies on without reading every page:
listeners are on loopback unless the configuration says otherwise."""

import pytest_twisted

from tests.harness import MINIMAL_MAIN, start_harmony, write_config
from tests.peers import free_port

SCP = """
[pipelines.dimse]
endpoints = ["scp"]
backends = ["b"]
[endpoints.scp]
service = "dicom_scp"
[endpoints.scp.options]
local_aet = "HARMONY"
port = {port}
enable_store = true
[backends.b]
service = "echo"
"""


@pytest_twisted.ensureDeferred
async def test_dicom_scp_listens_on_loopback_unless_told(tmp_path):
    port = free_port()
    running = await start_harmony(write_config(tmp_path, MINIMAL_MAIN, {"scp": SCP.format(port=port)}))
    try:
        scp = running.service.runtime.endpoints["scp"]
        assert scp.server.server_address == ("127.0.0.1", port)
    finally:
        await running.stop()
