"""Which process holds each node id of a cluster (``[storage.options] node``).

Why: a node's id names its queue leases and its pending S3 uploads.  Two
processes running under one id would renew each other's leases and finish
each other's uploads - silently breaking "a dead node's work moves to the
others".  So a node registers its id in the shared database when its store
opens (host, pid, a token made once per process group, a heartbeat) and
refuses to start while another live process holds it.

"Live" is judged from what can be known: the holder's heartbeat is younger
than :data:`STALE_SECONDS`, and, when the holder ran on this host, its pid
still exists and is not ours.  A node restarted after kill -9 on the same host
(its old pid gone, or a container's pid 1 reused) takes its id back at once;
one restarted on another host waits for the old heartbeat to go stale.

The default id (no ``node`` configured) is the host name plus a short digest
of the store folder: unique per host and folder, and the same again after a
restart, so a restarted node finds its own pending uploads.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import uuid

from harmony.dicom.files import process_alive
from harmony.log import get_logger
from harmony.storage.database import POSTGRESQL, dialect
from harmony.storage.errors import StorageFailure

log = get_logger("harmony.storage.nodes")

SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
  node TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL, boot TEXT NOT NULL,
  started_at REAL NOT NULL, heartbeat_at REAL NOT NULL);
"""
PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
  node TEXT PRIMARY KEY, host TEXT NOT NULL, pid BIGINT NOT NULL, boot TEXT NOT NULL,
  started_at DOUBLE PRECISION NOT NULL, heartbeat_at DOUBLE PRECISION NOT NULL);
"""
#: Seconds between heartbeats of a registered node.
HEARTBEAT_SECONDS = 5.0
#: A holder whose heartbeat is older than this is gone.
STALE_SECONDS = 3 * HEARTBEAT_SECONDS
#: Environment variable carrying the process group's token to worker processes.
BOOT_ENV = "HARMONY_NODE_BOOT"

_boot: str | None = None


class NodeIdInUse(StorageFailure):
    """Another live process holds this node id: a configuration error."""

    status, title, code = 500, "Storage Failure", "node-id-in-use"


def new_process_group() -> str:
    """Start a new token for this process and the workers it spawns (twistd's main process)."""
    global _boot
    _boot = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    os.environ[BOOT_ENV] = _boot
    return _boot


def boot_token() -> str:
    """This process group's token: inherited by workers, else made once per process."""
    global _boot
    if _boot is None:
        _boot = os.environ.get(BOOT_ENV) or f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    return _boot


def default_node(root) -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "node"
    return f"{host}-{hashlib.sha256(str(root).encode()).hexdigest()[:8]}"


def _pid_alive(pid: int) -> bool:
    # Our own pid: a previous process that had it (a container's pid 1), so gone.
    return pid != os.getpid() and process_alive(pid)


def claim(conn, node: str, now: float, token: str | None = None, host: str | None = None) -> None:
    """Register *node* for this process group (in the caller's transaction), or
    raise :class:`NodeIdInUse` naming the live holder."""
    token = token or boot_token()
    host = host or socket.gethostname()
    pid = int(token.split("-", 1)[0])
    if dialect(conn) == POSTGRESQL:
        # Two nodes starting together under one id: one waits for the other's claim.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (f"harmony-node:{node}",))
    row = conn.execute("SELECT host, pid, boot, heartbeat_at FROM nodes WHERE node=?", (node,)).fetchone()
    if row is not None and row[2] != token:
        other_host, other_pid, _, beat = row
        fresh = now - beat < STALE_SECONDS
        gone_here = other_host == host and not _pid_alive(int(other_pid))
        if fresh and not gone_here:
            raise NodeIdInUse(
                f"node id {node!r} is in use by pid {other_pid} on host {other_host} (heartbeat "
                f"{max(0.0, now - beat):.0f} s ago): give each node its own [storage.options] node, or wait "
                f"{STALE_SECONDS:.0f} s after the other process stopped")
    conn.execute("INSERT INTO nodes(node, host, pid, boot, started_at, heartbeat_at) VALUES(?,?,?,?,?,?) "
                 "ON CONFLICT(node) DO UPDATE SET host=excluded.host, pid=excluded.pid, boot=excluded.boot, "
                 "started_at=excluded.started_at, heartbeat_at=excluded.heartbeat_at",
                 (node, host, pid, token, now, now))


def heartbeat(conn, node: str, now: float, token: str | None = None) -> bool:
    """Renew the claim; False if another process took the id over meanwhile."""
    cur = conn.execute("UPDATE nodes SET heartbeat_at=? WHERE node=? AND boot=?", (now, node, token or boot_token()))
    return cur.rowcount == 1


def holders(conn) -> list[dict]:
    """Every registered node (management: which nodes the cluster has, and their heartbeats)."""
    return [dict(zip(("node", "host", "pid", "started_at", "heartbeat_at"), r, strict=True)) for r in conn.execute(
        "SELECT node, host, pid, started_at, heartbeat_at FROM nodes ORDER BY node")]
