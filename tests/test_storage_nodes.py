"""Node ids of a cluster (harmony.storage.nodes): a safe default, and one id per live process.

Real PostgreSQL.  The default id differs per folder on one host and stays the
same for one folder; a second live process under a taken id is refused (in
process, and as a real ``twistd`` node that must exit at start naming the
holder); a holder that is gone (its pid dead on this host, or its heartbeat
stale) gives the id back at once.
"""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from harmony.storage import nodes
from harmony.storage.database import PostgresDatabase
from harmony.storage.store import InstanceStore
from tests.peers import free_port
from tests.sf_helpers import HarmonyProcess, node_config


def test_default_node_id_is_per_folder_and_stable(tmp_path):
    a, b = InstanceStore(tmp_path / "a", min_free_bytes=0), InstanceStore(tmp_path / "b", min_free_bytes=0)
    again = InstanceStore(tmp_path / "a", min_free_bytes=0)
    assert a.node != b.node
    assert a.node == again.node
    assert a.node.startswith(socket.gethostname()[:10])


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_live_holder_is_refused_a_gone_one_is_replaced(postgres, tmp_path):
    dsn = postgres.new_database()
    store = InstanceStore(tmp_path / "a", min_free_bytes=0, database=PostgresDatabase(dsn), node="n1")
    try:
        store.open_sync()  # claims n1 for this process
        held = store.read_sync(nodes.holders)
        assert [(h["node"], h["pid"]) for h in held] == [("n1", int(nodes.boot_token().split("-")[0]))]
        now = held[0]["heartbeat_at"]
        # Another process on another host, heartbeat fresh: refused, naming the holder.
        with pytest.raises(nodes.NodeIdInUse, match=r"'n1' is in use by pid \d+ on host"):
            store.write_sync(nodes.claim, "n1", now + 1, token="424242-other", host="elsewhere")
        # This host, but the holder's pid is gone (kill -9, restart): taken over at once.
        store.write_sync(lambda c: c.execute("UPDATE nodes SET pid=?, boot=? WHERE node='n1'",
                                             (dead_pid(), "1-gone")))
        store.write_sync(nodes.claim, "n1", now + 1, token="424242-other")
        # Another host, heartbeat stale: taken over.
        store.write_sync(nodes.claim, "n1", now + 2 + nodes.STALE_SECONDS, token="515151-third", host="elsewhere")
        # The first process's heartbeat now says it lost the id.
        assert store.write_sync(nodes.heartbeat, "n1", now + 3) is False
        assert store.write_sync(nodes.heartbeat, "n1", now + 3, token="515151-third") is True
    finally:
        store.close()


def test_twistd_node_with_a_taken_id_exits_at_start(postgres, tmp_path):
    dsn = postgres.new_database()
    holder = InstanceStore(tmp_path / "holder", min_free_bytes=0, database=PostgresDatabase(dsn), node="same")
    holder.open_sync()  # this pytest process holds "same", heartbeat fresh
    port = free_port()
    harmony = HarmonyProcess(tmp_path / "node", ports=[])
    harmony.folder.mkdir()
    harmony.config.write_text(node_config(port, node="same", path="store", dsn=dsn, targets={"pacs": free_port()}))
    env = {k: v for k, v in os.environ.items() if k != nodes.BOOT_ENV}
    try:
        proc = subprocess.run([harmony.twistd, "-n", "--pidfile=", "harmony", "-c", str(harmony.config)],
                              cwd=harmony.folder, env=env, capture_output=True, timeout=60)
        out = (proc.stdout + proc.stderr).decode(errors="replace")
        assert proc.returncode != 0, out
        assert "node id 'same' is in use by pid" in out, out
    finally:
        holder.close()
