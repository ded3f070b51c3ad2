"""Real DICOM peers for tests: Orthanc (+ DICOMweb plugin) and DCMTK servers.

Each starts as a plain process on 127.0.0.1 with a temporary configuration and
free ports, with ``TCP_NODELAY=1`` (see the field notes: without it every
multi-PDU exchange stalls ~40 ms).  A missing binary fails loudly: these tests
must never pass because a tool was absent.

DCMTK tools are called by absolute path: pynetdicom installs console scripts of
the same names into the venv.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
DCMTK = {name: f"/usr/bin/{name}" for name in
         ("echoscu", "findscu", "getscu", "movescu", "storescu", "storescp", "dcmqrscp", "dcmqridx", "dcmodify")}


def require(path: str) -> str:
    if not os.path.exists(path):
        raise RuntimeError(f"{path} is missing: run scripts/test, which installs dcmtk, orthanc and orthanc-dicomweb")
    return path


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


#: Where :func:`free_port` chooses: below the kernel's ephemeral range, from which it takes
#: the source port of every outgoing connection -- a port chosen there could be taken by
#: any connection made between free_port and the server's bind ("Address already in use",
#: seen in CI).
_PORTS = range(20000, max(20001, _ephemeral_low()))
#: Ports handed out in this process: never twice (one closed again is free to the kernel,
#: which may give it to the next caller too).
_handed_out: set[int] = set()
_choose = random.SystemRandom().choice


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on and no other call here was given."""
    for _ in range(1000):
        port = _choose(_PORTS)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")


def held_port() -> socket.socket:
    """A free loopback port kept bound, not listening, until its socket is closed: no
    outgoing connection can be given it as its ephemeral port meanwhile (Linux skips
    bound ports), which :func:`free_port` cannot promise between its choice and the
    server's start (an Orthanc whose port a Harmony pool connection took kept failing
    to start for 60 s: the pooled association stays open).  ``SO_REUSEADDR``, as on
    :class:`tests.sf_helpers.PortHold`'s: sockets that both set it and never listen may
    share a port, so a test holding the same port down (a target "down" until it
    starts) still can; connect() still skips it."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    return s


def peer_env() -> dict:
    return {**os.environ, "TCP_NODELAY": "1"}


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    """Poll *predicate* until true; fail with *what* (and the process's exit) otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        if predicate():
            return
        time.sleep(0.02)
    raise RuntimeError(f"{what}: not ready after {timeout}s")


def port_bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def listening_inodes(port: int) -> set[str]:
    """Socket inodes LISTENing on *port* (any address), from /proc/net/tcp{,6}."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: TCP_LISTEN
                inodes.add(fields[9])
    return inodes


def pid_listens(pid: int, port: int) -> bool:
    """True when process *pid* itself holds the listening socket on *port*: an open
    port alone may belong to another process that took a "free" port first."""
    inodes = listening_inodes(port)
    if not inodes:
        return False
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return True
    return False


def merge_config(config: dict, extra: dict) -> dict:
    """Merge *extra* into *config* in place: nested tables key by key, other values replaced."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            merge_config(config[key], value)
        else:
            config[key] = value
    return config


class PeerProcess:
    """A peer run as a child process (``proc``) writing to ``log``, both set by ``start``."""

    proc = None
    log = None

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self.log is not None:
            self.log.close()


class Orthanc(PeerProcess):
    """An Orthanc process with the DICOMweb plugin and its own storage folder."""

    def __init__(self, folder: Path, aet: str = "ORTHANC", modalities: dict | None = None,
                 extra_config: dict | None = None):
        self.folder = Path(folder)
        self.aet = aet
        #: Merged into the generated configuration (tables merged key by key,
        #: anything else replaced), e.g. ``{"HttpCompressionEnabled": True}`` or
        #: ``{"DicomWeb": {"Servers": {"harmony": [url]}}}``.
        self.extra_config = extra_config or {}
        #: Its ports, held from now until it starts (others are configured with them meanwhile).
        self._held = [held_port(), held_port()]
        self.http_port, self.dicom_port = (h.getsockname()[1] for h in self._held)
        self.modalities = modalities or {}
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self):
        require(ORTHANC)
        require(DICOMWEB_PLUGIN)
        storage = self.folder / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "HarmonyTestOrthanc",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomModalities": {name: [aet, host, port] for name, (aet, host, port) in self.modalities.items()},
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "StableAge": 1,
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True,
                         "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
            "HttpCompressionEnabled": False,
            "SaveJobs": False,
        }
        merge_config(config, self.extra_config)
        cfg = self.folder / "orthanc.json"
        cfg.write_text(json.dumps(config))
        self._release_ports()
        for attempt in range(3):
            self.log = open(self.folder / "orthanc.log", "wb")
            self.proc = subprocess.Popen([ORTHANC, str(cfg)], stdout=self.log, stderr=subprocess.STDOUT,
                                         env=peer_env(), cwd=self.folder)
            try:
                wait_for(self._ready, 30, "Orthanc", self.proc)
                wait_for(lambda: port_open(self.dicom_port), 30, "Orthanc DICOM port", self.proc)
                return self
            except RuntimeError:
                self.stop()
                # Its ports were chosen (free_port) before anyone else could take them, and
                # others may already be configured with them: when another process took one
                # meanwhile (an outgoing connection's ephemeral port), wait until it is free
                # again and start on the same ports, rather than fail the test.
                if attempt == 2 or b"already in use" not in (self.folder / "orthanc.log").read_bytes():
                    raise
                wait_for(lambda: port_bindable(self.http_port) and port_bindable(self.dicom_port), 60,
                         "Orthanc's ports to be free again")
        return self

    def _release_ports(self) -> None:
        for held in self._held:
            held.close()
        self._held = []

    def stop(self):
        self._release_ports()   # (never started)
        super().stop()

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/system", timeout=1) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def rest(self, method: str, path: str, body: bytes | None = None, content_type="application/json"):
        req = urllib.request.Request(f"{self.url}{path}", data=body, method=method,
                                     headers={"Content-Type": content_type} if body is not None else {})
        with urllib.request.urlopen(req, timeout=60) as r:
            data = r.read()
            return json.loads(data) if data and r.headers.get_content_type() == "application/json" else data

    def upload(self, paths) -> None:
        for p in paths:
            self.rest("POST", "/instances", Path(p).read_bytes(), "application/dicom")

    def add_modality(self, name: str, aet: str, port: int, host: str = "127.0.0.1"):
        self.rest("PUT", f"/modalities/{name}", json.dumps({"AET": aet, "Host": host, "Port": port}).encode())

    def instance_ids(self) -> list[str]:
        return self.rest("GET", "/instances")


class Dcmqrscp(PeerProcess):
    """DCMTK's Query/Retrieve SCP as a second PACS, indexed from files."""

    def __init__(self, folder: Path, aet: str = "DCMQRSCP", peers: dict | None = None,
                 single_process: bool = False):
        self.folder = Path(folder)
        self.aet = aet
        # dcmqrscp 3.6.7 --single-process was seen to die (SIGSEGV) after its first
        # association on this machine; tests needing several pass False (fork mode).
        self.single_process = single_process
        self.port = free_port()
        self.peers = peers or {}
        self.proc = None

    def start(self, files=()):
        require(DCMTK["dcmqrscp"])
        db = self.folder / "db"
        db.mkdir(parents=True, exist_ok=True)
        hosts = "\n".join(f"{name} = ({aet}, 127.0.0.1, {port})" for name, (aet, port) in self.peers.items())
        cfg = self.folder / "dcmqrscp.cfg"
        cfg.write_text(f"""NetworkTCPPort = {self.port}
MaxPDUSize = 65536
MaxAssociations = 16
HostTable BEGIN
{hosts}
HostTable END
VendorTable BEGIN
VendorTable END
AETable BEGIN
{self.aet} {db} RW (1000, 1024mb) ANY
AETable END
""")
        files = [str(f) for f in files]
        if files:
            # dcmqridx indexes files in place, so give it copies inside the db folder.
            copies = []
            for f in files:
                dst = db / Path(f).name
                shutil.copyfile(f, dst)
                copies.append(str(dst))
            subprocess.run([require(DCMTK["dcmqridx"]), str(db), *copies], check=True, capture_output=True)
        self.log = open(self.folder / "dcmqrscp.log", "wb")
        # Default is to fork per association: DCMTK 3.6.7's dcmqrscp segfaults after
        # the first association is released in --single-process mode.
        mode = ["--single-process"] if self.single_process else []
        self.proc = subprocess.Popen([DCMTK["dcmqrscp"], *mode, "-c", str(cfg), str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=peer_env())
        wait_for(lambda: port_open(self.port), 30, "dcmqrscp", self.proc)
        return self


class Storescp(PeerProcess):
    """DCMTK's storescp, e.g. as a C-MOVE destination; files land in ``folder``."""

    def __init__(self, folder: Path, aet: str = "STORESCP"):
        self.folder = Path(folder)
        self.aet = aet
        self.port = free_port()
        self.proc = None

    def start(self):
        require(DCMTK["storescp"])
        self.folder.mkdir(parents=True, exist_ok=True)
        self.log = open(self.folder.parent / f"storescp-{self.port}.log", "wb")
        self.proc = subprocess.Popen([DCMTK["storescp"], "--aetitle", self.aet, "-od", str(self.folder),
                                      "--default-filenames", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=peer_env())
        wait_for(lambda: port_open(self.port), 30, "storescp", self.proc)
        return self

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.rglob("*") if p.is_file())



NGINX = "/usr/sbin/nginx"


class Nginx(PeerProcess):
    """A real nginx of its own in *folder* (config, pid, logs, temp paths) with
    *server_block* inside ``http {}``; *ports* are the ports that block listens on."""

    def __init__(self, folder: Path, server_block: str, ports):
        self.folder = Path(folder)
        self.ports = list(ports)
        temps = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        for sub in temps:
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        temp_paths = "\n".join(f"{sub}_temp_path {self.folder}/{sub};" for sub in temps)
        user = "user root;" if os.geteuid() == 0 else ""
        self.conf = self.folder / "nginx.conf"
        self.conf.write_text(f"""
worker_processes 1;
daemon off;
pid {self.folder}/nginx.pid;
error_log {self.folder}/error.log warn;
{user}
events {{ worker_connections 1024; }}
http {{
    access_log {self.folder}/access.log;
    {temp_paths}
    {server_block}
}}
""")

    def start(self):
        self.log = open(self.folder / "stdout.log", "wb")
        self.proc = subprocess.Popen([require(NGINX), "-p", str(self.folder), "-c", str(self.conf)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        for port in self.ports:
            wait_for(lambda: port_open(port), 10, f"nginx on {port} ({self.conf})", self.proc)
        return self


def dcmtk_association_request(tool: str, *args: str, files: tuple[str, ...] = (), calling: str = "CLIENT",
                              called: str = "HARMONY") -> bytes:
    """The A-ASSOCIATE-RQ PDU (whole, header first) DCMTK's *tool* sends, caught on a plain
    socket that closes once it has it (the tool then fails to associate, as expected)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        got: list[bytes] = []

        def take():
            conn, _ = server.accept()
            with conn:
                conn.settimeout(10)
                data = b""
                while len(data) < 6 or len(data) < 6 + int.from_bytes(data[2:6], "big"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                got.append(data)

        taker = threading.Thread(target=take, daemon=True)
        taker.start()
        subprocess.run([require(DCMTK[tool]), "-aet", calling, "-aec", called, *args, "127.0.0.1",
                        str(server.getsockname()[1]), *files], capture_output=True, timeout=30, env=peer_env())
        taker.join(30)
    if not got or got[0][:1] != b"\x01":
        raise RuntimeError(f"{tool} sent no A-ASSOCIATE-RQ")
    return got[0]
