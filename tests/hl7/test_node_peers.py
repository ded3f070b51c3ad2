"""node-hl7-client -> Harmony (``mllp`` endpoint -> ``mllp`` backend) ->
node-hl7-server: another MLLP implementation on both sides, message by
message.  The npm packages are installed by scripts/test from
tests/hl7/node/package-lock.json (``npm ci``), never fetched here."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue

from tests.hl7.peers import adt, oru
from tests.hl7.test_mllp_relay import relay_config, running
from tests.peers import free_port

NODE_DIR = Path(__file__).resolve().parent / "node"
NODE = shutil.which("node")


@pytest.fixture
def node_receiver(tmp_path):
    assert NODE, "node is not installed (scripts/test installs it)"
    assert (NODE_DIR / "node_modules" / "node-hl7-server").is_dir(), \
        "run scripts/test (npm ci in tests/hl7/node) first"
    port, log = free_port(), tmp_path / "node-received.jsonl"
    log.write_text("")
    proc = subprocess.Popen([NODE, str(NODE_DIR / "receiver.mjs"), str(port), str(log)], cwd=NODE_DIR,
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("READY"), line
    proc.port, proc.log = port, log
    yield proc
    proc.terminate()
    proc.wait(10)
    proc.stdout.close()


@pytest_twisted.ensureDeferred
async def test_node_client_through_harmony_to_node_server(tmp_path, node_receiver):
    # node-hl7-server 2.5.0 answers a second message on a connection by handling
    # the first one again (it re-reads its whole buffer): one connection per message.
    h, ep = await running(relay_config(tmp_path, node_receiver.port, backend_opts="keep_connection_open = false"))
    messages = [adt("NODE-1"), adt("AR-NODE-2"), oru("NODE-3"), adt("NODE-4", "A08", family="Ñúñez")]
    feed = tmp_path / "feed.json"
    feed.write_text(json.dumps([m.decode() for m in messages]))
    try:
        out, err, code = await getProcessOutputAndValue(NODE, [str(NODE_DIR / "sender.mjs"), str(ep.bound_port),
                                                               str(feed)], path=str(NODE_DIR), reactor=reactor)
    finally:
        await h.stop()
    assert code == 0, err
    acks = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    assert [(a["control_id"], a["code"]) for a in acks] == [
        ("NODE-1", "AA"), ("AR-NODE-2", "AR"), ("NODE-3", "AA"), ("NODE-4", "AA")]
    received = [json.loads(line) for line in node_receiver.log.read_text().splitlines()]
    assert [r["control_id"] for r in received] == ["NODE-1", "AR-NODE-2", "NODE-3", "NODE-4"]
    # what node-hl7-server parsed is what node-hl7-client sent, through Harmony
    assert received[3]["text"].replace("\r", "\n").strip() == messages[3].decode().replace("\r", "\n").strip()
