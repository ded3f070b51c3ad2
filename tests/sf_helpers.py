"""Helpers for the store-and-forward tests: a scripted DICOM-receiving HTTP target."""

from __future__ import annotations

import io
import json

from pydicom import dcmread
from twisted.web.resource import Resource

from tests.dicomweb_helpers import bridge_pipeline


class ScriptedTarget(Resource):
    """A real HTTP server that receives Part-10 bodies and answers as scripted.

    ``rules(sop_uid, times_seen)`` returns the status to answer; deliveries
    answered 2xx are recorded in ``stored`` (SOP UID -> count), every request
    in ``seen``.  This stands in for a target that refuses one instance
    permanently, which no real PACS here can be told to do.
    """

    isLeaf = True

    def __init__(self, rules=lambda sop, n: 200):
        super().__init__()
        self.rules = rules
        self.seen: list[str] = []
        self.stored: dict[str, int] = {}

    def render_POST(self, request):
        ds = dcmread(io.BytesIO(request.content.read()))
        sop = str(ds.SOPInstanceUID)
        n = self.seen.count(sop)
        self.seen.append(sop)
        status = self.rules(sop, n)
        request.setResponseCode(status)
        if 200 <= status < 300:
            self.stored[sop] = self.stored.get(sop, 0) + 1
            return b"{}"
        return f"refused {sop}".encode()


def ingest_config(target_url: str, *, port: int = 0, min_free_mb: float = 0, sf_options: str = "",
                  extra: str = "", log_level: str = "info") -> str:
    """Harmony TOML: HTTP Part-10 ingest at /ingest -> ``store_forward`` (backend
    ``sf``, store folder ``store``) -> the ``http`` backend ``orthanc`` posting to
    ``{target_url}/instances``.  *sf_options* adds lines to ``[backends.sf]``."""
    return f"""
[proxy]
id = "ingest-test"
log_level = "{log_level}"

[network.default.http]
bind_address = "127.0.0.1"
bind_port = {port}

[storage.options]
path = "store"
min_free_mb = {min_free_mb}

[endpoints.ingest]
service = "http"
path_prefix = "/ingest"

[backends.sf]
service = "store_forward"
forward_to = ["orthanc"]
{sf_options}

[backends.orthanc]
service = "http"
base_url = "{target_url}/instances"

[pipelines.ingest]
endpoints = ["ingest"]
backends = ["sf"]
{extra}
"""


def make_instances(folder, n: int, study: int, *, patient_id: str = "SF", series: int = 1, size: int = 16):
    """*n* small instances of one study under the test UID root, spread over *series* series."""
    from pathlib import Path

    from tests.dicom_data import UID_ROOT, make_instance, save
    out = []
    for i in range(1, n + 1):
        s = i % series + 1
        ds = make_instance(patient_id=patient_id, study_uid=f"{UID_ROOT}{study}.1",
                           series_uid=f"{UID_ROOT}{study}.1.{s}", sop_uid=f"{UID_ROOT}{study}.1.{s}.{i}",
                           instance_number=i, rows=size, cols=size, seed=i)
        out.append(save(ds, Path(folder) / f"{study}-{i:05d}.dcm"))
    return out


class HarmonyProcess:
    """``twistd -n harmony`` as a real process (for kill -9 tests and benchmarks)."""

    def __init__(self, folder, ports=(), reconfigure=None):
        import sys
        from pathlib import Path
        self.folder = Path(folder)
        self.config = self.folder / "harmony.toml"
        self.ports = list(ports)
        #: Called when another process took one of our "free" ports before the node
        #: listened (the node then exits): writes a config on new ports, returns them.
        self.reconfigure = reconfigure
        self.twistd = str(Path(sys.executable).with_name("twistd"))
        self.proc = None
        self.starts = 0

    def start(self):
        for attempt in range(3):
            try:
                return self._start_once()
            except RuntimeError:
                log = (self.folder / f"twistd-{self.starts}.log").read_text(errors="replace")
                if self.reconfigure is None or "CannotListenError" not in log or attempt == 2:
                    raise
                self.ports = list(self.reconfigure())

    def _start_once(self):
        import subprocess

        from tests.peers import peer_env, pid_listens, port_open, wait_for
        self.starts += 1
        log = open(self.folder / f"twistd-{self.starts}.log", "wb")
        self.proc = subprocess.Popen([self.twistd, "-n", "--pidfile=", "harmony", "-c", str(self.config)],
                                     stdout=log, stderr=subprocess.STDOUT, cwd=self.folder, env=peer_env())
        # Up means THIS process listens (and answers): an open port alone may be a stranger's
        # that took the "free" port first, or a previous process of ours not yet gone.
        pid = self.proc.pid
        for port in self.ports:
            wait_for(lambda port=port: pid_listens(pid, port) and port_open(port), 60,
                     f"harmony (twistd) pid {pid} listening on port {port}", self.proc)
        return self

    def kill(self, proc=None):
        """SIGKILL (the current process, or *proc* if given): no shutdown code runs."""
        import signal
        proc = proc if proc is not None else self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        if proc is not None:
            proc.wait(30)

    def stop(self):
        import subprocess
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class PortHold:
    """Keeps a loopback port taken but closed (bound, not listening): connections
    are refused, like a target that is down, and no other process on this busy
    machine can grab the port before the real target starts on it.  Port 0
    takes a free one at once (no window between picking it and holding it)."""

    def __init__(self, port: int = 0):
        import socket
        self.sock = socket.socket()
        # Shared with a peer's own hold of its ports until it starts (tests.peers.held_port).
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.port = self.sock.getsockname()[1]

    def release(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def sops_in(orthanc) -> list[str]:
    """SOP Instance UIDs Orthanc holds, one entry per stored instance (blocking)."""
    return [i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.rest("GET", "/instances?expand")]


def dimse_toml(scp_port: int, backend: str, pacs_aet: str, pacs_port: int, *, query: bool = False) -> str:
    """A ``dicom_scp`` endpoint ``scp`` (C-STORE; C-FIND/C-GET too with *query*)
    piped to *backend*, and a ``dicom_scu`` backend ``pacs``."""
    enable = "enable_find = true\nenable_get = true\n" if query else ""
    return f"""
[endpoints.scp]
service = "dicom_scp"
[endpoints.scp.options]
local_aet = "HARMONY"
bind_addr = "127.0.0.1"
port = {scp_port}
enable_store = true
{enable}
[pipelines.dimse]
endpoints = ["scp"]
backends = ["{backend}"]

[backends.pacs]
service = "dicom_scu"
[backends.pacs.options]
aet = "{pacs_aet}"
host = "127.0.0.1"
port = {pacs_port}
connect_timeout_secs = 2
"""


#: STOW-RS in front of the ``store_forward`` backend ``sf``: a ``dicomweb``
#: endpoint at /dicomweb -> ``dicomweb_bridge`` -> ``sf``.
STOW_PIPELINE = bridge_pipeline("stow", "sf")


def stow_forward_toml(targets: str, *, sf_options: str = "", min_free_mb: float = 0) -> str:
    """:data:`STOW_PIPELINE` with its store (folder ``store``) and the ``sf``
    backend forwarding to ``forward_to`` = *targets* (a TOML list); the target
    backends are added by the caller."""
    return f"""
[storage.options]
path = "store"
min_free_mb = {min_free_mb}

[backends.sf]
service = "store_forward"
[backends.sf.options]
forward_to = {targets}
{sf_options}
""" + STOW_PIPELINE


def node_config(port: int, *, node: str, path, targets: dict, dsn: str | None = None, storage: str = "",
                backend: str = "filesystem", sf_options: str = "", log_level: str = "info",
                backoff: tuple = (0.1, 0.5)) -> str:
    """Harmony TOML for one node of a cluster (tests/test_cluster.py, tests/storage/test_blobs.py, bench/scale):
    HTTP Part-10 ingest at /ingest -> ``store_forward`` ``sf`` -> an ``http`` backend per entry of
    *targets* (name -> port on 127.0.0.1, retried quickly), the store at *path*, on PostgreSQL when
    *dsn* is given.  *storage* adds lines to ``[storage.options]``, *sf_options* to ``[backends.sf]``;
    *backoff* is the retry delay's (initial, max) seconds."""
    index = f'[storage]\nbackend = "{backend}"\n' + ('index = "postgresql"\n' if dsn else "")
    shared = f'node = "{node}"\ndsn = "{dsn}"\n' if dsn else ""
    backends = "".join(f'\n[backends.{name}]\nservice = "http"\nbase_url = "http://127.0.0.1:{p}/"\n'
                       f'[backends.{name}.circuit]\nopen_secs = 0.2\n' for name, p in targets.items())
    return f"""
[proxy]
id = "node-{node}"
log_level = "{log_level}"

[network.default.http]
bind_address = "127.0.0.1"
bind_port = {port}

{index}[storage.options]
path = "{path}"
min_free_mb = 0
{shared}{storage}
[endpoints.ingest]
service = "http"
path_prefix = "/ingest"

[pipelines.ingest]
endpoints = ["ingest"]
backends = ["sf"]

[backends.sf]
service = "store_forward"
forward_to = {json.dumps(list(targets))}
backoff_initial_seconds = {backoff[0]}
backoff_max_seconds = {backoff[1]}
max_attempts = 1000000
poll_seconds = 0.2
{sf_options}
{backends}"""
