#!/usr/bin/env python3
"""Harmony's own Python per proxied request, measured in memory: no sockets, no reactor, no load.

Why it exists: on this shared 2-core machine wrk's req/s and even a process's CPU
per request move with everyone else's work, so a change of a few µs on the
passthrough's hot path cannot be told from noise there.  This drives the real
pieces of one passthrough - ``FastChannel`` (the site's protocol), the router,
the ``http`` endpoint, the pipeline with the metrics observer, the ``http``
backend with its target pool, and the upstream client's pooled connection -
over in-memory transports (``StringTransport``), feeding each side the bytes
wrk and nginx send, and reports CPU µs per request (``time.process_time``,
best of several runs).  What it leaves out is the same for every build: the
reactor's turns and the system calls (run.py and profile.py measure those).

    .venv/bin/python bench/http_passthrough/inproc.py [--requests 20000] [--runs 5]
    PYTHONPATH=/tmp/old .venv/bin/python bench/http_passthrough/inproc.py   # another build
    .venv/bin/python bench/http_passthrough/inproc.py --profile             # cProfile of the loop
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

#: What wrk sends (bench/http_passthrough/run.py's URL), and what the nginx upstream answers.
REQUEST = b"GET /hello.txt HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
ANSWER = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 06 Dec 2026 15:00:00 GMT\r\n"
          b"Content-Type: text/plain\r\nContent-Length: 1024\r\nLast-Modified: Sun, 06 Dec 2026 14:00:00 GMT\r\n"
          b"Connection: keep-alive\r\nETag: \"6751f0a0-400\"\r\nAccept-Ranges: bytes\r\n\r\n" + b"x" * 1024)


class _Service:
    """What HarmonyMetrics reads of the service at scrape time (never here)."""

    class runtime:  # noqa: N801 - the shape of harmony.runtime.Runtime that is read
        class config:  # noqa: N801
            class proxy:  # noqa: N801
                id = "bench"

    def target_pools(self):
        return []


def build():
    """The site's protocol on one client connection, and the backend's pooled upstream connection."""
    from harmony.backends.http import HttpBackend
    from harmony.endpoints.http import HttpEndpoint
    from harmony.management.metrics import HarmonyMetrics
    from harmony.pipeline import Pipeline
    from harmony.runtime import Route
    from harmony.web import upstream_client
    from harmony.web.router import HarmonySite, PrefixRouter

    from harmony.log import set_level
    set_level("warn")  # as run.py's config: access log off
    clock = task.Clock()
    backend = HttpBackend("up", ["http://127.0.0.1:8081"], clock)
    endpoint = HttpEndpoint("all", "/")
    pipeline = Pipeline("pass", [], [backend])
    metrics = HarmonyMetrics(_Service())
    pipeline.observers.append(metrics._observer(pipeline, frozenset({"all"})))
    router = PrefixRouter("default", [Route("default", "/", endpoint, pipeline)])
    site = HarmonySite(router, reactor=clock)
    site.timeOut = 60
    peer = IPv4Address("TCP", "127.0.0.1", 40000)
    channel = site.buildProtocol(peer)
    client_side = StringTransport(peerAddress=peer)
    channel.makeConnection(client_side)
    # One pooled connection to the upstream, as after the first request.
    client = backend.client
    target, _ = client._target(b"http://127.0.0.1:8081/")
    conn = upstream_client._Connection(client, target.key)
    upstream_side = StringTransport()
    conn.makeConnection(upstream_side)
    client.release(conn)
    return channel, client_side, conn, upstream_side


def run(n: int, channel, client_side, conn, upstream_side) -> float:
    """CPU seconds for *n* proxied requests."""
    clear_c, clear_u = client_side.clear, upstream_side.clear
    feed_c, feed_u = channel.dataReceived, conn.dataReceived
    started = time.process_time()
    for _ in range(n):
        feed_c(REQUEST)
        feed_u(ANSWER)
        clear_c()
        clear_u()
    return time.process_time() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="cProfile one run instead")
    args = parser.parse_args(argv)
    pieces = build()
    channel, client_side, conn, upstream_side = pieces
    # One request first, checked, so a broken build is not timed.
    channel.dataReceived(REQUEST)
    sent = upstream_side.value()
    conn.dataReceived(ANSWER)
    answer = client_side.value()
    if not (sent.startswith(b"GET /hello.txt HTTP/1.1\r\n") and answer.startswith(b"HTTP/1.1 200 OK\r\n")
            and answer.endswith(b"x" * 1024)):
        raise SystemExit(f"not proxied: sent {sent!r}, answered {answer[:200]!r}")
    client_side.clear()
    upstream_side.clear()
    gc.collect()
    gc.freeze()  # as harmony.service's settle_heap does after start-up
    if args.profile:
        # This folder's profile.py would shadow the standard library's, which cProfile imports.
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
        import cProfile
        import pstats
        profiler = cProfile.Profile(time.process_time)
        profiler.enable()
        run(args.requests, *pieces)
        profiler.disable()
        stats = pstats.Stats(profiler).strip_dirs().sort_stats("tottime")
        stats.print_stats(45)
        stats.print_callers(r"logLevelForNamespace|Deferred\.__init__|getRawHeaders|encode")
        return 0
    best = min(run(args.requests, *pieces) for _ in range(args.runs))
    print(f"{best / args.requests * 1e6:.2f} CPU µs per request in memory "
          f"(best of {args.runs} x {args.requests}; {__import__('harmony').__file__})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
