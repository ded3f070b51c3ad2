"""The node the real-load interop tests drive: Harmony (twistd, admin API on)
with an HTTP passthrough to a healthy nginx - a fast small file, a slow large
one (``limit_rate``) and a queued one (``limit_req``) so that a client going
away always leaves requests in flight - and a small archive (dicom_scp C-STORE/C-FIND and DICOMweb QIDO
over local_archive)."""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

from bench.common import Nginx, status_kib
from tests.dicomweb_helpers import bridge_pipeline
from tests.dimse_helpers import scp_pipeline
from tests.interop.support import Node, web_pipeline
from tests.peers import Orthanc, free_port

SMALL = "ok " * 300
SLOW_BYTES = 256 * 1024


def start_nginx(folder: Path) -> Nginx:
    www = folder / "www"
    www.mkdir(parents=True)
    (www / "small.txt").write_text(SMALL)
    (www / "slow.bin").write_bytes(b"s" * SLOW_BYTES)
    port = free_port()
    (www / "queued.txt").write_text(SMALL)
    # /queued.txt: nginx answers one request a second and queues the rest
    # (limit_req without nodelay), so a client that leaves finds its request
    # still waiting for its head - the case nginx logs as 499.
    return Nginx(folder / "nginx", f"""
        limit_req_zone $server_name zone=queue:1m rate=1r/s;
        server {{
            listen 127.0.0.1:{port};
            root {www};
            location = /slow.bin {{ limit_rate 16k; }}
            location = /queued.txt {{ limit_req zone=queue burst=10000; }}
        }}""", port, workers=1).start()


def node_toml(nginx_url: str, scp_port: int, orthanc_url: str) -> str:
    return web_pipeline("upload", "http", "/orthanc", {"base_url": orthanc_url, "timeout_secs": 30}) + \
        web_pipeline("pass", "http", "/pass", {"base_url": nginx_url, "timeout_secs": 30}) + \
        scp_pipeline("archive", "HARMONY", scp_port, "archive", ("find", "store"), "max_associations = 20\n") + \
        '\n[backends.archive]\nservice = "local_archive"\n' + bridge_pipeline("web", "archive")


class LoadStack:
    """nginx and Orthanc (an upload target that waits for whole bodies) behind one Harmony."""

    def __init__(self, root: Path):
        self.nginx = start_nginx(root)
        self.nginx_url = f"http://127.0.0.1:{self.nginx.port}"
        self.orthanc = Orthanc(root / "orthanc")
        self.scp_port = free_port()
        self.node = None
        try:
            self.orthanc.start()
            self.node = Node(root / "harmony", node_toml(self.nginx_url, self.scp_port, self.orthanc.url),
                             dimse_ports=[self.scp_port], management=True).start()
        except Exception:
            self.stop()
            raise

    def stop(self):
        for peer in (self.node, self.orthanc, self.nginx):
            if peer is not None:
                peer.stop()

    def circuits(self, backend: str = "pass_up") -> dict:
        """target -> circuit state, for *backend* (``pass_up``: the passthrough to nginx; ``upload_up``: to Orthanc)."""
        [pool] = [p for p in self.node.admin("/targets")["backends"] if p["backend"] == backend]
        return {t["name"]: t["circuit"] for t in pool["targets"]}


class RssSampler(threading.Thread):
    """VmRSS of *pid* every *interval* seconds (a sampler, not synchronisation)."""

    def __init__(self, pid: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int]] = []
        self.stopping = threading.Event()

    def run(self):
        start = time.monotonic()
        while not self.stopping.wait(self.interval):
            self.samples.append((time.monotonic() - start, status_kib(self.pid, "VmRSS")))

    def finish(self) -> dict:
        """Stop; the RSS figures in MiB: warm (median of the second fifth of the run),
        end (median of the last fifth), peak, and the growth end - warm."""
        self.stopping.set()
        self.join()
        kib = [k for _, k in self.samples]
        fifth = max(1, len(kib) // 5)
        warm = statistics.median(kib[fifth:2 * fifth]) / 1024
        end = statistics.median(kib[-fifth:]) / 1024
        return {"samples": len(kib), "warm_mib": round(warm, 1), "end_mib": round(end, 1),
                "peak_mib": round(max(kib) / 1024, 1), "growth_mib": round(end - warm, 1)}
