"""Harmony as a DICOM node over its own store, driven by DCMTK:

- ``storescu`` -> ``dicom_scp`` -> ``local_archive``, then ``findscu`` answers
  equal Orthanc's for the same corpus and ``getscu`` returns the stored bytes;
- ``storescu`` -> ``dicom_scp`` -> ``store_forward`` -> ``dicom_scu`` -> Orthanc,
  with Orthanc down at first and Harmony restarted in between: each instance
  acknowledged is delivered once; a full disk answers 0xA700 and keeps nothing.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from pydicom import dcmread
from twisted.internet import threads

from tests.dimse_helpers import dataset_bytes
from tests.harness import MINIMAL_MAIN, start_harmony, write_config
from tests.peers import Orthanc, free_port
from tests.sf_helpers import PortHold, dimse_toml, make_instances, sops_in
from tests.endpoints.test_dicom_scp_peers import SCP_AET, run

ARCHIVE = """
[storage.options]
path = "store"
min_free_mb = {min_free_mb}

[backends.archive]
service = "local_archive"

[backends.sf]
service = "store_forward"
[backends.sf.options]
forward_to = ["pacs"]
backoff_initial_seconds = 30
max_attempts = 1000
"""


def config(folder, backend, *, aet="ORTHANC", port=1, min_free_mb=0):
    scp_port = free_port()
    text = MINIMAL_MAIN + ARCHIVE.format(min_free_mb=min_free_mb) + dimse_toml(scp_port, backend, aet, port,
                                                                                query=True)
    return write_config(folder, text), scp_port


@pytest.fixture(scope="module")
def archive_node(tmp_path_factory, corpus):
    folder = tmp_path_factory.mktemp("archive-node")
    cfg, scp_port = config(folder, "archive")
    harmony = pytest_twisted.blockon(start_harmony(cfg))
    # Harmony's SCP accepts uncompressed transfer syntaxes only (dimse issue), so
    # the RLE instance is filed directly; everything else arrives by storescu.
    plain = [i.path for i in corpus if not dcmread(i.path, stop_before_pixels=True).file_meta.TransferSyntaxUID
             .is_compressed]
    compressed = [i.path for i in corpus if i.path not in plain]
    r = pytest_twisted.blockon(run("storescu", "-aec", SCP_AET, "127.0.0.1", scp_port, *plain))
    assert r.returncode == 0 and b"E:" not in r.stderr, r.stderr
    store = harmony.service.runtime.backends["archive"].store
    for path in compressed:
        store.put_file_sync(path)
    harmony.scp_port = scp_port
    yield harmony
    pytest_twisted.blockon(harmony.stop())


def find_keys(level, keys):
    return [f"QueryRetrieveLevel={level}"] + [f"{k}={v}" if v else k for k, v in keys]


async def findscu(port, aet, root, level, keys, out):
    out.mkdir(parents=True, exist_ok=True)
    args = ["-v", root, "-X", "-od", out, "-aet", "FINDSCU", "-aec", aet]
    for k in find_keys(level, keys):
        args += ["-k", k]
    r = await run("findscu", *args, "127.0.0.1", port)
    assert r.returncode == 0, r.stderr
    assert b"Received Final Find Response (Success)" in r.stderr, r.stderr
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def comparable(datasets, keys, studies=None):
    out = []
    for ds in datasets:
        if studies is not None and "StudyInstanceUID" in ds and ds.StudyInstanceUID not in studies:
            continue
        row = {}
        for k, _ in keys:
            v = ds.get(k, "")
            if type(v).__name__ == "MultiValue":
                v = "\\".join(sorted(str(x) for x in v))
            row[k] = str(v if v is not None else "").strip()
        out.append(row)
    return sorted(out, key=repr)


DCMTK_FINDS = [
    ("-S", "STUDY", [("PatientID", ""), ("PatientName", "TEST^*"), ("StudyInstanceUID", ""), ("StudyDate", ""),
                     ("ModalitiesInStudy", ""), ("NumberOfStudyRelatedInstances", "")]),
    ("-S", "SERIES", [("StudyInstanceUID", "1.2.826.0.1.3680043.10.543.1.2"), ("SeriesInstanceUID", ""),
                      ("Modality", ""), ("SeriesDescription", ""), ("NumberOfSeriesRelatedInstances", "")]),
    ("-S", "IMAGE", [("StudyInstanceUID", "1.2.826.0.1.3680043.10.543.1.3"),
                     ("SeriesInstanceUID", "1.2.826.0.1.3680043.10.543.1.3.1"), ("SOPInstanceUID", ""),
                     ("InstanceNumber", ""), ("SOPClassUID", "")]),
    ("-P", "PATIENT", [("PatientID", "PAT00*"), ("PatientName", ""), ("PatientBirthDate", "")]),
    ("-S", "STUDY", [("StudyDate", "20230101-"), ("StudyInstanceUID", ""), ("AccessionNumber", "")]),
]


@pytest.mark.parametrize("root,level,keys", DCMTK_FINDS, ids=[f"{r}{lvl}-{i}" for i, (r, lvl, _) in
                                                               enumerate(DCMTK_FINDS)])
@pytest_twisted.ensureDeferred
async def test_findscu_against_the_archive_equals_orthanc(archive_node, orthanc, corpus, tmp_path, root, level, keys):
    orthanc.add_modality("findscu", "FINDSCU", free_port())
    ours = await findscu(archive_node.scp_port, SCP_AET, root, level, keys, tmp_path / "ours")
    theirs = await findscu(orthanc.dicom_port, orthanc.aet, root, level, keys, tmp_path / "theirs")
    studies = {i.study_uid for i in corpus}
    if level == "PATIENT":
        patients = {i.patient_id for i in corpus}
        theirs = [d for d in theirs if d.PatientID in patients]
    got, want = comparable(ours, keys), comparable(theirs, keys, studies)
    assert got and got == want


@pytest_twisted.ensureDeferred
async def test_getscu_retrieves_the_stored_bytes(archive_node, corpus, tmp_path):
    study = corpus[0].study_uid
    out = tmp_path / "got"
    out.mkdir()
    r = await run("getscu", "-S", "-aet", "GETSCU", "-aec", SCP_AET, "-od", out, "-k", "QueryRetrieveLevel=STUDY",
                  "-k", f"StudyInstanceUID={study}", "127.0.0.1", archive_node.scp_port)
    assert r.returncode == 0, r.stderr
    got = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in out.iterdir()}
    want = {i.sop_uid: i.path for i in corpus if i.study_uid == study}
    assert sorted(got) == sorted(want)
    for sop, path in got.items():
        assert dataset_bytes(path) == dataset_bytes(want[sop])


@pytest_twisted.ensureDeferred
async def test_storescu_store_forward_to_orthanc_through_outage_and_restart(tmp_path):
    orthanc = Orthanc(tmp_path / "orthanc")
    hold = PortHold(orthanc.dicom_port)  # Orthanc is down (connection refused) until released
    cfg, scp_port = config(tmp_path / "h", "sf", aet=orthanc.aet, port=orthanc.dicom_port)
    files = make_instances(tmp_path / "in", 12, 44, patient_id="SFDIMSE", series=2)
    harmony = await start_harmony(cfg)
    try:
        r = await run("storescu", "-v", "-aec", SCP_AET, "127.0.0.1", scp_port, *files)
        assert r.returncode == 0, r.stderr
        # Success while the target is down: acknowledged after the durable write.
        assert r.stderr.count(b"Received Store Response (Success)") == 12, r.stderr
        forward = harmony.service.runtime.backends["sf"].forward
        await forward.idle()
        stats = await forward.stats()
        assert stats["pacs"]["pending"] == 12 and stats["pacs"]["delivered"] == 0
    finally:
        await harmony.stop()
    harmony = await start_harmony(cfg)  # restart: the queue comes back from disk
    try:
        await harmony.service.runtime.backends["sf"].forward.idle()  # its first attempt fails: still down
        hold.release()
        await threads.deferToThread(orthanc.start)
        forward = harmony.service.runtime.backends["sf"].forward
        assert 0 < await forward.kick("pacs") <= 12  # some may already be in flight again
        await forward.idle()
        stats = await forward.stats()
        errors = await forward.store.read(lambda c: c.execute(
            "SELECT state, attempts, last_error FROM queue WHERE state != 'delivered'").fetchall())
        assert stats["pacs"]["delivered"] == 12 and stats["pacs"]["dead"] == 0, errors
        assert sorted(await threads.deferToThread(sops_in, orthanc)) == sorted(str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files)
    finally:
        await harmony.stop()
        hold.release()
        await threads.deferToThread(orthanc.stop)


@pytest_twisted.ensureDeferred
async def test_full_disk_answers_out_of_resources(tmp_path):
    cfg, scp_port = config(tmp_path / "h", "sf", min_free_mb=10**9)
    make_instances(tmp_path / "in", 1, 45, patient_id="FULL")
    harmony = await start_harmony(cfg)
    try:
        r = await run("storescu", "-v", "-aec", SCP_AET, "127.0.0.1", scp_port, *sorted((tmp_path / "in").iterdir()))
        assert b"Received Store Response (Refused: OutOfResources)" in r.stderr, r.stderr
        assert list((tmp_path / "h" / "store" / "instances").rglob("*.dcm")) == []
        stats = await harmony.service.runtime.backends["sf"].forward.stats()
        assert stats["pacs"]["pending"] == 0
    finally:
        await harmony.stop()
