"""DIMSE -> DICOMweb: DCMTK clients -> Harmony's dicom_scp endpoint -> the
dicomweb backend -> Orthanc's DICOMweb plugin.  Every answer is compared with
the same DCMTK tool asking Orthanc's own DIMSE port (same data behind both)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import pytest_twisted
from pydicom import dcmread
from twisted.internet import threads

from harmony.backends.dicomweb_dimse import qido_target, stow_status
from tests.dicom_data import make_instance, save
from tests.harness import MINIMAL_MAIN, start_harmony, write_config
from tests.peers import DCMTK, Storescp, free_port, peer_env

SCP_AET = "HARMONY_DW"

PIPE = """
[pipelines.reverse]
endpoints = ["scp"]
backends = ["cloud"]

[endpoints.scp]
service = "dicom_scp"
[endpoints.scp.options]
local_aet = "{scp_aet}"
bind_addr = "127.0.0.1"
port = {scp_port}
enable_find = true
enable_get = true
enable_move = true
enable_store = true
[endpoints.scp.options.move_destinations]
DEST = {{ host = "127.0.0.1", port = {dest_port} }}

[backends.cloud]
service = "dicomweb"
[backends.cloud.options]
base_url = "{url}"

[pipelines.store]
endpoints = ["sscp"]
backends = ["scratch"]

[endpoints.sscp]
service = "dicom_scp"
[endpoints.sscp.options]
local_aet = "{scp_aet}"
bind_addr = "127.0.0.1"
port = {store_port}
enable_store = true

[backends.scratch]
service = "dicomweb"
[backends.scratch.options]
base_url = "{store_url}"
"""


@pytest.fixture(scope="module")
def dest(tmp_path_factory):
    server = Storescp(tmp_path_factory.mktemp("dest") / "in", aet="DEST").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def harmony(tmp_path_factory, orthanc, store_orthanc, dest):
    for aet in ("FINDSCU", "GETSCU"):
        orthanc.add_modality(aet.lower(), aet, free_port())
    scp_port, store_port = free_port(), free_port()
    path = write_config(tmp_path_factory.mktemp("reverse"), MINIMAL_MAIN,
                        {"r": PIPE.format(scp_aet=SCP_AET, scp_port=scp_port, url=orthanc.dicomweb_url,
                                          dest_port=dest.port, store_port=store_port,
                                          store_url=store_orthanc.dicomweb_url)})
    running = pytest_twisted.blockon(start_harmony(path))
    running.scp_port, running.store_port = scp_port, store_port
    yield running
    pytest_twisted.blockon(running.stop())


def run(tool, *args):
    return threads.deferToThread(subprocess.run, [DCMTK[tool], *map(str, args)], capture_output=True, env=peer_env())


def canonical(path, keys):
    ds = dcmread(path)
    return json.dumps({k: str(ds.get(k, "")).rstrip("\0 ") for k in keys}, sort_keys=True)


async def findscu(port, aet, keys, out: Path):
    out.mkdir(parents=True)
    args = ["-v", "-S", "-X", "-od", out, "-aet", "FINDSCU", "-aec", aet]
    for k in keys:
        args += ["-k", k]
    r = await run("findscu", *args, "127.0.0.1", port)
    assert r.returncode == 0 and b"Received Final Find Response (Success)" in r.stderr, r.stderr
    names = [k.split("=")[0] for k in keys if not k.startswith("QueryRetrieveLevel")]
    return sorted(canonical(p, names) for p in out.glob("rsp*.dcm"))


FINDS = [
    ["QueryRetrieveLevel=STUDY", "StudyInstanceUID", "PatientID", "StudyDate", "AccessionNumber", "PatientName"],
    ["QueryRetrieveLevel=STUDY", "PatientID=PAT001", "StudyInstanceUID", "StudyDescription"],
    ["QueryRetrieveLevel=STUDY", "StudyDate=20230101-20241231", "StudyInstanceUID"],
    ["QueryRetrieveLevel=SERIES", "StudyInstanceUID=1.2.826.0.1.3680043.10.543.1.2", "SeriesInstanceUID",
     "Modality", "SeriesDescription", "SeriesNumber"],
    ["QueryRetrieveLevel=IMAGE", "StudyInstanceUID=1.2.826.0.1.3680043.10.543.1.3",
     "SeriesInstanceUID=1.2.826.0.1.3680043.10.543.1.3.1", "SOPInstanceUID", "InstanceNumber"],
]


@pytest.mark.parametrize("keys", FINDS, ids=["studies", "patient-filter", "date-range", "series", "instances"])
@pytest_twisted.ensureDeferred
async def test_findscu_through_dicomweb_equals_orthanc_dimse(harmony, orthanc, tmp_path, keys):
    direct = await findscu(orthanc.dicom_port, orthanc.aet, keys, tmp_path / "direct")
    proxied = await findscu(harmony.scp_port, SCP_AET, keys, tmp_path / "proxied")
    assert direct and proxied == direct


@pytest_twisted.ensureDeferred
async def test_getscu_through_dicomweb_gets_identical_files(harmony, orthanc, tmp_path, corpus, monkeypatch):
    """Identical files, and the multipart answer is parsed (its part files written) off the reactor thread."""
    import threading

    from harmony.dicomweb.multipart import StowParser
    fed_on = []
    real_feed = StowParser.feed

    def feed(self, data):
        fed_on.append(threading.current_thread() is threading.main_thread())
        return real_feed(self, data)
    monkeypatch.setattr(StowParser, "feed", feed)
    study = "1.2.826.0.1.3680043.10.543.1.2"  # MR study, one multi-frame instance
    for name, port, aet in (("direct", orthanc.dicom_port, orthanc.aet), ("proxied", harmony.scp_port, SCP_AET)):
        (tmp_path / name).mkdir()
        r = await run("getscu", "-S", "-aet", "GETSCU", "-aec", aet, "-od", tmp_path / name,
                      "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1", port)
        assert r.returncode == 0, r.stderr
    direct = {p.name: p for p in (tmp_path / "direct").iterdir()}
    proxied = {p.name: p for p in (tmp_path / "proxied").iterdir()}
    assert len(direct) == sum(1 for i in corpus if i.study_uid == study)
    assert proxied.keys() == direct.keys()
    for name in direct:
        a, b = dcmread(direct[name]), dcmread(proxied[name])
        assert {e.tag: e.value for e in a} == {e.tag: e.value for e in b}
    assert fed_on and not any(fed_on), "the retrieve's multipart body was parsed on the reactor thread"


@pytest_twisted.ensureDeferred
async def test_movescu_through_dicomweb_to_a_destination(harmony, dest, corpus):
    series = "1.2.826.0.1.3680043.10.543.1.4.2"
    r = await run("movescu", "-S", "-aet", "MOVESCU", "-aec", SCP_AET, "-aem", "DEST",
                  "-k", "QueryRetrieveLevel=SERIES", "-k", "StudyInstanceUID=1.2.826.0.1.3680043.10.543.1.4",
                  "-k", f"SeriesInstanceUID={series}", "127.0.0.1", harmony.scp_port)
    assert r.returncode == 0, r.stderr
    got = {dcmread(p).SOPInstanceUID: p for p in dest.files()}
    expected = {i.sop_uid: i.path for i in corpus if i.series_uid == series}
    assert got.keys() == expected.keys()
    for uid, path in expected.items():
        a, b = dcmread(path), dcmread(got[uid])
        assert {e.tag: e.value for e in a} == {e.tag: e.value for e in b}


@pytest_twisted.ensureDeferred
async def test_storescu_through_dicomweb_lands_in_orthanc(harmony, store_orthanc, tmp_path):
    study = "1.2.826.0.1.3680043.10.543.99.1"
    path = save(make_instance(patient_id="REVERSE", study_uid=study, series_uid=study + ".1",
                              sop_uid=study + ".1.1"), tmp_path / "x.dcm")
    r = await run("storescu", "-aet", "STORESCU", "-aec", SCP_AET, "127.0.0.1", harmony.store_port, path)
    assert r.returncode == 0, r.stderr
    raw = await threads.deferToThread(store_orthanc.rest, "GET",
                                      f"/dicom-web/studies/{study}/series/{study}.1/instances")
    found = json.loads(raw) if isinstance(raw, bytes) else raw
    assert [d["00080018"]["Value"][0] for d in found] == [study + ".1.1"]


@pytest_twisted.ensureDeferred
async def test_getscu_unknown_study_fails_cleanly(harmony, tmp_path):
    (tmp_path / "out").mkdir()
    r = await run("getscu", "-S", "-aet", "GETSCU", "-aec", SCP_AET, "-od", tmp_path / "out",
                  "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=1.2.3.4.5.6.7", "127.0.0.1",
                  harmony.scp_port)
    assert r.returncode == 0
    assert not list((tmp_path / "out").iterdir())


def test_qido_target_mapping():
    path, pairs = qido_target("IMAGE", {
        "00080052": {"vr": "CS", "Value": ["IMAGE"]},
        "0020000D": {"vr": "UI", "Value": ["1.2"]}, "0020000E": {"vr": "UI", "Value": ["1.3"]},
        "00080018": {"vr": "UI"}, "00100010": {"vr": "PN", "Value": [{"Alphabetic": "DOE^*"}]},
    })
    assert path == "/studies/1.2/series/1.3/instances"
    assert pairs == [("00100010", "DOE^*"), ("includefield", "00080018")]
    assert qido_target("SERIES", {"0020000D": {"vr": "UI", "Value": ["1.2", "1.4"]}})[0] == "/series"


def test_stow_status_mapping():
    ok = json.dumps({"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.1"]}}]}}).encode()
    assert stow_status(200, ok, "1.1") == (0, None)
    refused = json.dumps({"00081198": {"vr": "SQ", "Value": [
        {"00081155": {"vr": "UI", "Value": ["1.1"]}, "00081197": {"vr": "US", "Value": [0xC000]}}]}}).encode()
    assert stow_status(409, refused, "1.1")[0] == 0xC000
    assert stow_status(409, b"", "1.1")[0] == 0xA900
    assert stow_status(503, b"oops", "1.1")[0] == 0x0110
