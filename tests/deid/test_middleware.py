"""The ``deidentify`` middleware on real paths:

- DCMTK ``storescu`` -> ``dicom_scp`` -> deidentify -> ``store_forward`` -> ``dicom_scu`` -> a real Orthanc:
  what arrives carries no original identifier anywhere in Orthanc's stored bytes; a US instance is
  quarantined (never forwarded, listed for operators);
- dicomweb-client -> ``dicomweb`` endpoint -> ``dicomweb_bridge`` -> deidentify -> ``local_archive`` holding
  originals: QIDO-RS answers carry the same pseudonymous UIDs and Patient ID as the instances WADO-RS
  returns for them, a query on a real name finds nothing, and a JMIX envelope of the study (``jmix`` ->
  ``jmix_builder`` -> deidentify) holds only de-identified instances.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytest_twisted
import treq
from pydicom import dcmread
from twisted.internet import threads

from harmony.deid import Keyring, generate_secret_file, read_secret
from harmony.jmix import VerifyOptions, open_envelope
from harmony.jmix.store import EnvelopeStore
from harmony.middleware.deidentify import DeidentifyCollector, QuarantineResource, quarantine_report
from harmony.state import ResponseState
from tests.deid.synthetic import PATIENT_ID, full_instance, simple_instance
from tests.dicomweb_helpers import bridge_pipeline, client, in_thread
from tests.harness import MINIMAL_MAIN, listen, start_harmony, write_config
from tests.peers import Orthanc, Storescp, free_port
from tests.sf_helpers import dimse_toml
from tests.endpoints.test_dicom_scp_peers import SCP_AET, find, run

ROOT = "1.2.826.0.1.3680043.9999.77."
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"


def deid_toml(name="deid", extra="") -> str:
    return f"""
[middleware.{name}]
service = "deidentify"
[middleware.{name}.options]
secret_file = "deid.key"
retain_longitudinal = "modified"
{extra}
"""


#: Harmony's store under the config folder (what store_forward and local_archive use).
STORE = """
[storage.options]
path = "store"
min_free_mb = 0
"""
ARCHIVE = STORE + """
[backends.archive]
service = "local_archive"
"""


def upstream_toml(orthanc) -> str:
    """A ``dicomweb`` backend ``upstream`` on *orthanc*'s DICOMweb plugin."""
    return STORE + f"""
[backends.upstream]
service = "dicomweb"
[backends.upstream.options]
base_url = "{orthanc.dicomweb_url}"
"""


def dimse_via_deid(scp_port: int, backend: str, pacs_aet: str = "UNUSED", pacs_port: int = 1, **kw) -> str:
    """:func:`dimse_toml` (``dicom_scp`` -> *backend*) with the ``deid`` middleware in the pipeline."""
    return dimse_toml(scp_port, backend, pacs_aet, pacs_port, **kw).replace(
        f'backends = ["{backend}"]', f'middleware = ["deid"]\nbackends = ["{backend}"]')


def bridge_via_deid(backend: str) -> str:
    """:func:`bridge_pipeline` (``dicomweb`` endpoint -> bridge -> *backend*) with ``deid`` after the bridge."""
    return bridge_pipeline("web", backend).replace('middleware = ["web_bridge"]', 'middleware = ["web_bridge", "deid"]')


async def orthanc_holding(folder: Path, files) -> Orthanc:
    orthanc = Orthanc(folder)
    await threads.deferToThread(orthanc.start)
    await threads.deferToThread(orthanc.upload, files)
    return orthanc


def write_inputs(folder: Path) -> tuple[list[Path], list[str], Path]:
    """Three instances of one study (one carrying every table attribute) and a US image."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = ROOT + "1", ROOT + "1.1"
    files = []
    full = full_instance()
    full.StudyInstanceUID, full.SeriesInstanceUID, full.SOPInstanceUID = study, series, ROOT + "1.1.1"
    full.file_meta.MediaStorageSOPInstanceUID = full.SOPInstanceUID
    for i, ds in enumerate([full, simple_instance(study, series, ROOT + "1.1.2"),
                            simple_instance(study, series, ROOT + "1.1.3")]):
        path = folder / f"in{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    us = folder / "us.dcm"
    simple_instance(study, ROOT + "1.2", ROOT + "1.2.1", modality="US", sop_class=US_IMAGE).save_as(
        us, enforce_file_format=True)
    identifiers = [PATIENT_ID, "DOE^JOHN", "SECRET", study, series, ROOT + "1.1.1", ROOT + "1.1.2", "20190314",
                   "19610203", "ACC-SECRET-77"]
    return files, identifiers, us


@pytest_twisted.ensureDeferred
async def test_store_forward_to_orthanc_leaves_no_identifier_in_its_files(tmp_path):
    orthanc = Orthanc(tmp_path / "orthanc")
    await threads.deferToThread(orthanc.start)
    scp_port = free_port()
    cfg = write_config(tmp_path / "h", MINIMAL_MAIN + STORE + """
[backends.sf]
service = "store_forward"
[backends.sf.options]
forward_to = ["pacs"]
""" + dimse_via_deid(scp_port, "sf", orthanc.aet, orthanc.dicom_port) + deid_toml())
    generate_secret_file(tmp_path / "h" / "deid.key")
    files, identifiers, us = write_inputs(tmp_path / "in")
    harmony = await start_harmony(cfg)
    try:
        r = await run("storescu", "-v", "-aec", SCP_AET, "127.0.0.1", scp_port, *files, us)
        assert r.returncode == 0, r.stderr
        assert r.stderr.count(b"Received Store Response (Success)") == 4, r.stderr
        forward = harmony.service.runtime.backends["sf"].forward
        await forward.idle()
        assert (await forward.stats())["pacs"]["delivered"] == 3
        stored = list((tmp_path / "orthanc" / "storage").rglob("*"))
        blobs = [p.read_bytes() for p in stored if p.is_file() and not p.name.startswith("index")]
        assert len(blobs) >= 3
        for value in identifiers:
            assert not any(value.encode() in b for b in blobs), f"{value!r} reached Orthanc"
        # ... nor in Harmony's own store-and-forward spool; only the quarantine keeps an original, for review
        spool = [p for p in (tmp_path / "h" / "store").rglob("*.dcm") if "deidentify" not in p.parts]
        assert len(spool) == 3
        assert not [p for p in spool if PATIENT_ID.encode() in p.read_bytes() or b"SECRET" in p.read_bytes()]
        (held_back,) = (tmp_path / "h" / "store" / "deidentify" / "deid" / "quarantine").rglob("*.dcm")
        assert dcmread(held_back).Modality == "US"
        keys = Keyring(read_secret(tmp_path / "h" / "deid.key"))
        held = await threads.deferToThread(lambda: orthanc.rest("GET", "/instances?expand"))
        assert sorted(i["MainDicomTags"]["SOPInstanceUID"] for i in held) == sorted(
            keys.uid(ROOT + f"1.1.{n}") for n in (1, 2, 3))
        admin = listen(QuarantineResource(lambda: harmony.service.runtime))
        try:
            r = await treq.get(f"http://127.0.0.1:{admin.getHost().port}/?limit=10")
            report = json.loads(await r.content())
        finally:
            await admin.stopListening()
        assert report == await threads.deferToThread(quarantine_report, harmony.service.runtime)
        assert report["deid"]["counts"] == {"deidentified": 3, "quarantined": 1}
        (item,) = report["deid"]["quarantined"]
        assert item["reason"] == "modality US" and item["pseudonymous_sop_instance_uid"] == keys.uid(ROOT + "1.2.1")
        collector = DeidentifyCollector(lambda: harmony.service.runtime)
        metrics = {tuple(s.labels.values()): s.value for fam in collector.collect() for s in fam.samples
                   if s.name == "harmony_deidentify_instances_total"}
        assert metrics[("deid", "quarantined")] == 1
    finally:
        await harmony.stop()
        await threads.deferToThread(orthanc.stop)


@pytest_twisted.ensureDeferred
async def test_qido_and_wado_answers_agree_and_identity_queries_find_nothing(tmp_path):
    folder = tmp_path / "h"
    cfg = write_config(folder, MINIMAL_MAIN + ARCHIVE + """
[pipelines.jmix]
networks = ["default"]
endpoints = ["jmix"]
middleware = ["jmix_builder", "deid"]
backends = ["archive"]

[endpoints.jmix]
service = "jmix"
[endpoints.jmix.options]
path_prefix = "/jx"
""" + bridge_via_deid("archive") + deid_toml())
    generate_secret_file(folder / "deid.key")
    files, identifiers, _ = write_inputs(tmp_path / "in")
    harmony = await start_harmony(cfg)
    try:
        store = harmony.service.runtime.backends["archive"].store
        for f in files:  # the archive holds the originals
            await store.put_file(f)
        web = client(harmony.url("/dicomweb"))
        studies = await in_thread(web.search_for_studies, search_filters={"PatientID": "*"})
        assert len(studies) == 1
        study = studies[0]
        pseudo_study = study["0020000D"]["Value"][0]
        assert pseudo_study.startswith("2.25.") and "PID-ALPHA" not in str(study) and "SECRET" not in str(study)
        instances = await in_thread(web.search_for_instances, study_instance_uid=pseudo_study)
        pseudo_sops = sorted(i["00080018"]["Value"][0] for i in instances)
        retrieved = await in_thread(web.retrieve_study, pseudo_study)
        assert sorted(ds.SOPInstanceUID for ds in retrieved) == pseudo_sops
        for ds in retrieved:
            assert ds.StudyInstanceUID == pseudo_study
            assert ds.PatientID == study["00100020"]["Value"][0]
            assert ds.PatientIdentityRemoved == "YES"
            raw = bytes(ds.PixelData) + str(ds).encode()
            assert not any(v.encode() in raw for v in identifiers)
        meta = await in_thread(web.retrieve_study_metadata, pseudo_study)
        assert sorted(m["00080018"]["Value"][0] for m in meta) == pseudo_sops
        # The archive keeps the originals' DICOM JSON (matches, metadata made at
        # ingest): none of it may pass the middleware (results_as is dropped there).
        assert not any(v in str(meta) or v in str(instances) for v in identifiers)
        # a query on identity is not answered by identity
        by_name = await in_thread(web.search_for_studies, search_filters={"PatientName": "DOE*"})
        assert all("DOE" not in str(s) for s in by_name)
        by_pseudonym = await in_thread(web.search_for_studies,
                                       search_filters={"PatientID": study["00100020"]["Value"][0]})
        assert [s["0020000D"]["Value"][0] for s in by_pseudonym] == [pseudo_study]
        # a JMIX envelope of the study, built from the de-identified instances
        resp = await treq.get(harmony.url(f"/jx/api/jmix?studyInstanceUid={pseudo_study}"))
        body = await resp.content()
        assert resp.code == 200, body
        (tmp_path / "e.zip").write_bytes(body)
        report = open_envelope(tmp_path / "e.zip", tmp_path / "open", VerifyOptions())
        assert report.ok, report.errors
        files = sorted((report.payload / "dicom").iterdir())
        assert sorted(f.name[:-4] for f in files) == pseudo_sops
        opened = [p.read_bytes() for p in (tmp_path / "open").rglob("*") if p.is_file()]
        for value in identifiers:
            assert not any(value.encode() in b for b in opened), f"{value!r} in the JMIX envelope"
    finally:
        await harmony.stop()
        EnvelopeStore.open(folder / "store" / "jmix").close()


def test_config_errors_name_their_keys(tmp_path):
    from harmony.config import ConfigErrors, load_config
    from harmony.runtime import build_runtime
    cfg = write_config(tmp_path, MINIMAL_MAIN + """
[backends.echo]
service = "echo"
[endpoints.e]
service = "http"
path_prefix = "/e"
[pipelines.p]
endpoints = ["e"]
middleware = ["deid"]
backends = ["echo"]
""" + deid_toml(extra='retain_longitudinal = "sometimes"\n'))
    with pytest.raises(ConfigErrors) as e:
        build_runtime(load_config(cfg))
    text = e.value.render()
    assert "secret_file" in text or "retain_longitudinal" in text


def test_pseudonym_map_survives_a_restart_and_is_shared(tmp_path):
    from harmony.middleware.deidentify import ReverseMap
    first = ReverseMap(tmp_path / "p.sqlite", cache_limit=2)
    for i in range(5):
        first.add(f"1.2.3.{i}", f"2.25.{i}")
    assert first.get("2.25.0") == "1.2.3.0"  # past the cache bound: read from the file
    other = ReverseMap(tmp_path / "p.sqlite")  # another worker process, or the next start
    assert other.get("2.25.4") == "1.2.3.4" and other.get("2.25.9") is None
    assert len(other) == 5
    first.close()
    other.close()


def test_staged_leftovers_of_failed_requests_are_swept(tmp_path):
    import os
    import time

    from harmony.deid import Deidentifier, PixelPolicy, Profile, ProfileOptions
    from harmony.middleware.deidentify import STAGED_MAX_AGE_SECS, Deidentify
    mw = Deidentify("d", Deidentifier(Profile(ProfileOptions()), Keyring(b"k" * 32)), PixelPolicy(), tmp_path)
    folder = mw.staging.ensure().folder
    old, fresh = folder / "old.dcm", folder / "fresh.dcm"
    old.write_bytes(b"x")
    fresh.write_bytes(b"x")
    now = time.time()
    os.utime(old, (now - STAGED_MAX_AGE_SECS - 10,) * 2)
    assert mw._sweep_staging(now) == 1
    assert not old.exists() and fresh.exists()
    assert mw._sweep_staging(now + 1) == 0  # not again before the sweep interval
    mw.close()


@pytest.mark.filterwarnings("ignore:End of file reached")  # the corrupt instance, on purpose
@pytest_twisted.ensureDeferred
async def test_retrieve_withholds_suspect_and_unreadable_instances_and_goes_on(tmp_path):
    """C-GET answer through the middleware (in process): a good instance comes out de-identified, a US
    instance is withheld (quarantine policy) and a corrupt one fails alone; status 0xB000, failed list."""
    from harmony.deid import Deidentifier, PixelPolicy, Profile, ProfileOptions
    from harmony.dicom.results import C_GET, DicomInstance, ResultStream
    from harmony.envelope import RequestEnvelope, ResponseEnvelope
    from harmony.middleware.deidentify import Deidentify
    keys = Keyring(b"k" * 32)
    mw = Deidentify("d", Deidentifier(Profile(ProfileOptions()), keys), PixelPolicy(), tmp_path / "mw")
    files, _, us = write_inputs(tmp_path / "in")
    bad = tmp_path / "in" / "bad.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 64)
    source = ResultStream()
    for path, sop in ((files[1], ROOT + "1.1.2"), (us, ROOT + "1.2.1"), (bad, ROOT + "9.9")):
        source.put(DicomInstance(path=path, sop_instance_uid=sop))
    source.finish(0x0000)
    request = RequestEnvelope(metadata={"dimse_op": C_GET})
    response = mw.on_response(request, ResponseEnvelope(state=ResponseState(dicom_results=source)))
    out = response.state.dicom_results
    items = await out.collect()
    assert [i.sop_instance_uid for i in items] == [keys.uid(ROOT + "1.1.2")]
    assert dcmread(items[0].path).PatientIdentityRemoved == "YES"
    assert out.status == 0xB000 and out.failed == 2
    assert sorted(out.failed_sop_uids) == sorted([keys.uid(ROOT + "1.2.1"), keys.uid(ROOT + "9.9")])
    assert mw.counts["withheld"] == 1 and mw.counts["failed"] == 1
    items[0].release()
    mw.close()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("ended", [False, True])
async def test_giving_up_the_deidentified_stream_gives_up_the_backends(tmp_path, ended):
    """A consumer that gives up the middleware's copy of a C-GET answer (an HTTP client
    that left mid-body) gives up the backend's stream too: with the PACS still sending,
    it is asked to stop (C-CANCEL), the pump stops de-identifying, and what the PACS
    still sends is released; with everything sent and de-identified (the copy has
    ended), the backend's stream is still marked given up, which is where the target
    pool counts a client abort.  Nothing stays staged either way.  (In process: the
    real-peer cases are in tests/middleware/test_dicomweb_bridge_retrieve.py.)"""
    import shutil

    from harmony.deid import Deidentifier, PixelPolicy, Profile, ProfileOptions
    from harmony.dicom.render import release_rest
    from harmony.dicom.results import C_GET, DicomInstance, ResultStream
    from harmony.envelope import RequestEnvelope, ResponseEnvelope
    from harmony.middleware.deidentify import Deidentify
    from tests.test_client_aborts import until

    mw = Deidentify("d", Deidentifier(Profile(ProfileOptions()), Keyring(b"k" * 32)), PixelPolicy(), tmp_path / "mw")
    files, _, _ = write_inputs(tmp_path / "in")
    staged: list[Path] = []

    def retrieved(n: int) -> DicomInstance:
        """A copy of an input as the backend stages it (deleted when released)."""
        path = shutil.copy(files[1], tmp_path / f"staged{n}.dcm")
        staged.append(Path(path))
        return DicomInstance(path=Path(path), sop_instance_uid=f"{ROOT}7.{n}", owned=True)

    cancels: list[None] = []
    source = ResultStream(on_cancel=lambda: cancels.append(None))
    abandoned = source.when_abandoned()
    for n in range(3):
        source.put(retrieved(n))
    if ended:
        source.finish(0x0000)
    response = mw.on_response(RequestEnvelope(metadata={"dimse_op": C_GET}),
                              ResponseEnvelope(state=ResponseState(dicom_results=source)))
    out = response.state.dicom_results
    first = await out.next()
    first.release()  # sent
    if ended:
        await until(lambda: out.done, "the middleware has de-identified the whole answer")
    out.cancel()  # the consumer gives up: what abandon_for_client does
    release_rest(out)
    assert source.given_up
    if not ended:
        assert cancels == [None], "the PACS was not asked to stop"
        for n in range(3, 6):  # what the PACS sends before it heard the C-CANCEL
            source.put(retrieved(n))
        source.finish(0xFE00)
        await until(lambda: out.done, "the pump stopped")
        assert mw.counts["deidentified"] <= 3, "what the PACS sent after the cancel was de-identified for no one"
    else:
        assert cancels == [], "nothing to cancel upstream: it had ended"
    assert abandoned.called, "the target pool would never hear the answer was abandoned"
    await until(lambda: not any(p.exists() for p in staged), "the backend's staged instances were released")
    await until(lambda: not any(f.is_file() for f in mw.staging.folder.rglob("*")),
                "the de-identified copies were released")
    mw.close()


@pytest_twisted.ensureDeferred
async def test_a_client_that_does_not_read_holds_the_retrieve_back_at_the_backends_limit(tmp_path):
    """A C-GET answer through the middleware whose consumer stops reading: the middleware takes the
    next instance from the backend only while its de-identified copies waiting for the client stay
    under the backend's staging limit (``dicom_scu``'s stream, ``max_staged_mb``), so the backend
    holds the PACS back and staging stays bounded; read one at a time, every instance arrives
    de-identified and in order.  (In process, with the backend's own stream type: what the PACS
    does meanwhile is ``dicom_scu``'s, proved in tests/backends/test_dicom_scu_peers.py.)"""
    from harmony.deid import Deidentifier, PixelPolicy, Profile, ProfileOptions
    from harmony.dicom.results import C_GET, BoundedResultStream, DicomInstance
    from harmony.envelope import RequestEnvelope, ResponseEnvelope
    from harmony.middleware.deidentify import Deidentify
    from tests.test_client_aborts import until

    keys = Keyring(b"k" * 32)
    mw = Deidentify("d", Deidentifier(Profile(ProfileOptions()), keys), PixelPolicy(), tmp_path / "mw")
    (tmp_path / "in").mkdir()
    study, series, count = ROOT + "5", ROOT + "5.1", 10
    sops = [f"{ROOT}5.1.{n}" for n in range(count)]
    paths = []
    for sop in sops:
        path = tmp_path / "in" / f"{sop}.dcm"
        simple_instance(study, series, sop).save_as(path, enforce_file_format=True)
        paths.append(path)
    size = paths[0].stat().st_size
    source = BoundedResultStream(limit=size * 5 // 2)
    for path, sop in zip(paths, sops):
        source.put(DicomInstance(path=path, sop_instance_uid=sop, size=path.stat().st_size))
    source.finish(0x0000)
    response = mw.on_response(RequestEnvelope(metadata={"dimse_op": C_GET}),
                              ResponseEnvelope(state=ResponseState(dicom_results=source)))
    out = response.state.dicom_results
    bound = source.limit + 2 * size  # the limit plus the instance that crossed it (de-identified, a little larger)

    def waiting_bytes() -> int:
        return sum(item.size for item in out.queued())

    def staged_bytes() -> int:
        return sum(f.stat().st_size for f in mw.staging.folder.rglob("*") if f.is_file())

    received = []
    while True:
        await until(lambda: waiting_bytes() >= source.limit or out.done, "the middleware took the next instances")
        assert waiting_bytes() <= bound and staged_bytes() <= bound, (
            f"{waiting_bytes()} bytes wait for a client that does not read (limit {source.limit})")
        if not received:
            assert source.pending > 0, "the middleware emptied the backend's stream for a client that does not read"
        item = await out.next()
        if item is None:
            break
        assert dcmread(item.path).PatientIdentityRemoved == "YES"
        received.append(item.sop_instance_uid)
        item.release()
    assert received == [keys.uid(sop) for sop in sops]
    assert out.status == 0x0000 and mw.counts["deidentified"] == count
    assert not any(f.is_file() for f in mw.staging.folder.rglob("*"))
    mw.close()


@pytest_twisted.ensureDeferred
async def test_dimse_clients_into_an_upstream_dicomweb_server(tmp_path):
    """storescu / findscu -> dicom_scp -> deidentify -> ``dicomweb`` backend -> a real Orthanc's DICOMweb
    plugin (the backend answers DIMSE through STOW-RS and QIDO-RS): what is stored upstream is
    de-identified, and C-FIND answers over the upstream's originals come back de-identified too."""
    files, identifiers, _ = write_inputs(tmp_path / "in")
    orthanc = await orthanc_holding(tmp_path / "orthanc", files[2:])  # an original already upstream
    scp_port = free_port()
    folder = tmp_path / "h"
    cfg = write_config(folder, MINIMAL_MAIN + upstream_toml(orthanc) + dimse_via_deid(scp_port, "upstream", query=True)
                       + deid_toml())
    generate_secret_file(folder / "deid.key")
    keys = Keyring(read_secret(folder / "deid.key"))
    harmony = await start_harmony(cfg)
    try:
        r = await run("storescu", "-v", "-aec", SCP_AET, "127.0.0.1", scp_port, *files[:2])
        assert r.stderr.count(b"Received Store Response (Success)") == 2, r.stderr
        held = await threads.deferToThread(lambda: orthanc.rest("GET", "/instances?expand"))
        assert sorted(i["MainDicomTags"]["SOPInstanceUID"] for i in held) == sorted(
            [keys.uid(ROOT + "1.1.1"), keys.uid(ROOT + "1.1.2"), ROOT + "1.1.3"])
        stored = [p.read_bytes() for p in (tmp_path / "orthanc" / "storage").rglob("*") if p.is_file()
                  and not p.name.startswith("index")]
        assert sum(PATIENT_ID.encode() in b for b in stored) == 1  # only the original uploaded directly
        answers, _ = await find(scp_port, SCP_AET, "-S", ["QueryRetrieveLevel=SERIES", "StudyInstanceUID",
                                                          "SeriesInstanceUID", "PatientID", "PatientName"],
                                tmp_path / "find")
        got = sorted((a["0020000D"]["Value"][0], a["00100020"]["Value"][0]) for a in map(json.loads, answers))
        pseudo = keys.patient_pseudonym(PATIENT_ID)
        # two series upstream (the original one, and the de-identified copy of the same series) answer
        # alike: the same keyed pseudonyms, whichever side of the gateway the data came from
        assert got == [(keys.uid(ROOT + "1"), pseudo)] * 2
        assert not any(v in json.dumps(answers) for v in identifiers)
    finally:
        await harmony.stop()
        await threads.deferToThread(orthanc.stop)


@pytest_twisted.ensureDeferred
async def test_dicomweb_clients_into_an_upstream_dicomweb_server(tmp_path):
    """dicomweb-client -> dicomweb endpoint -> bridge -> deidentify -> ``dicomweb`` backend -> a real Orthanc's
    DICOMweb plugin holding originals: the backend answers the bridge's DIMSE operations through DICOMweb
    (never the client's HTTP request as it came), so QIDO, WADO-RS and STOW-RS are de-identified."""
    files, identifiers, _ = write_inputs(tmp_path / "in")
    orthanc = await orthanc_holding(tmp_path / "orthanc", files)
    folder = tmp_path / "h"
    cfg = write_config(folder, MINIMAL_MAIN + upstream_toml(orthanc) + bridge_via_deid("upstream") + deid_toml())
    generate_secret_file(folder / "deid.key")
    keys = Keyring(read_secret(folder / "deid.key"))
    harmony = await start_harmony(cfg)
    try:
        web = client(harmony.url("/dicomweb"))
        (study,) = await in_thread(web.search_for_studies, search_filters={"PatientID": "*"})
        assert study["0020000D"]["Value"] == [keys.uid(ROOT + "1")]
        assert "SECRET" not in json.dumps(study) and PATIENT_ID not in json.dumps(study)
        retrieved = await in_thread(web.retrieve_study, keys.uid(ROOT + "1"))
        assert sorted(ds.SOPInstanceUID for ds in retrieved) == sorted(keys.uid(ROOT + f"1.1.{n}") for n in (1, 2, 3))
        for ds in retrieved:
            assert not any(v.encode() in str(ds).encode() for v in identifiers)
        new = simple_instance(ROOT + "2", ROOT + "2.1", ROOT + "2.1.1")
        new.preamble = b"\0" * 128
        result = await in_thread(web.store_instances, [new])
        assert [r.ReferencedSOPInstanceUID for r in result.ReferencedSOPSequence] == [keys.uid(ROOT + "2.1.1")]
        held = await threads.deferToThread(lambda: orthanc.rest("GET", f"/instances?expand"))
        stored = [i for i in held if i["MainDicomTags"]["SOPInstanceUID"] == keys.uid(ROOT + "2.1.1")]
        assert len(stored) == 1
        tags = await threads.deferToThread(lambda: orthanc.rest("GET", f"/instances/{stored[0]['ID']}/simplified-tags"))
        assert tags["PatientID"] == keys.patient_pseudonym(PATIENT_ID) and tags["PatientIdentityRemoved"] == "YES"
    finally:
        await harmony.stop()
        await threads.deferToThread(orthanc.stop)


@pytest_twisted.ensureDeferred
async def test_cstore_forward_to_dcmtk_storescp(tmp_path):
    """storescu -> dicom_scp -> deidentify -> dicom_scu -> DCMTK storescp (direct forwarding, no store):
    the files storescp writes carry no original value; the US instance never reaches it."""
    sink = await threads.deferToThread(Storescp(tmp_path / "sink").start)
    scp_port = free_port()
    cfg = write_config(tmp_path / "h", MINIMAL_MAIN + STORE + dimse_via_deid(scp_port, "pacs", sink.aet, sink.port)
                       + deid_toml())
    generate_secret_file(tmp_path / "h" / "deid.key")
    keys = Keyring(read_secret(tmp_path / "h" / "deid.key"))
    files, identifiers, us = write_inputs(tmp_path / "in")
    harmony = await start_harmony(cfg)
    try:
        r = await run("storescu", "-v", "-aec", SCP_AET, "127.0.0.1", scp_port, *files, us)
        assert r.stderr.count(b"Received Store Response (Success)") == 4, r.stderr
        received = sink.files()
        assert sorted(dcmread(p).SOPInstanceUID for p in received) == sorted(
            keys.uid(ROOT + f"1.1.{n}") for n in (1, 2, 3))
        for p in received:
            raw = p.read_bytes()
            assert not any(v.encode() in raw for v in identifiers), p
    finally:
        await harmony.stop()
        await threads.deferToThread(sink.stop)
