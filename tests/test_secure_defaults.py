"""Listener defaults a platform engineer relies on without reading every page."""

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
async def test_dicom_scp_binds_all_interfaces_by_default_as_harmony_does(tmp_path):
    """Issue 4 and Harmony's own dicom_scp: bind_addr defaults to 0.0.0.0, so a
    config written for Harmony keeps reaching its modalities."""
    port = free_port()
    running = await start_harmony(write_config(tmp_path, MINIMAL_MAIN, {"scp": SCP.format(port=port)}))
    try:
        scp = running.service.runtime.endpoints["scp"]
        assert scp.bound_address == ("0.0.0.0", port)
    finally:
        await running.stop()
