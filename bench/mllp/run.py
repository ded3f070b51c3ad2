"""bench/mllp: HL7 v2 over MLLP through Harmony next to the peers talking directly.

    python bench/mllp/run.py           # full run (~1 min)
    python bench/mllp/run.py --quick   # smoke run

In one run: python-hl7's asyncio MLLP client (as many connections as
``--connections``, each sending ADT^A01 messages one after the other and
waiting for each ACK, as MLLP senders do) against

  direct    python-hl7's asyncio MLLP server (the peer);
  relay     Harmony under twistd: mllp endpoint -> mllp backend -> the same server
            (the downstream's ACK comes back), ``json_view = false``;
  viewed    the same with the JSON view made for every message (python-hl7 parse);
  durable   Harmony: mllp endpoint -> store_forward (fifo, fsync'd sqlite) ->
            mllp backend -> the same server (ACK once the message is on disk).

Prints messages/s and ACK latency (p50/p99) for each, and Harmony's ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import free_port, harmony_config, start_harmony, stop, wait_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
#: The peer: python-hl7's asyncio MLLP server answering AA (the tests' receiver, without its log).
PEER = ROOT / "tests" / "hl7" / "receiver.py"


def adt(n: int) -> str:
    return "\r".join([
        f"MSH|^~\\&|BENCH|FAC|RECV|FAC|20260101120000||ADT^A01^ADT_A01|B{n:08d}|P|2.5",
        "EVN|A01|20260101120000",
        f"PID|1||{n:08d}^^^HOSP||Testperson^Anna^M||19800101|F|||1 Test Street^^Testtown^^12345",
        "PV1|1|I|WARD1^101^A|||||||||||||||V0001",
    ]) + "\r"


async def one_connection(port: int, count: int, start: int, latencies: list):
    from hl7.mllp import open_hl7_connection

    reader, writer = await open_hl7_connection("127.0.0.1", port, encoding="utf-8")
    try:
        for i in range(count):
            t0 = time.perf_counter()
            writer.writemessage(adt(start + i))
            await writer.drain()
            ack = await reader.readmessage()
            latencies.append(time.perf_counter() - t0)
            code = str(ack.segment("MSA")(1))
            if code != "AA":
                raise RuntimeError(f"got {code}")
    finally:
        writer.close()


async def load(port: int, connections: int, per_connection: int) -> dict:
    latencies: list = []
    t0 = time.perf_counter()
    await asyncio.gather(*(one_connection(port, per_connection, c * per_connection, latencies)
                           for c in range(connections)))
    elapsed = time.perf_counter() - t0
    latencies.sort()
    return {"rate": len(latencies) / elapsed, "p50": statistics.median(latencies) * 1000,
            "p99": latencies[int(len(latencies) * 0.99) - 1] * 1000}


def measure(port: int, connections: int, count: int) -> dict:
    asyncio.run(load(port, connections, max(5, count // 10)))  # warm-up (connections, JIT-free but caches)
    return asyncio.run(load(port, connections, count))


def pipelines(receiver_port: int, relay_port: int, viewed_port: int, durable_port: int, spool: Path) -> str:
    return f"""
    [pipelines.relay]
    endpoints = ["relay_in"]
    backends = ["peer"]
    [endpoints.relay_in]
    service = "mllp"
    [endpoints.relay_in.options]
    port = {relay_port}
    max_connections = 1000
    json_view = false          # a pure relay: no middleware reads the view

    [pipelines.viewed]
    endpoints = ["viewed_in"]
    backends = ["peer"]
    [endpoints.viewed_in]
    service = "mllp"
    [endpoints.viewed_in.options]
    port = {viewed_port}
    max_connections = 1000

    [pipelines.durable]
    endpoints = ["durable_in"]
    backends = ["spool"]
    [endpoints.durable_in]
    service = "mllp"
    [endpoints.durable_in.options]
    port = {durable_port}
    max_connections = 1000
    json_view = false
    [backends.spool]
    service = "store_forward"
    [backends.spool.options]
    forward_to = ["peer"]
    order = "fifo"
    path = "{spool}"
    backoff_initial_seconds = 0.05

    [backends.peer]
    service = "mllp"
    [backends.peer.options]
    host = "127.0.0.1"
    port = {receiver_port}
    max_connections_per_target = 64
    """


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--count", type=int, default=None, help="messages per connection")
    args = ap.parse_args()
    count = args.count or (100 if args.quick else 1000)
    receiver_port, http_port, relay_port, viewed_port, durable_port = (free_port() for _ in range(5))
    peer = harmony = None
    with tempfile.TemporaryDirectory(prefix="bench-mllp-") as tmp:
        tmp = Path(tmp)
        try:
            peer = subprocess.Popen([sys.executable, str(PEER), "--port", str(receiver_port)],
                                    stdout=subprocess.PIPE, text=True)
            assert peer.stdout.readline().startswith("READY")
            config = harmony_config(tmp / "harmony", http_port,
                                    pipelines(receiver_port, relay_port, viewed_port, durable_port, tmp / "spool"))
            harmony = start_harmony(config, http_port)
            wait_port(relay_port, harmony, "harmony mllp relay")
            wait_port(durable_port, harmony, "harmony mllp durable")
            wait_port(viewed_port, harmony, "harmony mllp relay with JSON view")
            rows = []
            for connections in (1, 8):
                n = count if connections == 1 else max(10, count // 4)
                direct = measure(receiver_port, connections, n)
                relay = measure(relay_port, connections, n)
                viewed = measure(viewed_port, connections, n)
                durable = measure(durable_port, connections, n)
                rows.append((connections, n, direct, relay, viewed, durable))
        finally:
            stop(harmony)
            stop(peer)
            if peer is not None:
                peer.stdout.close()
    print(f"MLLP, ADT^A01 (~300 bytes), python-hl7 asyncio client -> python-hl7 asyncio server")
    for connections, n, direct, relay, viewed, durable in rows:
        print(f"\n{connections} connection(s) x {n} messages, each waiting for its ACK")
        for name, r in (("direct (peer to peer)", direct), ("Harmony relay", relay),
                        ("Harmony relay + JSON view", viewed), ("Harmony durable (fsync)", durable)):
            print(f"  {name:26s} {r['rate']:8.0f} msg/s   ACK p50 {r['p50']:6.2f} ms   p99 {r['p99']:6.2f} ms")
        print(f"  relay / direct: {relay['rate'] / direct['rate']:.2f}x msg/s, "
              f"{relay['p50'] / direct['p50']:.2f}x ACK p50;   durable / direct: "
              f"{durable['rate'] / direct['rate']:.2f}x msg/s")


if __name__ == "__main__":
    main()
