"""What the benchmarks in bench/ share: ports, starting and stopping peer
processes (nginx, Harmony under twistd), wrk runs and /proc memory figures.

Every benchmark is a script run from the repository root with the Python of
the venv Harmony is installed in (``python bench/NAME/run.py``); each puts the
repository root on ``sys.path`` and imports this module as ``bench.common``.
Kept free of Harmony imports so a benchmark can load it before deciding what
else it needs.
"""

from __future__ import annotations

import math
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NGINX = "/usr/sbin/nginx"
WRK = "/usr/bin/wrk"
#: twistd of the venv running the benchmark: Harmony runs as in production.
TWISTD = Path(sys.executable).parent / "twistd"


def require(*tools, hint: str = "apt-get install nginx-light wrk; run with Harmony's venv python"):
    """Exit with a clear message when a tool the benchmark runs is missing."""
    for tool in tools:
        if not os.path.exists(tool):
            sys.exit(f"{tool} is missing ({hint})")


# ------------------------------------------------------------------ processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 20.0):
    """Wait until *port* accepts connections; fail at once if *proc* exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout}s")


def wait_http(url: str, proc: subprocess.Popen | None = None, timeout: float = 20.0):
    """Wait until *url* answers (any status below 400)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                r.read()
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def stop(proc: subprocess.Popen | None, sig=signal.SIGTERM, timeout: float = 30):
    """Stop *proc* with *sig*, killing it if it outlives *timeout*."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cpu_seconds(*pids: int) -> float:
    """CPU time (user + system, seconds) used so far by *pids* together.

    On a machine shared with other work, req/s measures the load as much as
    the server; CPU per request hardly moves with it, so benches print both."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """Direct children of *pid* (nginx's workers), read from /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def harmony_config(folder: Path, port: int, pipelines: str, *, workers: int | None = None,
                   storage: bool = False) -> Path:
    """Write *folder*/``harmony.toml``: logs at warn (access logs would cost
    throughput in every figure), one HTTP network on 127.0.0.1:*port*, storage
    under *folder*/``var`` if asked, then *pipelines* (TOML, dedented)."""
    head = ["[proxy]", 'id = "bench"', 'log_level = "warn"']
    if workers is not None:
        head.append(f"workers = {workers}")
    head += ["", "[network.default.http]", 'bind_address = "127.0.0.1"', f"bind_port = {port}", ""]
    if storage:
        head += ["[storage.options]", f'path = "{folder / "var"}"', ""]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "harmony.toml"
    path.write_text("\n".join(head) + textwrap.dedent(pipelines))
    return path


def toml_table(header: str, **values) -> str:
    """One TOML table: ``[header]`` and its ``key = value`` lines (str, int, bool, list).
    The benches build their Harmony configs from these pieces (below) so the same
    endpoint or backend is written once."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return str(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
    return "\n".join([f"[{header}]"] + [f"{k} = {value(v)}" for k, v in values.items()]) + "\n\n"


def dicom_scp_endpoint(name: str, port: int, *, aet: str = "HARMONY", **options) -> str:
    """A ``dicom_scp`` endpoint on 127.0.0.1:*port* with no PDU size limit (the
    benches measure throughput, not the limit); *options* are its other options."""
    return (toml_table(f"endpoints.{name}", service="dicom_scp")
            + toml_table(f"endpoints.{name}.options", local_aet=aet, bind_addr="127.0.0.1", port=port,
                         **options, max_pdu_size=0))


def dicom_scu_backend(name: str, pacs_aet: str, pacs_port: int, *, local_aet: str | None = None,
                      timeout_secs: int | None = None) -> str:
    """A ``dicom_scu`` backend to a PACS on 127.0.0.1:*pacs_port*."""
    options: dict = {"aet": pacs_aet, "host": "127.0.0.1", "port": pacs_port}
    if local_aet is not None:
        options["local_aet"] = local_aet
    if timeout_secs is not None:
        options.update(dimse_timeout_secs=timeout_secs, network_timeout_secs=timeout_secs)
    return toml_table(f"backends.{name}", service="dicom_scu") + toml_table(f"backends.{name}.options", **options)


def dicomweb_bridge_pipeline(backend: str, *, prefix: str = "/dicomweb", **endpoint_options) -> str:
    """Pipeline ``bridge``: a ``dicomweb`` endpoint ``web`` at *prefix* -> the
    ``dicomweb_bridge`` middleware -> *backend* (a DIMSE backend)."""
    return (toml_table("pipelines.bridge", networks=["default"], endpoints=["web"], middleware=["bridge"],
                       backends=[backend])
            + toml_table("endpoints.web", service="dicomweb")
            + toml_table("endpoints.web.options", path_prefix=prefix, **endpoint_options)
            + toml_table("middleware.bridge", type="dicomweb_bridge"))


def start_harmony(config: Path, port: int, *, log: Path | None = None, env: dict | None = None,
                  twistd_args=(), timeout: float = 30.0) -> subprocess.Popen:
    """Run Harmony under twistd on *config* (in the config's folder, output to
    *log*, default ``harmony.log`` beside it) and wait for it to listen on *port*."""
    log = log or config.parent / "harmony.log"
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([str(TWISTD), "-n", "--pidfile=", *twistd_args, "harmony", "-c", str(config)],
                                cwd=config.parent, stdout=out, stderr=subprocess.STDOUT, env=env)
    wait_port(port, proc, f"harmony (log: {log})", timeout)
    return proc


# ------------------------------------------------------------------ memory


def status_kib(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` figure in KiB: ``VmRSS`` now, ``VmHWM`` the peak so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class RssSampler(threading.Thread):
    """Highest VmRSS of *pid* (bytes) seen while running: for a process whose
    VmHWM already holds an earlier, larger peak."""

    def __init__(self, pid: int, interval: float = 0.01):
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.running = True

    def rss(self) -> int:
        return status_kib(self.pid, "VmRSS") * 1024

    def run(self):
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)  # a sampler, not synchronisation

    def finish(self) -> int:
        self.running = False
        self.join()
        return self.peak


# ------------------------------------------------------------------ nginx

_TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


class Nginx:
    """An nginx of its own in *folder* (config, pid, logs, temp paths) with
    *server_block* inside ``http {}``, listening on *port*."""

    def __init__(self, folder: Path, server_block: str, port: int, *, workers: int = 1,
                 worker_connections: int = 4096):
        self.folder = folder
        self.port = port
        folder.mkdir(parents=True, exist_ok=True)
        for sub in _TEMP_DIRS:
            (folder / sub).mkdir(exist_ok=True)
        user = "user root;" if os.geteuid() == 0 else ""
        temp = "\n".join(f"    {sub}_temp_path {folder}/{sub};" for sub in _TEMP_DIRS)
        self.conf = folder / "nginx.conf"
        self.conf.write_text(textwrap.dedent(f"""\
            worker_processes {workers};
            daemon off;
            pid {folder}/nginx.pid;
            error_log {folder}/error.log warn;
            {user}
            events {{ worker_connections {worker_connections}; }}
            http {{
                access_log off;
                keepalive_requests 1000000;
            """) + temp + "\n" + textwrap.dedent(server_block) + "\n}\n")
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([NGINX, "-p", str(self.folder), "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_port(self.port, self.proc, f"nginx ({self.conf})")
        return self

    def workers(self) -> list[int]:
        return children(self.proc.pid)

    def kill(self):
        """SIGKILL master and workers, as a crash would."""
        if self.proc is None:
            return
        workers = self.workers()
        self.proc.kill()
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        self.proc = None
        (self.folder / "nginx.pid").unlink(missing_ok=True)

    def stop(self):
        stop(self.proc, signal.SIGQUIT)
        self.proc = None


def proxy_block(port: int, upstream_ports, *, location: str = "/", upstream_extra: str = "",
                extra: str = "") -> str:
    """nginx ``proxy_pass`` to 127.0.0.1 upstreams over a keepalive pool."""
    servers = " ".join(f"server 127.0.0.1:{p}{upstream_extra};" for p in upstream_ports)
    return f"""
        upstream up {{ {servers} keepalive 64; }}
        server {{
            listen 127.0.0.1:{port};
            location {location} {{
                proxy_pass http://up;
                proxy_http_version 1.1;
                proxy_set_header Connection "";
                {extra}
            }}
        }}"""


# ------------------------------------------------------------------ wrk

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _latency_ms(out: str, percent: int) -> float:
    m = re.search(rf"^\s*{percent}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    return float(m[1]) * _UNITS[m[2]] if m else math.nan


def parse_wrk(out: str) -> dict:
    """wrk ``--latency`` output -> rps, p50_ms, p99_ms, total, served and
    errors (non-2xx/3xx answers plus socket errors)."""
    def count(pattern) -> int:
        m = re.search(pattern, out)
        return sum(map(int, m.groups())) if m else 0

    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = count(r"(\d+) requests in")
    non2xx = count(r"Non-2xx or 3xx responses: (\d+)")
    sockets = count(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
    return {"rps": float(m[1]) if m else 0.0, "p50_ms": _latency_ms(out, 50), "p99_ms": _latency_ms(out, 99),
            "total": total, "served": total - non2xx, "errors": non2xx + sockets}


def wrk(url: str, duration: int, *, threads: int = 2, connections: int = 50, headers=(), extra=()) -> dict:
    """One bounded wrk run against *url*, parsed by :func:`parse_wrk`."""
    argv = [WRK, f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", *extra]
    for header in headers:
        argv += ["-H", header]
    r = subprocess.run([*argv, url], capture_output=True, text=True, timeout=duration + 60, check=True)
    return parse_wrk(r.stdout)
