"""Three Harmony processes, one archive: a real PostgreSQL and a real S3 server (SeaweedFS)
shared by three ``twistd harmony`` nodes, each with its own local folder as a cache.

Ingest is spread over the nodes and over three ways in - HTTP Part-10, STOW-RS
and DCMTK ``storescu`` (C-STORE) - while PostgreSQL is restarted, the S3 server
is stopped and started again (its process, not a freeze), two forward targets
(``pacs`` rotate, ``vault`` fifo) are down and then come up, and one node is
SIGKILLed at a random moment while it delivers.  A sender whose instance was
not acknowledged sends it again to another node, as a real one would.

Checked:

- every acknowledged instance reaches each target; none is lost and none is
  unknown; re-deliveries (the dead node's deliveries in flight) are counted
  apart and bounded by what it could have had in flight; ``vault`` receives in
  queue order;
- the dead node's leases pass to the survivors within the lease time (measured
  from the kill), before the node is started again (its own disk holds the
  instances it acknowledged while S3 was down: they reach S3 when it returns);
- QIDO-RS and WADO-RS (dicomweb-client), C-FIND (``findscu``), C-GET (``getscu``)
  and C-MOVE (``movescu`` to a DCMTK ``storescp``) answer the whole study from
  nodes that received only part of it: the rest is fetched from S3, bytes equal.

The kill point comes from a seed printed on failure (``HARMONY_CLUSTER_SEED``).
"""

from __future__ import annotations

import os
import random
import time

import psycopg
import pytest_twisted
import treq
from pydicom import dcmread
from twisted.internet import defer, reactor, threads
from twisted.internet.task import deferLater
from twisted.web.server import Site

from tests.dicomweb_helpers import bridge_pipeline, multipart
from tests.peers import DCMTK, Storescp, free_port, peer_env
from tests.s3 import ACCESS_KEY, SECRET_KEY
from tests.sf_helpers import HarmonyProcess, PortHold, ScriptedTarget, make_instances, node_config

N_INSTANCES = 60
CONCURRENCY = 4
LEASE_SECONDS = 2
POLL_SECONDS = 0.2  # node_config's poll_seconds
SCP_AET = "HARMONY"
TOKEN = "cluster-test-token"
ENABLE_QUERY = "enable_find = true\nenable_get = true\nenable_move = true"


def cluster_config(node, ports, *, dsn, s3, prefix, credentials, targets: dict, sink_port: int) -> str:
    """One node: HTTP ingest, STOW-RS and a C-STORE SCP into ``store_forward`` (sf); QIDO/WADO-RS and a
    C-FIND/C-GET/C-MOVE SCP over the same store (``local_archive``); PostgreSQL + S3; management."""
    scp = ('\n[endpoints.{name}]\nservice = "dicom_scp"\n[endpoints.{name}.options]\nlocal_aet = "HARMONY"\n'
           'bind_addr = "127.0.0.1"\nport = {port}\n{enable}\n')
    return node_config(
        ports["http"], node=node, path="store", targets=targets, dsn=dsn, backend="s3",
        storage=(f's3_endpoint = "{s3.endpoint}"\ns3_bucket = "{s3.bucket}"\ns3_prefix = "{prefix}"\n'
                 f's3_credentials_file = "{credentials}"\n'),
        sf_options=f"concurrency = {CONCURRENCY}\nlease_seconds = {LEASE_SECONDS}\n"
                   '[backends.sf.options.per_target.vault]\norder = "fifo"') + f"""
[management]
enabled = true
bind_port = {ports["admin"]}
token = "{TOKEN}"

[pipelines.dimse_in]
endpoints = ["store_scp"]
backends = ["sf"]

[pipelines.dimse_query]
endpoints = ["query_scp"]
backends = ["archive"]
{scp.format(name="store_scp", port=ports["store"], enable="enable_store = true")}
{scp.format(name="query_scp", port=ports["query"], enable=ENABLE_QUERY)}
[endpoints.query_scp.options.move_destinations]
SINK = "127.0.0.1:{sink_port}"

[backends.archive]
service = "local_archive"
{bridge_pipeline("stow", "sf", prefix="/stow")}
{bridge_pipeline("web", "archive", prefix="/dicomweb")}
"""


class Node(HarmonyProcess):
    """A cluster node whose ports are picked again when another process on this busy machine
    took one between :func:`free_port` and the node's listen (the node then exits)."""

    def __init__(self, folder, name, make_config):
        super().__init__(folder)
        self.name = name
        self.make_config = make_config
        self.folder.mkdir()

    def start(self):
        for _attempt in range(3):
            if self.starts == 0 or self.proc.poll() is not None:
                self.port = {k: free_port() for k in ("http", "store", "query", "admin")}
                self.ports = list(self.port.values())
                self.config.write_text(self.make_config(self))
            super().start()
            if self._listening():
                return self
            self.stop()
        raise AssertionError(f"{self.name} could not listen on free ports three times")

    def _listening(self) -> bool:
        """Every listener logged as ours, or the process gone (a port taken: try others)."""
        log = self.folder / f"twistd-{self.starts}.log"
        wanted = ("network default listening", "dicom_scp store_scp listening", "dicom_scp query_scp listening",
                  "network management listening")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            if self.proc.poll() is not None or "CannotListenError" in text:
                return False
            if all(w in text for w in wanted):
                return True
            time.sleep(0.1)  # polling a log file, not synchronising on time
        return False

    def url(self, path):
        return f"http://127.0.0.1:{self.port['http']}{path}"

    def admin(self, path):
        import requests
        r = requests.get(f"http://127.0.0.1:{self.port['admin']}/admin{path}",
                         headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        r.raise_for_status()
        return r


@pytest_twisted.ensureDeferred
async def test_three_nodes_postgresql_and_s3_faults_one_killed_nothing_lost(own_postgres, own_s3, tmp_path):
    seed = int(os.environ.get("HARMONY_CLUSTER_SEED", "0")) or random.randrange(1, 2**31)
    print(f"kill point from HARMONY_CLUSTER_SEED={seed}")
    rnd = random.Random(seed)
    dsn = own_postgres.new_database()
    prefix = f"{tmp_path.name}/"
    credentials = tmp_path / "s3-credentials"
    credentials.write_text(f"{ACCESS_KEY}:{SECRET_KEY}\n")
    files = make_instances(tmp_path / "in", N_INSTANCES, 62, patient_id="CLUSTER", series=2)
    by_sop = {sop_of(f): f for f in files}
    study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    holds = {name: PortHold() for name in ("pacs", "vault")}
    targets = {name: SlowTarget() for name in holds}
    sink = Storescp(tmp_path / "sink", aet="SINK").start()

    def make_config(node):
        return cluster_config(node.name, node.port, dsn=dsn, s3=own_s3, prefix=prefix, credentials=credentials,
                              targets={n: h.port for n, h in holds.items()}, sink_port=sink.port)
    nodes = [Node(tmp_path / f"node{i}", f"node{i}", make_config) for i in range(3)]
    listening = []
    started = time.monotonic()

    def phase(what):
        print(f"{time.monotonic() - started:5.1f} s  {what}")
    try:
        await defer.gatherResults([threads.deferToThread(n.start) for n in nodes])
        phase("three nodes up")
        acknowledged: dict[str, str] = {}  # SOP -> the node that acknowledged it
        alive = list(nodes)
        victim = nodes[rnd.randrange(3)]
        kill_at = rnd.randrange(N_INSTANCES // 2 + 2, N_INSTANCES - 12)
        s3_restart = None
        recovery = None
        refused = 0
        for n, f in enumerate(files):
            if n == 8:
                own_postgres.restart()  # cuts every node's connections mid-ingest
            if n == 16:
                # The S3 server goes away (its process stops) and starts again meanwhile.
                own_s3.stop_server()
                s3_restart = threads.deferToThread(own_s3.start)
            if n == N_INSTANCES // 2:
                for name, hold in holds.items():  # the targets come up: every node delivers
                    hold.release()
                    listening.append(reactor.listenTCP(hold.port, Site(targets[name]), interface="127.0.0.1"))
            if n >= kill_at and victim in alive and leased_to(dsn, victim.name):
                victim.kill()  # from the seed's point on, the first moment it is delivering
                alive.remove(victim)
                held = leased_to(dsn, victim.name)
                print(f"{victim.name} killed before instance {n}, holding {held} lease(s); "
                      f"{uploads_left(dsn)} file(s) in the cluster not yet in S3")
                recovery = defer.ensureDeferred(lease_recovery(dsn, victim.name, time.monotonic()))
                if held:  # (0 if its deliveries all finished since the look above)
                    # Any survivor's management API shows the cluster's queues and the dead node's leases.
                    doc = (await threads.deferToThread(alive[0].admin, "/queues")).json()
                    holders = {n for t in doc["targets"].values() for n in (t.get("leases") or {})}
                    assert victim.name in holders or leased_to(dsn, victim.name) == 0, doc
                    assert {m["node"] for m in doc["nodes"]} == {n.name for n in nodes}, doc
            way = ("http", "stow", "cstore")[n % 3]
            for attempt in range(80):  # a sender retries: another node, later
                node = alive[(n + attempt) % len(alive)]
                if await send(way, node, f):
                    acknowledged[sop_of(f)] = node.name
                    break
                refused += 1
                await deferLater(reactor, 0.2, lambda: None)
            else:
                raise AssertionError(f"instance {n} was never acknowledged")
        assert victim not in alive, f"{victim.name} never held a lease after instance {kill_at}"
        assert len(acknowledged) == N_INSTANCES
        phase(f"ingest done, {refused} attempt(s) refused during the faults")
        await s3_restart
        phase("S3 back")

        # The dead node's leases: taken over within the lease time (plus polling slack).
        took = await recovery
        print(f"leases of {victim.name} recovered {took:.1f} s after the kill")
        assert took <= LEASE_SECONDS + 2 * POLL_SECONDS + 2.0
        # Started again (its disk holds what it acknowledged and has not uploaded).
        await threads.deferToThread(victim.start)
        phase(f"{victim.name} started again")

        await until(lambda: all(set(acknowledged) <= set(t.stored) for t in targets.values())
                    and unsettled(dsn) == 0 and uploads_left(dsn) == 0, 90)
        for name, target in targets.items():
            assert set(target.stored) == set(acknowledged), name  # none lost, nothing unknown
            redelivered = sum(target.stored.values()) - len(target.stored)
            print(f"{name}: {len(target.stored)} delivered once, {redelivered} re-delivered")
            assert redelivered <= (1 if name == "vault" else CONCURRENCY), (name, target.stored)
        with psycopg.connect(dsn, autocommit=True) as conn:
            rows = conn.execute("SELECT target, sop_uid, state, lease_owner FROM queue ORDER BY id").fetchall()
        assert {(r[2], r[3]) for r in rows} == {("delivered", None)}, rows
        phase("all delivered")
        queue_order = [r[1] for r in rows if r[0] == "vault"]
        first_seen = list(dict.fromkeys(s for s in targets["vault"].seen if s in targets["vault"].stored))
        assert first_seen == queue_order  # fifo across nodes

        # Every node answers for the whole study, serving what others received from S3.
        for node in nodes:
            found = await threads.deferToThread(qido_instances, node, study)
            assert found == set(acknowledged), node.name
        reader = nodes[1]
        foreign = sorted(s for s, n in acknowledged.items() if n != reader.name)[:3]
        for sop in foreign:
            ds = await threads.deferToThread(wado_instance, reader, study, sop)
            assert ds.PixelData == dcmread(by_sop[sop]).PixelData
        # WADO-RS metadata built on one node is the cluster's: another node serves it from the shared cache.
        first_body = await threads.deferToThread(series_metadata, nodes[0], study, series_of(by_sop, foreign[0]))
        # The cache write follows the answer (a failed write only costs a refetch): wait for its row.
        await until(lambda: len(metadata_rows(dsn)) == 1, 30)
        cached = metadata_rows(dsn)
        again = await threads.deferToThread(series_metadata, nodes[2], study, series_of(by_sop, foreign[0]))
        assert again == first_body and metadata_rows(dsn) == cached  # not rebuilt (same row, same expiry)
        assert await c_find(nodes[0], study, tmp_path / "find") == set(acknowledged)
        got = await c_get(nodes[2], study, tmp_path / "get")
        assert got == {sop: dcmread(by_sop[sop]).PixelData for sop in acknowledged}  # (file meta is getscu's)
        await c_move(nodes[1], study)
        moved = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in sink.files()}
        assert moved == set(acknowledged)
        fetched = [p for p in (nodes[2].folder / "store" / "instances").rglob("*.dcm")
                   if acknowledged.get(p.stem) != nodes[2].name]
        assert fetched, "node2 served instances it did not receive without fetching them"
        # Metrics per node: each node's scrape says which node it is and counts its own ingest.
        for node in nodes:
            text = (await threads.deferToThread(node.admin, "/metrics")).text
            assert f'harmony_storage_node_info{{node="{node.name}",store="store"}} 1.0' in text, node.name
            assert "harmony_storage_uploads_pending" in text and "harmony_store_forward_leases" in text
        phase("queries and retrieves answered")
    finally:
        for node in nodes:
            node.stop()
        sink.stop()
        for port in listening:
            await port.stopListening()
        for hold in holds.values():
            hold.release()


async def send(way: str, node: Node, path) -> bool:
    """One attempt to store *path* through *node*; True when acknowledged."""
    body = path.read_bytes()
    if way == "cstore":
        r = await threads.deferToThread(_dcmtk, "storescu", "-v", "-aec", SCP_AET, "127.0.0.1", node.port["store"],
                                        path)
        return r.returncode == 0 and b"Received Store Response (Success)" in r.stderr
    try:
        if way == "stow":
            data, content_type = multipart([body])
            r = await treq.post(node.url("/stow/studies"), data=data, timeout=15,
                                headers={"Content-Type": content_type, "Accept": "application/dicom+json"})
        else:
            r = await treq.post(node.url("/ingest"), data=body, headers={"Content-Type": "application/dicom"},
                                timeout=15)
        await r.content()
    except Exception:  # noqa: BLE001 - a node killed under the request: not acknowledged
        return False
    if r.code == 200:
        return True
    assert r.code == 503 and r.headers.getRawHeaders("retry-after"), (way, r.code)  # refused, said so
    return False


def _dcmtk(tool, *args, cwd=None):
    import subprocess
    return subprocess.run([DCMTK[tool], *map(str, args)], capture_output=True, env=peer_env(), cwd=cwd, timeout=60)


def qido_instances(node: Node, study: str) -> set[str]:
    from dicomweb_client.api import DICOMwebClient
    client = DICOMwebClient(node.url("/dicomweb"))
    return {r["00080018"]["Value"][0] for r in client.search_for_instances(study_instance_uid=study)}


def wado_instance(node: Node, study: str, sop: str):
    from dicomweb_client.api import DICOMwebClient
    client = DICOMwebClient(node.url("/dicomweb"))
    series = [r["0020000E"]["Value"][0] for r in client.search_for_instances(study_instance_uid=study)
              if r["00080018"]["Value"][0] == sop][0]
    return client.retrieve_instance(study, series, sop, media_types=(("application/dicom", "*"),))


def series_of(by_sop, sop) -> str:
    return str(dcmread(by_sop[sop], stop_before_pixels=True).SeriesInstanceUID)


def series_metadata(node: Node, study: str, series: str) -> bytes:
    import requests
    r = requests.get(node.url(f"/dicomweb/studies/{study}/series/{series}/metadata"),
                     headers={"Accept": "application/dicom+json"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.content.replace(f"127.0.0.1:{node.port['http']}".encode(), b"NODE")  # BulkDataURIs name the node


def metadata_rows(dsn) -> list:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("SELECT key, expires_at FROM dicomweb_metadata").fetchall()


async def c_find(node: Node, study: str, out) -> set[str]:
    out.mkdir()
    r = await threads.deferToThread(_dcmtk, "findscu", "-v", "-S", "-X", "-od", out, "-aec", SCP_AET,
                                    "-k", "QueryRetrieveLevel=IMAGE", "-k", f"StudyInstanceUID={study}",
                                    "-k", "SOPInstanceUID", "127.0.0.1", node.port["query"])
    assert b"Received Final Find Response (Success)" in r.stderr, r.stderr
    return {str(dcmread(p).SOPInstanceUID).rstrip("\0 ") for p in out.glob("rsp*.dcm")}


async def c_get(node: Node, study: str, out) -> dict:
    out.mkdir()
    r = await threads.deferToThread(_dcmtk, "getscu", "-S", "-od", out, "-aec", SCP_AET,
                                    "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                                    "127.0.0.1", node.port["query"])
    assert r.returncode == 0, r.stderr
    return {str(ds.SOPInstanceUID): ds.PixelData for ds in map(dcmread, out.iterdir())}


async def c_move(node: Node, study: str) -> None:
    r = await threads.deferToThread(_dcmtk, "movescu", "-v", "-S", "-aec", SCP_AET, "-aem", "SINK",
                                    "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                                    "127.0.0.1", node.port["query"])
    assert r.returncode == 0 and b"Received Final Move Response (Success)" in r.stderr, r.stderr


def leased_to(dsn, node: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM queue WHERE lease_owner=%s", (node,)).fetchone()[0]


async def lease_recovery(dsn, node: str, since: float) -> float:
    """Seconds from *since* until no queue row is leased to *node* any more."""
    while leased_to(dsn, node):
        assert time.monotonic() - since < 60, f"{node}'s leases were never taken over"
        await deferLater(reactor, 0.1, lambda: None)
    return time.monotonic() - since


def unsettled(dsn) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM queue WHERE state != 'delivered'").fetchone()[0]


def uploads_left(dsn) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM blob_uploads").fetchone()[0]


class SlowTarget(ScriptedTarget):
    """A real HTTP target that answers each delivery 100 ms later, so a node
    has deliveries in flight (leases held) when it is killed."""

    def render_POST(self, request):
        from twisted.web.server import NOT_DONE_YET
        body = super().render_POST(request)

        def answer():
            if not request.finished and not request._disconnected:
                request.write(body)
                request.finish()
        reactor.callLater(0.1, answer)
        return NOT_DONE_YET


async def until(predicate, timeout: float):
    deadline = reactor.seconds() + timeout
    while not predicate():
        assert reactor.seconds() < deadline, "not everything was delivered in time"
        await deferLater(reactor, 0.1, lambda: None)


def sop_of(path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
