"""nginx in front of Harmony, nginx behind it: the HTTP passthrough between two
real HTTP/1.1 implementations, with wrk, curl and python requests (gzip) as clients.

The front nginx speaks to Harmony as nginx speaks to any upstream (keep-alive
pool, HTTP/1.1); Harmony's upstream client (harmony.web.upstream_client, llhttp)
speaks to the back nginx, which logs every request with its connection number,
so the test can see that Harmony reuses its upstream connections.
"""

from __future__ import annotations

import gzip
import subprocess

import pytest
import requests
from bench.common import Nginx, proxy_block, wrk

from tests.interop.support import Node, web_pipeline
from tests.peers import free_port

BODY = ("passthrough " * 400).encode()
#: Larger than any socket buffer: it streams through Harmony with flow control.
BIG = bytes(range(256)) * (6 * 4096)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    www = root / "www"
    www.mkdir()
    (www / "page.txt").write_bytes(BODY)
    (www / "page.txt.gz").write_bytes(gzip.compress(BODY))
    (www / "big.bin").write_bytes(BIG)
    back_port, front_port = free_port(), free_port()
    log = root / "back-access.log"
    back = Nginx(root / "back", f"""
        log_format conn '$connection $request_method $status';
        server {{
            listen 127.0.0.1:{back_port};
            access_log {log} conn;
            root {www};
            location /gz/ {{ alias {www}/; gzip on; gzip_types text/plain; gzip_min_length 10; }}
        }}""", back_port).start()
    node = front = None
    try:
        node = Node(root / "harmony", web_pipeline("pass", "http", "/", {"base_url": f"http://127.0.0.1:{back_port}"}),
                    log_level="warn").start()
        front = Nginx(root / "front", proxy_block(front_port, [node.http_port]), front_port).start()
        yield {"front": f"http://127.0.0.1:{front_port}", "harmony": node.url(), "log": log}
    finally:
        for peer in (front, node, back):
            if peer is not None:
                peer.stop()


def test_wrk_through_nginx_and_harmony_has_no_errors_and_reuses_upstream_connections(chain):
    result = wrk(chain["front"] + "/page.txt", 2, threads=1, connections=20)
    assert result["total"] > 100 and result["errors"] == 0, result
    lines = [line.split() for line in chain["log"].read_text().splitlines()]
    assert all(status == "200" for _, _, status in lines)
    connections = {conn for conn, _, _ in lines}
    assert len(lines) >= result["total"]
    assert len(connections) <= 64, f"{len(connections)} upstream connections for {len(lines)} requests"


def test_requests_with_gzip_through_the_chain(chain):
    with requests.Session() as s:
        r = s.get(chain["front"] + "/gz/page.txt", timeout=30)  # Accept-Encoding: gzip, deflate by default
    assert r.status_code == 200 and r.headers["Content-Encoding"] == "gzip" and r.content == BODY


def test_curl_head_and_conditional_get(chain):
    head = subprocess.run(["curl", "-sS", "-I", chain["harmony"] + "/page.txt"], capture_output=True, text=True,
                          timeout=30, check=True).stdout
    assert head.startswith("HTTP/1.1 200") and f"Content-Length: {len(BODY)}" in head
    etag = next(line.split(": ", 1)[1].strip() for line in head.splitlines() if line.lower().startswith("etag:"))
    status = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
                             "-H", f"If-None-Match: {etag}", chain["front"] + "/page.txt"],
                            capture_output=True, text=True, timeout=30, check=True).stdout
    assert status == "304 0"
    # and the connection Harmony used for the HEAD and the 304 still serves a whole body
    with requests.Session() as s:
        assert [s.get(chain["harmony"] + "/page.txt", timeout=30).content for _ in range(3)] == [BODY] * 3


def test_curl_streams_a_large_answer_whole(chain, tmp_path):
    out = tmp_path / "big.bin"
    status = subprocess.run(["curl", "-sS", "-o", str(out), "-w", "%{http_code}", chain["harmony"] + "/big.bin"],
                            capture_output=True, text=True, timeout=60, check=True).stdout
    assert status == "200" and out.read_bytes() == BIG


def test_bodies_and_bodyless_requests_share_keep_alive_connections(chain):
    """nginx keeps its connections to Harmony open: a request with a body arriving on a
    connection the fast channel served is handed to twisted.web's channel, and the
    requests after it on that connection are still answered.  The back nginx answers the
    1 MB POST with 405 before reading it all: Harmony must linger after that early answer
    (read and drop the rest, half-closed), or its close resets the connection while the
    front nginx is still writing, which nginx reports as a 502."""
    with requests.Session() as s:
        for _ in range(3):
            assert s.get(chain["front"] + "/page.txt", timeout=30).content == BODY
            posted = s.post(chain["front"] + "/page.txt", data=b"x" * 1_000_000, timeout=30)
            assert posted.status_code == 405  # the back nginx's answer to POST on a static file, passed through
            assert s.get(chain["harmony"] + "/page.txt", timeout=30).content == BODY
            assert s.post(chain["harmony"] + "/page.txt", data=b"y" * 10, timeout=30).status_code == 405
