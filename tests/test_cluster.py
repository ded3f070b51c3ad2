"""Three Harmony processes, one archive: a real PostgreSQL shared by three
``twistd harmony`` nodes (one folder, as an NFS mount would be), HTTP Part-10
ingest spread across them, two forward targets - ``pacs`` (rotate) and
``archive`` (fifo) - down at first, then up, and one node SIGKILLed at a
random moment while it is delivering.

Every instance a node answered 200 for reaches each target; nothing is lost;
re-deliveries (the dead node's deliveries in flight, sent again by the
survivors when its leases expire) are counted apart and bounded by what it
could have had in flight; the fifo target receives in queue order; no row is
left leased to the dead node.  The kill point comes from a seed printed on
failure (``HARMONY_CLUSTER_SEED`` reproduces it).
"""

from __future__ import annotations

import os
import random

import psycopg
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.web.server import Site

from tests.peers import free_port
from tests.sf_helpers import HarmonyProcess, PortHold, ScriptedTarget, make_instances, node_config

N_INSTANCES = 90
CONCURRENCY = 4
LEASE_SECONDS = 2


@pytest_twisted.ensureDeferred
async def test_three_nodes_one_killed_nothing_lost(own_postgres, tmp_path):
    seed = int(os.environ.get("HARMONY_CLUSTER_SEED", "0")) or random.randrange(1, 2**31)
    print(f"kill point from HARMONY_CLUSTER_SEED={seed}")
    rnd = random.Random(seed)
    dsn = own_postgres.new_database()
    files = make_instances(tmp_path / "in", N_INSTANCES, 61, patient_id="CLUSTER")
    holds = {name: PortHold(free_port()) for name in ("pacs", "archive")}
    targets = {name: SlowTarget() for name in holds}
    shared = tmp_path / "shared"
    nodes = []
    for i in range(3):
        port = free_port()
        node = HarmonyProcess(tmp_path / f"node{i}", ports=[port])
        node.folder.mkdir()
        node.config.write_text(node_config(
            port, node=f"node{i}", path=shared, dsn=dsn, targets={n: h.port for n, h in holds.items()},
            sf_options=f"concurrency = {CONCURRENCY}\nlease_seconds = {LEASE_SECONDS}\n"
                       "[backends.sf.options.per_target.archive]\norder = \"fifo\""))
        node.url = f"http://127.0.0.1:{port}/ingest"
        node.name = f"node{i}"
        nodes.append(node)
    listening = []
    try:
        for node in nodes:
            node.start()
        acknowledged: list[str] = []
        alive = list(nodes)
        victim = nodes[rnd.randrange(3)]
        kill_at = rnd.randrange(N_INSTANCES // 2 + CONCURRENCY, N_INSTANCES - 5)
        restart_at = N_INSTANCES // 4
        refused: list[int] = []
        for n, f in enumerate(files):
            if n == N_INSTANCES // 2:
                # The targets come up: deliveries start on every node.
                for name, hold in holds.items():
                    hold.release()
                    listening.append(reactor.listenTCP(hold.port, Site(targets[name]), interface="127.0.0.1"))
            if n == kill_at:
                victim.kill()
                alive.remove(victim)
                with psycopg.connect(dsn, autocommit=True) as conn:
                    held = conn.execute("SELECT count(*) FROM queue WHERE state='delivering' AND lease_owner=%s",
                                        (victim.name,)).fetchone()[0]
                print(f"{victim.name} killed before instance {n}, holding {held} lease(s)")
            if n == restart_at:
                own_postgres.restart()  # mid-ingest: cut connections on every node
            body = f.read_bytes()
            for attempt in range(60):  # a sender retries: another node, later (503 + Retry-After)
                node = alive[(n + attempt) % len(alive)]
                try:
                    r = await treq.post(node.url, data=body, headers={"Content-Type": "application/dicom"})
                    await r.content()
                except Exception:  # noqa: BLE001 - a node killed under the request: not acknowledged
                    continue
                if r.code == 200:
                    acknowledged.append(sop_of(f))
                    break
                assert r.code == 503 and r.headers.getRawHeaders("retry-after"), r.code
                refused.append(n)
                await deferLater(reactor, 0.2, lambda: None)
        assert len(acknowledged) == N_INSTANCES  # the survivors took everything
        print(f"{len(refused)} ingest(s) refused with 503 while PostgreSQL restarted")
        # Settled: every target has everything and no row is still leased (the
        # dead node's leases expire and the survivors finish its rows).
        await _until(lambda: all(set(acknowledged) <= set(t.stored) for t in targets.values())
                     and unsettled(dsn) == 0, 90)

        for name, target in targets.items():
            assert set(target.stored) == set(acknowledged), name  # none lost, nothing unknown
            redelivered = sum(target.stored.values()) - len(target.stored)
            print(f"{name}: {len(target.stored)} delivered, {redelivered} re-delivered")
            # Only what the dead node had in flight can arrive twice.
            assert redelivered <= (1 if name == "archive" else CONCURRENCY), (name, target.stored)
        with psycopg.connect(dsn, autocommit=True) as conn:
            rows = conn.execute("SELECT target, sop_uid, state, lease_owner FROM queue ORDER BY id").fetchall()
        assert {(r[2], r[3]) for r in rows} == {("delivered", None)}, rows
        # fifo: the archive got each instance first in queue (commit) order.
        queue_order = [r[1] for r in rows if r[0] == "archive"]
        first_seen = list(dict.fromkeys(s for s in targets["archive"].seen if s in targets["archive"].stored))
        assert first_seen == queue_order
    finally:
        for node in nodes:
            node.stop()
        for port in listening:
            await port.stopListening()
        for hold in holds.values():
            hold.release()


def unsettled(dsn) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM queue WHERE state != 'delivered'").fetchone()[0]


class SlowTarget(ScriptedTarget):
    """A real HTTP target that answers each delivery 50 ms later, so a node
    has deliveries in flight (leases held) when it is killed."""

    def render_POST(self, request):
        from twisted.web.server import NOT_DONE_YET
        body = super().render_POST(request)

        def answer():
            if not request.finished and not request._disconnected:
                request.write(body)
                request.finish()
        reactor.callLater(0.05, answer)
        return NOT_DONE_YET


async def _until(predicate, timeout: float):
    deadline = reactor.seconds() + timeout
    while not predicate():
        assert reactor.seconds() < deadline, "not everything was delivered in time"
        await deferLater(reactor, 0.1, lambda: None)


def sop_of(path) -> str:
    from pydicom import dcmread
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
