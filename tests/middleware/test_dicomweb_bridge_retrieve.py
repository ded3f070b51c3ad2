"""WADO-RS study retrieves through the DICOMweb bridge over DIMSE, with real clients.

dicomweb-client, curl and a raw HTTP client that stops reading or hangs up ->
Harmony (dicomweb endpoint, dicomweb_bridge, dicom_scu with ``max_staged_mb = 2``)
-> an Orthanc of its own holding a 30 x 512 KB study.  The instances are staged in
memory and go to the client with ``sendmsg``, or, once memory staging is full or
an instance is large, staged as files that go by ``os.sendfile``
(harmony.web.sendfile); with sendfile off (the TLS path) they are copied; a
client that stops reading holds the PACS back rather than Harmony's memory or
disk; one that leaves cancels the C-GET and frees staging.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from harmony.deid import generate_secret_file
from tests.dicom_data import make_instance, save
from tests.dicomweb_helpers import bridge_pipeline, client, in_thread
from tests.dimse_helpers import dataset_bytes, parse_multipart
from tests.harness import MINIMAL_MAIN, start_harmony, write_config
from tests.middleware.test_dicomweb_bridge import MOVE_PIPES, bridge_pipes
from tests.peers import free_port
from tests.test_client_aborts import until

STUDY = "1.2.826.0.1.3680043.10.543.78"
ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
INSTANCES = 30
MAX_STAGED_MB = 2


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bridge-study")
    return [save(make_instance(patient_id="BRIDGEGET", study_uid=STUDY, series_uid=f"{STUDY}.1",
                               sop_uid=f"{STUDY}.1.{n}", instance_number=n, rows=512, cols=512, seed=n),
                 folder / f"{n}.dcm") for n in range(1, INSTANCES + 1)]


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, study):
    """An Orthanc of its own: the large study must not show in other tests' queries of the shared one."""
    from tests.peers import Orthanc
    server = Orthanc(tmp_path_factory.mktemp("bridge-orthanc")).start()
    server.add_modality("harmony_dw", "HARMONY_DW", free_port())
    server.upload(study)
    yield server
    server.stop()


#: The same PACS without the bridge: dicom_scu's own HTTP rendering of a C-GET (JSON request, multipart answer).
DIMSE_OVER_HTTP = """
[pipelines.q]
networks = ["default"]
endpoints = ["q"]
backends = ["plain_pacs"]
[endpoints.q]
service = "http"
[endpoints.q.options]
path_prefix = "/q"
[backends.plain_pacs]
service = "dicom_scu"
[backends.plain_pacs.options]
aet = "{aet}"
host = "127.0.0.1"
port = {port}
local_aet = "HARMONY_DW"
"""


#: The same PACS behind the ``deidentify`` middleware, reached both ways: dicom_scu's HTTP
#: rendering (``/d``, re-rendered by the middleware from its de-identified stream) and WADO-RS
#: through the bridge (``/deid-dicomweb``; the bridge reads the middleware's stream).
DEID_PIPES = DIMSE_OVER_HTTP.replace("pipelines.q]", "pipelines.d]").replace('["q"]', '["d"]').replace(
    "endpoints.q", "endpoints.d").replace('"/q"', '"/d"').replace("plain_pacs", "deid_pacs").replace(
    'backends = ["deid_pacs"]', 'middleware = ["deid"]\nbackends = ["deid_pacs"]') \
    + bridge_pipeline("deidweb", "deid_pacs", "/deid-dicomweb").replace(
        'middleware = ["deidweb_bridge"]', 'middleware = ["deidweb_bridge", "deid"]') + """
[middleware.deid]
service = "deidentify"
[middleware.deid.options]
secret_file = "deid.key"
"""

#: JMIX envelopes of the same PACS's studies (``jmix_builder`` draining dicom_scu's C-GET).
JMIX_PIPES = """
[pipelines.jx]
networks = ["default"]
endpoints = ["jx"]
middleware = ["jmix_builder"]
backends = ["plain_pacs"]
[endpoints.jx]
service = "jmix"
[endpoints.jx.options]
path_prefix = "/jx"
"""


@pytest.fixture(scope="module")
def harmony(tmp_path_factory, pacs):
    folder = tmp_path_factory.mktemp("bridge-retrieve")
    pipes = bridge_pipes().format(aet=pacs.aet, port=pacs.dicom_port) + f"max_staged_mb = {MAX_STAGED_MB}\n"
    path = write_config(folder, MINIMAL_MAIN + '\n[storage.options]\npath = "var"\n',
                        {"p": pipes, "q": DIMSE_OVER_HTTP.format(aet=pacs.aet, port=pacs.dicom_port),
                         "d": DEID_PIPES.format(aet=pacs.aet, port=pacs.dicom_port), "jx": JMIX_PIPES})
    generate_secret_file(folder / "pipelines" / "deid.key")  # relative to the pipeline file
    running = pytest_twisted.blockon(start_harmony(path))
    yield running
    pytest_twisted.blockon(running.stop())


@pytest.fixture(scope="module")
def harmony_move(tmp_path_factory, pacs):
    """The same bridge fetching with C-MOVE to its own store SCP (``dimse_retrieve_mode = "move"``)."""
    folder = tmp_path_factory.mktemp("bridge-retrieve-move")
    store_port = free_port()
    pacs.add_modality("harmony_mv", "HARMONY_MV", store_port)
    pipes = MOVE_PIPES.format(aet=pacs.aet, port=pacs.dicom_port, store_port=store_port) \
        + f"max_staged_mb = {MAX_STAGED_MB}\n"
    path = write_config(folder, MINIMAL_MAIN + '\n[storage.options]\npath = "var"\n', {"p": pipes})
    running = pytest_twisted.blockon(start_harmony(path))
    yield running
    pytest_twisted.blockon(running.stop())


@pytest.fixture(params=["get", "move"])
def any_mode(request):
    """The bridge fetching with C-GET, then the one fetching with C-MOVE."""
    return request.getfixturevalue("harmony" if request.param == "get" else "harmony_move")


def _jobs(backend) -> list:
    """The retrieves in flight (C-GET on its association, or C-MOVE to the store SCP)."""
    return list(backend._gets.values()) + list(backend._moves.values())


def _backend(harmony):
    return harmony.service.runtime.backends["bridge_pacs"]


def _staged_bytes(backend) -> int:
    """Bytes of retrieved instances Harmony holds: staged files, and instances held in
    memory and queued for a consumer."""
    files = sum(f.stat().st_size for f in backend.retrieve_staging.base.rglob("*") if f.is_file())
    return files + sum(item.size for job in _jobs(backend) for item in job.stream._items
                       if getattr(item, "data", None) is not None)


def _by_uid(parts: list[bytes]) -> dict:
    from pydicom import dcmread
    import io
    return {dcmread(io.BytesIO(p), stop_before_pixels=True).SOPInstanceUID: p for p in parts}


def _assert_whole_study(parts: list[bytes], study) -> None:
    """Every instance of the study, each data set byte for byte the file given to the PACS
    (the file meta is Harmony's own, as any C-GET receiver's is)."""
    got = _by_uid(parts)
    assert sorted(got) == sorted(f"{STUDY}.1.{n}" for n in range(1, INSTANCES + 1))
    for n, path in enumerate(study, start=1):
        assert dataset_bytes(got[f"{STUDY}.1.{n}"]) == dataset_bytes(path), n


async def _retrieve_ended(backend):
    target = backend.target_pool.targets[0]
    await until(lambda: target.in_flight == 0 and not _jobs(backend), "the retrieve ended", timeout=20)
    await until(lambda: _staged_bytes(backend) == 0, "the staged instances were released")
    # Never the PACS's fault.
    assert (target.failures_total, target.last_error, target.circuit) == (0, None, "closed"), target.state(0)


async def _curl_study(harmony, tmp_path) -> list[bytes]:
    out = tmp_path / "body"
    done = await in_thread(subprocess.run, ["curl", "-sS", "-o", str(out), "-D", str(tmp_path / "head"),
                                            "-w", "%{http_code}", "-H", f"Accept: {ACCEPT}",
                                            harmony.url(f"/dicomweb/studies/{STUDY}")],
                           capture_output=True, text=True, timeout=60)
    assert done.stdout == "200", done.stderr
    ctype = next(line.split(":", 1)[1].strip() for line in (tmp_path / "head").read_text().splitlines()
                 if line.lower().startswith("content-type:"))
    return parse_multipart(out.read_bytes(), ctype)


@pytest_twisted.ensureDeferred
async def test_dicomweb_client_and_curl_get_every_instance_from_memory(harmony, study, tmp_path):
    """dicomweb-client and curl retrieve the study through the bridge: every instance, its
    data set byte-identical; the instances were staged in memory (no staging file) and
    sent with ``sendmsg``; nothing is held once the answer is out."""
    from harmony.web import sendfile
    backend = _backend(harmony)
    before, spliced = sendfile.sent_from_memory_total, sendfile.spliced_total
    got = await in_thread(client(harmony.url("/dicomweb")).retrieve_study, STUDY,
                          media_types=[("application/dicom", "*")])
    assert sorted(d.SOPInstanceUID for d in got) == sorted(f"{STUDY}.1.{n}" for n in range(1, INSTANCES + 1))
    # Harmony's file meta is a little longer than pydicom's.
    assert sendfile.sent_from_memory_total - before >= sum(p.stat().st_size for p in study)
    await _retrieve_ended(backend)

    before = sendfile.sent_from_memory_total
    parts = await _curl_study(harmony, tmp_path)
    _assert_whole_study(parts, study)
    assert sendfile.sent_from_memory_total - before == sum(len(p) for p in parts)
    assert sendfile.spliced_total == spliced
    await _retrieve_ended(backend)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("full,instance_cap", [(True, None), (False, 100_000)])
async def test_staged_files_go_by_sendfile(harmony, study, tmp_path, monkeypatch, full, instance_cap):
    """Memory staging full (as if 8 MiB were queued), or instances over the in-memory
    size cap (spilt to a file mid-instance): the instances are staged as files and go
    by ``os.sendfile``, byte-identical; staging is empty once the answer is out."""
    from harmony.backends import dicom_scu
    from harmony.web import sendfile
    if full:
        monkeypatch.setattr(dicom_scu, "MEMORY_STAGING_BYTES", 0)
    else:
        monkeypatch.setattr(dicom_scu, "MEMORY_INSTANCE_BYTES", instance_cap)
    before, memory = sendfile.spliced_total, sendfile.sent_from_memory_total
    parts = await _curl_study(harmony, tmp_path)
    _assert_whole_study(parts, study)
    assert sendfile.spliced_total - before == sum(len(p) for p in parts)
    assert sendfile.sent_from_memory_total == memory
    await _retrieve_ended(_backend(harmony))


@pytest_twisted.ensureDeferred
async def test_gzip_asked_head_and_the_copying_path(harmony, study, monkeypatch):
    """A client asking for gzip gets the instances as they are (DICOM files are never
    gzipped, harmony.web.coding.compressible), not copied; with sendfile off
    (``HARMONY_SENDFILE=0``, the path TLS takes too) the same bytes are copied; HEAD
    sends no body.  Nothing stays staged any time."""
    from harmony.web import sendfile
    backend = _backend(harmony)
    url = harmony.url(f"/dicomweb/studies/{STUDY}")
    before = sendfile.sent_from_memory_total
    r = await treq.get(url, headers={"Accept": [ACCEPT], "Accept-Encoding": ["gzip"]})
    assert r.code == 200
    parts = parse_multipart(await r.content(), r.headers.getRawHeaders("content-type")[0])
    _assert_whole_study(parts, study)
    assert sendfile.sent_from_memory_total - before == sum(len(p) for p in parts)
    await _retrieve_ended(backend)

    monkeypatch.setenv("HARMONY_SENDFILE", "0")
    before = sendfile.spliced_total + sendfile.sent_from_memory_total
    r = await treq.get(url, headers={"Accept": [ACCEPT]})
    assert r.code == 200
    _assert_whole_study(parse_multipart(await r.content(), r.headers.getRawHeaders("content-type")[0]), study)
    assert sendfile.spliced_total + sendfile.sent_from_memory_total == before
    await _retrieve_ended(backend)
    monkeypatch.delenv("HARMONY_SENDFILE")

    r = await treq.request("HEAD", url, headers={"Accept": [ACCEPT]})
    assert r.code == 200 and await r.content() == b""
    assert sendfile.spliced_total + sendfile.sent_from_memory_total == before
    await _retrieve_ended(backend)


class _RawClient(protocol.Protocol):
    """A plain HTTP/1.1 GET whose reading the test stops, resumes or cuts."""

    def __init__(self, path: str, body: bytes | None = None, accept: str = ACCEPT):
        self.path = path
        self.body = body  # a POST of this JSON body instead of a GET
        self.accept = accept
        self.received = bytearray()
        self.first = defer.Deferred()
        self.closed = defer.Deferred()

    def connectionMade(self):
        # A small receive buffer: the kernel must not hold the study for a client that stops reading.
        self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        if self.body is None:
            head = f"GET {self.path} HTTP/1.1\r\nAccept: {self.accept}\r\n"
        else:
            head = (f"POST {self.path} HTTP/1.1\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(self.body)}\r\n")
        self.transport.write(f"{head}Host: 127.0.0.1\r\nConnection: close\r\n\r\n".encode() + (self.body or b""))

    def dataReceived(self, data):
        self.received += data
        if not self.first.called and len(self.received) > 1024 * 1024:
            self.first.callback(None)

    def connectionLost(self, reason):
        self.closed.callback(None)


async def _raw_get(harmony, path=f"/dicomweb/studies/{STUDY}", body=None) -> _RawClient:
    raw = _RawClient(path, body)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", harmony.port()), raw)
    return raw


def _body_parts(raw: _RawClient) -> list[bytes]:
    head, _, body = bytes(raw.received).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 200"), lines[0]
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    assert headers.get("transfer-encoding") == "chunked"
    return parse_multipart(_unchunk(body), headers["content-type"])


def _unchunk(body: bytes) -> bytes:
    out, offset = bytearray(), 0
    while True:
        end = body.index(b"\r\n", offset)
        size = int(body[offset:end].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += body[end + 2:end + 2 + size]
        offset = end + 2 + size + 2


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_holds_the_pacs_back_not_harmony(harmony, study):
    """An HTTP client stops reading after its first megabyte: Harmony stages at most
    ``max_staged_mb`` of what the PACS sends, then holds the PACS back by not answering
    its next C-STORE sub-operation.  Once the client reads again, every instance
    arrives whole.  (That the sendfile body buffers nothing in Python is
    tests/web/test_sendfile.py's slow-reader test.)"""
    backend = _backend(harmony)
    instance_bytes = study[0].stat().st_size
    raw = await _raw_get(harmony)
    try:
        await raw.first
        raw.transport.pauseProducing()
        await until(lambda: any(job.stream.queued_bytes >= job.stream.limit for job in backend._gets.values()),
                    "Harmony is holding the PACS back")
        staged = _staged_bytes(backend)
        # The limit (crossed by a whole instance), the one that landed when it was reached
        # (its answer waits), and the one being sent to the stopped client.
        assert staged <= MAX_STAGED_MB * 1024 * 1024 + 3 * instance_bytes, staged
        assert staged < INSTANCES * instance_bytes / 3
        raw.transport.resumeProducing()
        await raw.closed
    finally:
        raw.transport.abortConnection()
    _assert_whole_study(_body_parts(raw), study)
    await _retrieve_ended(backend)


def _client_aborts(harmony, backend="bridge_pacs") -> tuple[int, str]:
    """The PACS target's client-abort count, as the target and as /metrics say it."""
    target = harmony.service.runtime.backends[backend].target_pool.targets[0]
    line = next(line for line in harmony.service.metrics.text().decode().splitlines()
                if line.startswith(f'harmony_target_client_aborts_total{{backend="{backend}"'))
    return target.client_aborts_total, line.rsplit(" ", 1)[1]


def _jobs_answered(backend, monkeypatch) -> list:
    """The backend's retrieve jobs as it answers them (instrumentation of the real backend)."""
    jobs: list = []
    original = backend.respond

    def respond(job):
        jobs.append(job)
        return original(job)
    monkeypatch.setattr(backend, "respond", respond)
    return jobs


async def _hang_up(raw: _RawClient) -> None:
    raw.transport.abortConnection()
    await raw.closed
    assert len(raw.received) < INSTANCES * 512 * 512, "the client had the whole study: it did not leave mid-body"


@pytest_twisted.ensureDeferred
async def test_a_client_leaving_mid_study_cancels_upstream_and_frees_staging(any_mode, monkeypatch):
    """The HTTP client hangs up after its first megabyte: the C-GET (or C-MOVE) is cancelled
    upstream (C-CANCEL; Orthanc ends it), every staged instance is released, and the PACS is
    not blamed for the client leaving: one client abort (nginx's 499), no failure."""
    harmony = any_mode
    backend = _backend(harmony)
    jobs = _jobs_answered(backend, monkeypatch)
    aborts, _ = _client_aborts(harmony)
    raw = await _raw_get(harmony)
    await raw.first
    raw.transport.pauseProducing()
    await until(lambda: any(job.stream.queued_bytes > 0 for job in _jobs(backend)), "instances are staged")
    await _hang_up(raw)
    await _retrieve_ended(backend)
    (job,) = jobs
    _assert_cancelled_and_released(job)
    assert _client_aborts(harmony) == (aborts + 1, f"{aborts + 1}.0")


def _assert_cancelled_and_released(job) -> None:
    """Cancelled before the PACS ended it, and the instances held in memory were taken and released too."""
    assert job.stream.cancelled and job.stream.completed < INSTANCES
    assert not job.stream._items and job.stream.queued_bytes == 0


async def _leave_once_the_pacs_finished(harmony, backend, monkeypatch, path=f"/dicomweb/studies/{STUDY}", body=None,
                                       also=None):
    """A retrieve with room to stage the whole study, so the PACS finishes first; the client
    hangs up mid-body once it has (and once *also* holds).  Every staged instance must be released."""
    monkeypatch.setattr(backend, "max_staged_bytes", 64 << 20)
    jobs = _jobs_answered(backend, monkeypatch)
    raw = await _raw_get(harmony, path, body)
    await raw.first
    raw.transport.pauseProducing()
    await until(lambda: jobs and jobs[0].stream.done, "the PACS sent the whole study", timeout=20)
    (job,) = jobs
    assert job.stream.status == 0 and job.stream.completed == INSTANCES
    if also is not None:
        await until(also, "what else must be done before the client leaves", timeout=20)
    await _hang_up(raw)
    await _retrieve_ended(backend)
    assert not job.stream._items and job.stream.queued_bytes == 0
    assert not any(f.is_file() for f in backend.retrieve_staging.base.rglob("*"))


@pytest_twisted.ensureDeferred
async def test_a_client_leaving_after_the_pacs_finished_is_a_client_abort(any_mode, monkeypatch):
    """The PACS has sent the whole study (staged, as memory staging allows, then as files)
    and the HTTP client hangs up mid-body: nothing is left to cancel upstream, every staged
    instance is released, and it is counted as a client abort, never a PACS failure.
    (Before the fix the bridge cancelled the ended stream before the endpoint heard the
    client had gone, so the abort went uncounted.)"""
    aborts, _ = _client_aborts(any_mode)
    await _leave_once_the_pacs_finished(any_mode, _backend(any_mode), monkeypatch)
    assert _client_aborts(any_mode) == (aborts + 1, f"{aborts + 1}.0")


@pytest_twisted.ensureDeferred
async def test_dicom_scu_over_http_counts_a_client_leaving_after_the_pacs_finished(harmony, monkeypatch):
    """The same without the bridge: an HTTP client POSTs a C-GET to ``dicom_scu`` (its own
    multipart rendering), the PACS sends the whole study, and the client hangs up mid-body:
    one client abort, no failure, every staged file deleted (before: the abort went
    uncounted, and the instance being written stayed staged)."""
    aborts, _ = _client_aborts(harmony, "plain_pacs")
    ask = {"dimse_op": "C-GET", "query_level": "STUDY", "identifier": {"0020000D": {"vr": "UI", "Value": [STUDY]}}}
    await _leave_once_the_pacs_finished(harmony, harmony.service.runtime.backends["plain_pacs"], monkeypatch,
                                        "/q", json.dumps(ask).encode())
    assert _client_aborts(harmony, "plain_pacs") == (aborts + 1, f"{aborts + 1}.0")


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("path", ["/d", f"/deid-dicomweb/studies/{STUDY}"])
async def test_a_client_leaving_deidentified_instances_after_the_pacs_finished(harmony, monkeypatch, path):
    """Through the ``deidentify`` middleware: the PACS has sent the whole study, and the
    HTTP client hangs up mid-body, on dicom_scu's HTTP rendering (which the middleware
    re-renders from its de-identified copy of the stream) and on WADO-RS through the
    bridge (which reads that copy).  One client abort, no PACS failure, and nothing left
    staged by the backend or the middleware.  (Before the fix the abort went uncounted:
    the copy's cancel never reached the backend's ended stream, and the re-rendered body
    did not mark the request client-gone.)"""
    aborts, _ = _client_aborts(harmony, "deid_pacs")
    deid = harmony.service.runtime.middleware["deid"]
    before = deid.counts["deidentified"]
    ask = {"dimse_op": "C-GET", "query_level": "STUDY", "identifier": {"0020000D": {"vr": "UI", "Value": [STUDY]}}}
    # The client leaves once the middleware, too, has taken the PACS's last instance and
    # ended its copy of the stream: only what is queued for the client is left.
    await _leave_once_the_pacs_finished(harmony, harmony.service.runtime.backends["deid_pacs"], monkeypatch,
                                        path, json.dumps(ask).encode() if path == "/d" else None,
                                        also=lambda: deid.counts["deidentified"] == before + INSTANCES)
    await until(lambda: not any(f.is_file() for f in deid.staging.folder.rglob("*")),
                "the de-identified copies were released")
    assert _client_aborts(harmony, "deid_pacs") == (aborts + 1, f"{aborts + 1}.0")


async def _pooled_association(harmony) -> None:
    """Leave an idle association to the PACS in the pool, so that a C-GET goes out even
    while the PACS is frozen (no A-ASSOCIATE-AC needed)."""
    r = await treq.get(harmony.url(f"/dicomweb/studies/{STUDY}/series/{STUDY}.1/instances/{STUDY}.1.1"),
                       headers={"Accept": [ACCEPT]})
    assert r.code == 200
    await r.content()
    await _retrieve_ended(_backend(harmony))


@pytest_twisted.ensureDeferred
async def test_a_client_leaving_before_the_first_instance(harmony, pacs):
    """The HTTP client hangs up while the PACS has not sent anything yet (Orthanc frozen
    with the C-GET on its socket): C-CANCEL goes out, whatever the PACS still sends is
    released, and it is a client abort, never a PACS failure."""
    backend = _backend(harmony)
    await _pooled_association(harmony)
    aborts, _ = _client_aborts(harmony)
    os.kill(pacs.proc.pid, signal.SIGSTOP)
    try:
        raw = await _raw_get(harmony)
        await until(lambda: backend._gets, "the C-GET is sent")
        job = next(iter(backend._gets.values()))
        raw.transport.abortConnection()
        await raw.closed
        await until(lambda: job.cancel_requested.called, "C-CANCEL is sent")
    finally:
        os.kill(pacs.proc.pid, signal.SIGCONT)
    await _retrieve_ended(backend)
    # The PACS sent at least its first sub-operation after the C-CANCEL (DCMTK-based Orthanc
    # reads it between sub-operations), into a stream no one reads; before the fix it stayed there.
    assert job.items >= 1 and job.stream.cancelled
    assert not job.stream._items and job.stream.queued_bytes == 0
    assert _client_aborts(harmony) == (aborts + 1, f"{aborts + 1}.0")


@pytest_twisted.ensureDeferred
async def test_an_instance_converted_while_the_client_leaves_is_released_after_the_conversion(tmp_path,
                                                                                             monkeypatch):
    """A client that asked for Explicit VR Little Endian leaves while the first instance is
    being converted on a thread (the pipeline is cancelled before the head): the answer
    is cancelled at once (a cancel, not a 406) and the retrieve given up, but the instance
    is released, and the converted copy deleted, only once the thread is done with them
    (before: released under the thread's feet, and a copy that finished was left in the
    bridge's storage)."""
    import threading
    import types

    from harmony.dicom import transfer
    from harmony.dicom.results import DicomInstance, ResultStream
    from harmony.middleware.dicomweb_bridge import DicomWebBridge
    from pydicom.uid import ImplicitVRLittleEndian
    from tests.memory import failure_of

    go, outcome = threading.Event(), []
    real_copy = transfer.explicit_copy

    def held_copy(path, folder):
        assert go.wait(SAFETY_SECS)
        try:
            outcome.append(real_copy(path, folder))
        except Exception as e:
            outcome.append(e)
            raise
        return outcome[-1]
    monkeypatch.setattr(transfer, "explicit_copy", held_copy)
    source = save(make_instance(study_uid=STUDY, sop_uid=f"{STUDY}.9.1"), tmp_path / "staged" / "1.dcm")
    item = DicomInstance(source, sop_instance_uid=f"{STUDY}.9.1", study_instance_uid=STUDY,
                         transfer_syntax_uid=ImplicitVRLittleEndian, owned=True)
    bridge = DicomWebBridge("bridge", reactor, tmp_path / "bridge")
    dw = types.SimpleNamespace(base_url="http://harmony.test/dicomweb", study_uid=STUDY, series_uid=None,
                               transfer_syntax=None)
    stream = ResultStream()
    stream.put(item)
    stream.finish()
    answer = bridge._retrieve_response(None, dw, stream)
    try:
        answer.cancel()
        failure_of(answer, defer.CancelledError)
        assert stream._given_up
        assert source.exists(), "released while the conversion still reads it"
    finally:
        go.set()
    await until(lambda: outcome and not source.exists(), "the conversion ends and the instance is released")
    assert isinstance(outcome[0], str), outcome[0]
    await until(lambda: not os.path.exists(outcome[0]), "the unsent converted copy is deleted")


@pytest_twisted.ensureDeferred
async def test_a_client_leaving_a_jmix_build_while_the_study_arrives(harmony, pacs, monkeypatch):
    """A JMIX client hangs up while ``jmix_builder`` is taking the study from the PACS
    (Orthanc frozen once the first instance is in, the C-GET still running): the C-GET
    is cancelled (C-CANCEL), what the PACS still sends is released, and it is a client
    abort, never a PACS failure.  (Before the fix the builder let the retrieve run on
    into a stream no one read: no C-CANCEL, no abort counted.)"""
    backend = harmony.service.runtime.backends["plain_pacs"]
    aborts, _ = _client_aborts(harmony, "plain_pacs")
    jobs: list = []
    original = backend.respond

    def respond(job):
        # The backend answers at the PACS's first instance: the study is still on its way.
        os.kill(pacs.proc.pid, signal.SIGSTOP)
        jobs.append(job)
        return original(job)
    monkeypatch.setattr(backend, "respond", respond)
    try:
        raw = _RawClient(f"/jx/api/jmix?studyInstanceUid={STUDY}", accept="*/*")
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", harmony.port()), raw)
        await until(lambda: jobs, "the PACS sends the study")
        (job,) = jobs
        assert not job.stream.done
        await _hang_up(raw)
        await until(lambda: job.cancel_requested.called, "C-CANCEL is sent")
    finally:
        os.kill(pacs.proc.pid, signal.SIGCONT)
    await _retrieve_ended(backend)
    _assert_cancelled_and_released(job)
    assert not any(f.is_file() for f in backend.retrieve_staging.base.rglob("*"))
    assert _client_aborts(harmony, "plain_pacs") == (aborts + 1, f"{aborts + 1}.0")

SAFETY_SECS = 20.0


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("others", [1, 0])
async def test_a_client_leaving_a_shared_metadata_fetch_does_not_fail_the_others(harmony, pacs, others,
                                                                                 monkeypatch):
    """Two clients ask for the same series' metadata; the second waits on the first one's
    fetch (identical fetches are collapsed).  The first hangs up before the PACS answers:
    the second still gets the whole metadata (it got the first one's 499 before), and as
    the fetch went on, nothing is counted.  Alone, the first one's leaving cancels the
    fetch: one client abort.  Never a PACS failure."""
    backend = _backend(harmony)
    bridge = harmony.service.runtime.middleware["bridge"]
    path = f"/dicomweb/studies/{STUDY}/series/{STUDY}.1/metadata"
    key = f"metadata::/studies/{STUDY}/series/{STUDY}.1"
    await _pooled_association(harmony)
    monkeypatch.setattr(bridge.cache, "ttl", 0)  # every run fetches: nothing is cached
    aborts, _ = _client_aborts(harmony)
    os.kill(pacs.proc.pid, signal.SIGSTOP)
    try:
        first = _RawClient(path, accept="application/dicom+json")
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", harmony.port()), first)
        await until(lambda: backend._gets, "the C-GET is sent")
        if others:
            second = treq.get(harmony.url(path), headers={"Accept": ["application/dicom+json"]})
            await until(lambda: bridge.cache.waiting(key), "the second client waits on the first one's fetch")
        first.transport.abortConnection()
        await first.closed
    finally:
        os.kill(pacs.proc.pid, signal.SIGCONT)
    if others:
        answer = await second
        body = await answer.content()
        assert answer.code == 200, body
        assert len(json.loads(body)) == INSTANCES
    await _retrieve_ended(backend)
    assert _client_aborts(harmony) == (aborts + 1 - others, f"{aborts + 1 - others}.0")
