"""``dicom_scp`` endpoint: DCMTK clients -> Harmony's SCP -> pipeline ->
``dicom_scu`` -> a real PACS (Orthanc; DCMTK dcmqrscp as a second one).

Every answer through Harmony is compared with the same client's answer from
the PACS directly: same matches, the same bytes in retrieved files."""

import json
import signal
import subprocess
from pathlib import Path

import pytest
import pytest_twisted
from pydicom import dcmread
from twisted.internet import defer, protocol, reactor, threads

from tests.dicom_data import make_instance, save
from tests.dimse_helpers import dataset_bytes, silent_peer
from tests.harness import MINIMAL_MAIN, start_harmony, write_config
from tests.peers import DCMTK, Dcmqrscp, Storescp, free_port, peer_env

SCP_AET = "HARMONY"

PIPE = """
[pipelines.router]
endpoints = ["scp"]
backends = ["pacs"]

[endpoints.scp]
service = "dicom_scp"
[endpoints.scp.options]
local_aet = "HARMONY"
bind_addr = "127.0.0.1"
port = {scp_port}
enable_find = {find}
enable_get = true
enable_move = true
enable_store = true
{extra}
[endpoints.scp.options.move_destinations]
STORESCP = {{ host = "127.0.0.1", port = {dest_port} }}

[backends.pacs]
service = "dicom_scu"
[backends.pacs.options]
aet = "{aet}"
host = "127.0.0.1"
port = {port}
connect_timeout_secs = 2
acse_timeout_secs = {acse}
dimse_timeout_secs = 10
"""


def harmony_config(tmp_path, aet, port, *, find="true", extra="", dest_port=1, acse=5):
    scp_port = free_port()
    path = write_config(tmp_path, MINIMAL_MAIN, {"router": PIPE.format(
        scp_port=scp_port, find=find, extra=extra, dest_port=dest_port, aet=aet, port=port, acse=acse)})
    return path, scp_port


async def start(tmp_path, aet, port, **kw):
    path, scp_port = harmony_config(tmp_path, aet, port, **kw)
    running = await start_harmony(path)
    return running, scp_port


def run(tool, *args, cwd=None):
    """Run a DCMTK tool off the reactor (Harmony serves it from this process)."""
    return threads.deferToThread(subprocess.run, [DCMTK[tool], *map(str, args)], capture_output=True,
                                 env=peer_env(), cwd=cwd)


async def find(port, aet, root, keys, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    args = ["-v", root, "-X", "-od", out, "-aet", "FINDSCU", "-aec", aet]
    for k in keys:
        args += ["-k", k]
    r = await run("findscu", *args, "127.0.0.1", port)
    assert r.returncode == 0, r.stderr
    assert b"Received Final Find Response (Success)" in r.stderr, r.stderr
    return sorted(canonical_file(p) for p in out.glob("rsp*.dcm")), r.stderr.decode(errors="replace")


def canonical_file(path):
    ds = dcmread(path)
    return json.dumps(ds.to_json_dict(), sort_keys=True)


@pytest.fixture
def pacs_modality(orthanc):
    """Orthanc lets FINDSCU/GETSCU/MOVESCU (direct) and HARMONY_SCU (through Harmony) query it."""
    for aet in ("FINDSCU", "GETSCU", "MOVESCU", "HARMONY_SCU"):
        orthanc.add_modality(aet.lower(), aet, free_port())
    return orthanc


@pytest.fixture
def harmony(tmp_path, pacs_modality):
    running, scp_port = pytest_twisted.blockon(defer.ensureDeferred(
        start(tmp_path, pacs_modality.aet, pacs_modality.dicom_port)))
    running.scp_port = scp_port
    yield running
    pytest_twisted.blockon(running.stop())


@pytest_twisted.ensureDeferred
async def test_echo(harmony):
    r = await run("echoscu", "-aec", SCP_AET, "127.0.0.1", harmony.scp_port)
    assert r.returncode == 0, r.stderr


FINDS = [
    ("-S", ["QueryRetrieveLevel=STUDY", "StudyInstanceUID", "PatientID", "StudyDate", "AccessionNumber"]),
    ("-P", ["QueryRetrieveLevel=PATIENT", "PatientID", "PatientName"]),
    ("-P", ["QueryRetrieveLevel=STUDY", "PatientID=PAT001", "StudyInstanceUID", "StudyDescription"]),
    ("-S", ["QueryRetrieveLevel=SERIES", "StudyInstanceUID=1.2.826.0.1.3680043.10.543.1.2", "SeriesInstanceUID",
            "Modality", "SeriesDescription"]),
    ("-S", ["QueryRetrieveLevel=IMAGE", "StudyInstanceUID=1.2.826.0.1.3680043.10.543.1.3",
            "SeriesInstanceUID=1.2.826.0.1.3680043.10.543.1.3.1", "SOPInstanceUID", "InstanceNumber"]),
]


@pytest.mark.parametrize("root,keys", FINDS, ids=["study-root-STUDY", "patient-root-PATIENT", "patient-root-STUDY",
                                                  "study-root-SERIES", "study-root-IMAGE"])
@pytest_twisted.ensureDeferred
async def test_findscu_through_harmony_equals_orthanc(harmony, orthanc, tmp_path, root, keys):
    direct, _ = await find(orthanc.dicom_port, orthanc.aet, root, keys, tmp_path / "direct")
    proxied, log = await find(harmony.scp_port, SCP_AET, root, keys, tmp_path / "proxied")
    assert direct, "the PACS should match something"
    assert proxied == direct
    assert "Received Final Find Response (Success)" in log


def retrieved(folder: Path) -> dict:
    return {p.name: p for p in folder.iterdir() if p.is_file()}


@pytest_twisted.ensureDeferred
async def test_getscu_through_harmony_gets_the_same_files(harmony, orthanc, tmp_path, corpus):
    study = "1.2.826.0.1.3680043.10.543.1.2"  # MR study with a multi-frame instance
    for name, port, aet in (("direct", orthanc.dicom_port, orthanc.aet), ("proxied", harmony.scp_port, SCP_AET)):
        (tmp_path / name).mkdir()
        r = await run("getscu", "-S", "-aet", "GETSCU", "-aec", aet, "-od", tmp_path / name,
                      "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1", port)
        assert r.returncode == 0, r.stderr
    direct, proxied = retrieved(tmp_path / "direct"), retrieved(tmp_path / "proxied")
    assert len(direct) == len([i for i in corpus if i.study_uid == study])
    assert proxied.keys() == direct.keys()
    for name in direct:
        assert proxied[name].read_bytes() == direct[name].read_bytes()


@pytest_twisted.ensureDeferred
async def test_getscu_compressed_instance(harmony, orthanc, tmp_path):
    """The RLE instance: getscu accepts only uncompressed syntaxes by default, so
    Orthanc (directly) and Harmony (through) both decompress; the pixels agree."""
    series = "1.2.826.0.1.3680043.10.543.1.3.1"
    for name, port, aet in (("direct", orthanc.dicom_port, orthanc.aet), ("proxied", harmony.scp_port, SCP_AET)):
        (tmp_path / name).mkdir()
        r = await run("getscu", "-S", "-aet", "GETSCU", "-aec", aet, "-od", tmp_path / name,
                      "-k", "QueryRetrieveLevel=SERIES", "-k", "StudyInstanceUID=1.2.826.0.1.3680043.10.543.1.3",
                      "-k", f"SeriesInstanceUID={series}", "127.0.0.1", port)
        assert r.returncode == 0, r.stderr
    direct, proxied = retrieved(tmp_path / "direct"), retrieved(tmp_path / "proxied")
    assert proxied.keys() == direct.keys() and len(direct) == 3
    for name in direct:
        a, b = dcmread(direct[name]), dcmread(proxied[name])
        assert a.SOPInstanceUID == b.SOPInstanceUID
        assert (a.pixel_array == b.pixel_array).all()


@pytest_twisted.ensureDeferred
async def test_getscu_preferring_rle_gets_rle(harmony, orthanc, tmp_path, corpus):
    """``getscu +xr`` proposes RLE Lossless first for its storage contexts (one
    context per SOP class): the RLE instance goes as stored, the uncompressed
    ones are compressed losslessly for it -- the pixels are the originals'.
    Harmony used to accept explicit VR little endian and send all three uncompressed."""
    series = "1.2.826.0.1.3680043.10.543.1.3.1"
    out = tmp_path / "rle"
    out.mkdir()
    r = await run("getscu", "+xr", "-S", "-aet", "GETSCU", "-aec", SCP_AET, "-od", out,
                  "-k", "QueryRetrieveLevel=SERIES", "-k", "StudyInstanceUID=1.2.826.0.1.3680043.10.543.1.3",
                  "-k", f"SeriesInstanceUID={series}", "127.0.0.1", harmony.scp_port)
    assert r.returncode == 0, r.stderr
    got = {dcmread(p).SOPInstanceUID: p for p in retrieved(out).values()}
    originals = {i.sop_uid: i.path for i in corpus if i.series_uid == series}
    assert got.keys() == originals.keys() and len(got) == 3
    for sop, path in got.items():
        ds, original = dcmread(path), dcmread(originals[sop])
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.5", (sop, ds.file_meta.TransferSyntaxUID)
        assert (ds.pixel_array == original.pixel_array).all()
        if original.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.5":
            assert ds.PixelData == original.PixelData  # as stored, not re-encoded


@pytest_twisted.ensureDeferred
async def test_movescu_through_harmony_to_storescp(tmp_path, orthanc, pacs_modality):
    dest_direct = Storescp(tmp_path / "direct", aet="STOREDIRECT").start()
    dest_proxied = Storescp(tmp_path / "proxied", aet="STORESCP").start()
    orthanc.add_modality("storedirect", "STOREDIRECT", dest_direct.port)
    running, scp_port = await start(tmp_path / "h", orthanc.aet, orthanc.dicom_port, dest_port=dest_proxied.port)
    try:
        series = ["QueryRetrieveLevel=SERIES", "StudyInstanceUID=1.2.826.0.1.3680043.10.543.1.1",
                  "SeriesInstanceUID=1.2.826.0.1.3680043.10.543.1.1.1"]
        args = []
        for k in series:
            args += ["-k", k]
        r = await run("movescu", "-S", "-aet", "MOVESCU", "-aec", orthanc.aet, "-aem", "STOREDIRECT", *args,
                      "127.0.0.1", orthanc.dicom_port)
        assert r.returncode == 0, r.stderr
        r = await run("movescu", "-v", "-S", "-aet", "MOVESCU", "-aec", SCP_AET, "-aem", "STORESCP", *args,
                      "127.0.0.1", scp_port)
        assert r.returncode == 0, r.stderr
        direct = {p.name: p for p in dest_direct.files()}
        proxied = {p.name: p for p in dest_proxied.files()}
        assert len(direct) == 3 and proxied.keys() == direct.keys()
        for name in direct:
            assert dataset_bytes(proxied[name]) == dataset_bytes(direct[name])
        # unknown destination: A801
        r = await run("movescu", "-v", "-S", "-aet", "MOVESCU", "-aec", SCP_AET, "-aem", "NOWHERE", *args,
                      "127.0.0.1", scp_port)
        assert b"Received Final Move Response (Refused: MoveDestinationUnknown)" in r.stderr
    finally:
        await running.stop()
        dest_direct.stop()
        dest_proxied.stop()


@pytest_twisted.ensureDeferred
async def test_storescu_stores_durably_and_forwards(tmp_path, store_orthanc):
    orthanc = store_orthanc
    storage = tmp_path / "store"
    running, scp_port = await start(tmp_path / "h", orthanc.aet, orthanc.dicom_port,
                                    extra=f'storage_dir = "{storage}"\nforward_store = true')
    try:
        ds = make_instance(patient_id="PATSCP", seed=11)
        src = save(ds, tmp_path / "in.dcm")
        r = await run("storescu", "-aec", SCP_AET, "127.0.0.1", scp_port, src)
        assert r.returncode == 0, r.stderr
        stored = storage / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        assert dataset_bytes(stored) == dataset_bytes(src)
        assert not list(storage.rglob("*.tmp"))
        found = orthanc.rest("POST", "/tools/find", json.dumps(
            {"Level": "Instance", "Query": {"SOPInstanceUID": str(ds.SOPInstanceUID)}}).encode())
        assert len(found) == 1
    finally:
        await running.stop()


# ------------------------------------------------------------------ rejections


@pytest_twisted.ensureDeferred
async def test_unknown_called_aet_is_rejected(harmony):
    r = await run("echoscu", "-v", "-aec", "SOMEONE", "127.0.0.1", harmony.scp_port)
    assert r.returncode != 0
    assert b"Called AE Title Not Recognized" in r.stderr


@pytest_twisted.ensureDeferred
async def test_calling_aet_outside_allow_list_is_rejected(tmp_path, orthanc):
    running, scp_port = await start(tmp_path, orthanc.aet, orthanc.dicom_port,
                                    extra='allowed_calling_aets = ["GOODSCU"]')
    try:
        r = await run("echoscu", "-v", "-aet", "BADSCU", "-aec", SCP_AET, "127.0.0.1", scp_port)
        assert r.returncode != 0 and b"Calling AE Title Not Recognized" in r.stderr
        r = await run("echoscu", "-aet", "GOODSCU", "-aec", SCP_AET, "127.0.0.1", scp_port)
        assert r.returncode == 0, r.stderr
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_disabled_find_is_refused(tmp_path, orthanc):
    running, scp_port = await start(tmp_path, orthanc.aet, orthanc.dicom_port, find="false")
    try:
        r = await run("findscu", "-v", "-S", "-aec", SCP_AET, "-k", "QueryRetrieveLevel=STUDY", "127.0.0.1", scp_port)
        assert b"No Acceptable Presentation Contexts" in r.stderr or b"0x0122" in r.stderr
    finally:
        await running.stop()


def final_status(stderr: bytes) -> str:
    """The final C-FIND status as findscu -d prints it ("0xc001: Failed: ...")."""
    text = stderr.decode(errors="replace")
    assert "Received Final Find Response" in text, text
    tail = text.split("Received Final Find Response", 1)[1]
    return next(line for line in tail.splitlines() if "DIMSE Status" in line)


@pytest_twisted.ensureDeferred
async def test_pacs_down_gives_failure_status(tmp_path, dead_port):
    running, scp_port = await start(tmp_path, "NOBODY", dead_port)
    try:
        r = await run("findscu", "-d", "-S", "-aec", SCP_AET, "-k", "QueryRetrieveLevel=STUDY", "-k",
                      "StudyInstanceUID", "127.0.0.1", scp_port)
        assert "0xc001" in final_status(r.stderr).lower()
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_pacs_silent_gives_timeout_status(tmp_path):
    port = silent_peer()
    running, scp_port = await start(tmp_path, "SILENT", port.getHost().port, acse=0.5)
    try:
        r = await run("findscu", "-d", "-S", "-aec", SCP_AET, "-k", "QueryRetrieveLevel=STUDY", "-k",
                      "StudyInstanceUID", "127.0.0.1", scp_port)
        assert "0xc002" in final_status(r.stderr).lower()
    finally:
        await running.stop()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_malformed_identifier(harmony):
    r = await run("findscu", "-d", "-S", "-aec", SCP_AET, "-k", "QueryRetrieveLevel=BOGUS", "-k",
                  "StudyInstanceUID", "127.0.0.1", harmony.scp_port)
    assert "0xa900" in final_status(r.stderr)


def corrupted(good, bad):
    """*good* with its last element's length overrunning the file: undecodable."""
    data = good.read_bytes()
    bad.write_bytes(data[:-200] + b"\xff\xff\xff\xff\x00\x00\x00\x10" + b"\x01" * 8)
    return bad


def store_raw(port: int, path) -> int:
    """C-STORE the file *path* as it is (pynetdicom names it by its file meta); the status (blocking)."""
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title=SCP_AET)
    assert assoc.is_established
    try:
        return assoc.send_c_store(path).Status
    finally:
        assoc.release()


@pytest_twisted.ensureDeferred
async def test_corrupt_dataset_store_is_refused(tmp_path, store_orthanc):
    """A C-STORE whose dataset cannot be decoded gets 0xC000 and is not kept."""
    ds = make_instance(seed=3)
    bad = corrupted(save(ds, tmp_path / "good.dcm"), tmp_path / "bad.dcm")
    running, scp_port = await start(tmp_path / "h", store_orthanc.aet, store_orthanc.dicom_port)
    try:
        status = await threads.deferToThread(store_raw, scp_port, bad)
    finally:
        await running.stop()
    assert status == 0xC000
    assert store_orthanc.rest("POST", "/tools/find", json.dumps(
        {"Level": "Instance", "Query": {"SOPInstanceUID": str(ds.SOPInstanceUID)}}).encode()) == []


@pytest_twisted.ensureDeferred
async def test_a_corrupt_dataset_leaves_nothing_in_storage_dir(tmp_path, store_orthanc):
    """Its head names it, so its journal record is written while it is checked;
    refused (0xC000), the record is withdrawn and no file appears."""
    ds = make_instance(seed=4)
    bad = corrupted(save(ds, tmp_path / "good.dcm"), tmp_path / "bad.dcm")
    storage = tmp_path / "store"
    running, scp_port = await start(tmp_path / "h", store_orthanc.aet, store_orthanc.dicom_port,
                                    extra=f'storage_dir = "{storage}"\nforward_store = false')
    try:
        status = await threads.deferToThread(store_raw, scp_port, bad)
        good = save(make_instance(seed=6), tmp_path / "next.dcm")
        r = await run("storescu", "-v", "-aec", SCP_AET, "127.0.0.1", scp_port, good)
        assert b"Received Store Response (Success)" in r.stderr, r.stderr
    finally:
        await running.stop()
    assert status == 0xC000
    stored = [p.name for p in storage.rglob("*.dcm")]
    assert len(stored) == 1 and f"{ds.SOPInstanceUID}.dcm" not in stored
    assert list((storage / ".journal").glob("*.log")) == []  # every record settled: nothing to replay


@pytest_twisted.ensureDeferred
async def test_unwritable_storage_dir(tmp_path, store_orthanc):
    orthanc = store_orthanc
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    running, scp_port = await start(tmp_path / "h", orthanc.aet, orthanc.dicom_port,
                                    extra=f'storage_dir = "{blocker}/store"')
    try:
        src = save(make_instance(seed=5), tmp_path / "in.dcm")
        r = await run("storescu", "-v", "-aec", SCP_AET, "127.0.0.1", scp_port, src)
        assert b"Received Store Response (Refused: OutOfResources)" in r.stderr
    finally:
        await running.stop()


# ------------------------------------------------------------------ a second PACS


@pytest_twisted.ensureDeferred
async def test_dcmqrscp_as_second_pacs(tmp_path, corpus):
    pacs = Dcmqrscp(tmp_path / "qr", peers={"harmony": ("HARMONY_SCU", free_port())}).start(
        i.path for i in corpus[:7])
    running, scp_port = await start(tmp_path / "h", pacs.aet, pacs.port)
    try:
        keys = ["QueryRetrieveLevel=SERIES", "StudyInstanceUID=1.2.826.0.1.3680043.10.543.1.1",
                "SeriesInstanceUID", "Modality"]
        direct, _ = await find(pacs.port, pacs.aet, "-S", keys, tmp_path / "direct")
        proxied, _ = await find(scp_port, SCP_AET, "-S", keys, tmp_path / "proxied")
        assert len(direct) == 3 and proxied == direct
        for name, port, aet in (("gd", pacs.port, pacs.aet), ("gp", scp_port, SCP_AET)):
            (tmp_path / name).mkdir()
            r = await run("getscu", "-S", "-aec", aet, "-od", tmp_path / name, "-k", "QueryRetrieveLevel=SERIES",
                          "-k", "StudyInstanceUID=1.2.826.0.1.3680043.10.543.1.1",
                          "-k", "SeriesInstanceUID=1.2.826.0.1.3680043.10.543.1.1.1", "127.0.0.1", port)
            assert r.returncode == 0, r.stderr
        gd, gp = retrieved(tmp_path / "gd"), retrieved(tmp_path / "gp")
        assert len(gd) == 3 and gd.keys() == gp.keys()
        assert all(gd[n].read_bytes() == gp[n].read_bytes() for n in gd)
    finally:
        await running.stop()
        pacs.stop()


def pynetdicom_get(port, aet, identifier, refuse=()):
    """C-GET with pynetdicom as the client; refuses the SOP Instance UIDs in *refuse*.
    Returns (received UIDs, pending remaining counts, final status dataset)."""
    from pynetdicom import AE, StoragePresentationContexts, build_role, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet
    ae = AE(ae_title="GETSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for cx in StoragePresentationContexts[:100]:
        ae.add_requested_context(cx.abstract_syntax)
    roles = [build_role(cx.abstract_syntax, scp_role=True) for cx in StoragePresentationContexts[:100]]
    received = []

    def on_store(event):
        uid = event.request.AffectedSOPInstanceUID
        if uid in refuse:
            return 0xA700
        received.append(uid)
        return 0x0000
    assoc = ae.associate("127.0.0.1", port, ae_title=aet, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    remaining, final = [], None
    try:
        for status, ident in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet):
            assert status
            if status.Status in (0xFF00, 0xFF01):
                remaining.append(status.NumberOfRemainingSuboperations)
            else:
                final = (status, ident)
    finally:
        assoc.release()
    return received, remaining, final


@pytest_twisted.ensureDeferred
async def test_get_counts_follow_ps34(harmony, orthanc, corpus):
    """Pending responses count down, the final one counts everything, and a
    refused sub-operation gives Warning - as Orthanc itself answers - with the
    Failed SOP Instance UID List PS3.4 C.4.3.1.3.1 asks for."""
    from pydicom.dataset import Dataset
    study = "1.2.826.0.1.3680043.10.543.1.4"
    uids = sorted(i.sop_uid for i in corpus if i.study_uid == study)
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = study
    refused = uids[2]
    for port, aet in ((orthanc.dicom_port, orthanc.aet), (harmony.scp_port, SCP_AET)):
        got, remaining, (status, failed) = await threads.deferToThread(
            pynetdicom_get, port, aet, ident, {refused})
        assert sorted(got) == [u for u in uids if u != refused], aet
        assert remaining == list(range(len(uids) - 1, -1, -1)), (aet, remaining)
        assert status.Status == 0xB000, (aet, hex(status.Status))
        assert (status.NumberOfCompletedSuboperations, status.NumberOfFailedSuboperations,
                status.NumberOfWarningSuboperations) == (len(uids) - 1, 1, 0), aet
        if aet == SCP_AET:  # Orthanc 1.10 leaves the (conditional) Failed SOP Instance UID List out
            assert failed.FailedSOPInstanceUIDList == refused


class _Exited(protocol.ProcessProtocol):
    def __init__(self):
        self.exited = defer.Deferred()

    def processEnded(self, reason):
        self.exited.callback(reason.value.exitCode)


SLOW_STUDY = "1.2.826.0.1.3680043.10.543.77"


@pytest.fixture
def own_pacs(tmp_path):
    """An Orthanc of its own: the large study must not show in other tests' queries of the shared one."""
    from tests.peers import Orthanc
    server = Orthanc(tmp_path / "own-orthanc").start()
    server.add_modality("harmony_scu", "HARMONY_SCU", free_port())
    yield server
    server.stop()


async def _getscu_of_a_large_study(tmp_path, pacs, max_staged_mb=2, management=""):
    """Harmony (staging bounded at *max_staged_mb*, and *management* appended to its main
    configuration) and DCMTK getscu retrieving a 30 x 512 KB study through it: (running
    Harmony, backend, getscu's process, its exit, output folder, size of one instance)."""
    study = SLOW_STUDY
    paths = [save(make_instance(patient_id="SLOWGET", study_uid=study, series_uid=f"{study}.1",
                                sop_uid=f"{study}.1.{n}", instance_number=n, rows=512, cols=512, seed=n),
                  tmp_path / "study" / f"{n}.dcm") for n in range(1, 31)]
    pacs.upload(paths)
    path, scp_port = harmony_config(tmp_path, pacs.aet, pacs.dicom_port)
    path.write_text(path.read_text() + management)
    router = tmp_path / "pipelines" / "router.toml"
    router.write_text(router.read_text() + f"max_staged_mb = {max_staged_mb}\n")   # [backends.pacs.options] ends it
    running = await start_harmony(path)
    out = tmp_path / "got"
    out.mkdir()
    client = _Exited()
    tool = DCMTK["getscu"]
    process = reactor.spawnProcess(client, tool, [tool, "-S", "-aet", "GETSCU", "-aec", SCP_AET, "-od", str(out),
                                                  "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                                                  "127.0.0.1", str(scp_port)], env=peer_env())
    return running, running.service.runtime.backends["pacs"], process, client, out, paths[0].stat().st_size


def _staged_bytes(backend) -> int:
    return sum(f.stat().st_size for f in backend.retrieve_staging.base.rglob("*") if f.is_file())


@pytest_twisted.ensureDeferred
async def test_a_getscu_that_stops_reading_holds_the_pacs_back_not_harmony(tmp_path, own_pacs):
    """DCMTK getscu stopped (SIGSTOP) after its first instances of a 30 x 512 KB study:
    Harmony relays one sub-operation at a time, stages at most ``max_staged_mb`` of what
    the PACS sends and then holds the PACS back by not answering -- it never buffers the
    study -- and once getscu runs again every instance arrives."""
    from tests.test_client_aborts import until
    running, backend, process, client, out, instance_bytes = await _getscu_of_a_large_study(tmp_path, own_pacs)
    try:
        await until(lambda: any(out.iterdir()), "getscu stored its first instance")
        process.signalProcess(signal.SIGSTOP)
        await until(lambda: any(job.stream.queued_bytes >= job.stream.limit for job in backend._gets.values()),
                    "Harmony is holding the PACS back")
        staged = _staged_bytes(backend)
        # The limit (crossed by a whole instance), the instance that landed when it was
        # reached (its answer waits), and the one being relayed to the stopped client.
        assert staged <= 2 * 1024 * 1024 + 3 * instance_bytes, staged
        assert staged < 30 * instance_bytes / 3
        process.signalProcess(signal.SIGCONT)
        assert await client.exited == 0
        assert sorted(p.name for p in out.iterdir()) == sorted(f"CT.{SLOW_STUDY}.1.{n}" for n in range(1, 31))
    finally:
        if not client.exited.called:
            process.signalProcess("KILL")
            await client.exited
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_getscu_killed_mid_study_cancels_upstream_and_releases_staging(tmp_path, own_pacs):
    """getscu killed (SIGKILL) after its first instances: the retrieve from the PACS is
    cancelled (C-CANCEL; Orthanc ends it) and every staged instance is released -- before
    the fix they stayed staged and the PACS kept sending until it timed out -- and the
    target pool records no failure of the PACS but one client abort, on the management
    API's /metrics too (before that fix the attempt, answered at the first instance, was
    never counted: the client left mid-stream)."""
    from tests.management.test_api_peers import MANAGEMENT, admin_get
    from tests.test_client_aborts import until
    running, backend, process, client, out, _size = await _getscu_of_a_large_study(tmp_path, own_pacs,
                                                                                   management=MANAGEMENT)
    target = backend.target_pool.targets[0]
    try:
        await until(lambda: any(out.iterdir()), "getscu stored its first instance")
        process.signalProcess("KILL")
        await client.exited
        await until(lambda: target.in_flight == 0 and not backend._gets, "the retrieve ended", timeout=20)
        await until(lambda: _staged_bytes(backend) == 0, "the staged instances were released")
        assert len(list(out.iterdir())) < 30
        # Never the PACS's fault: a client abort, counted once the relay gave up and the
        # retrieve from the PACS ended (in_flight is 0 from the first instance on).
        await until(lambda: target.client_aborts_total == 1, "the client abort was counted", timeout=20)
        assert (target.failures_total, target.last_error, target.circuit, target.healthy) == (
            0, None, "closed", True), target.state(0)
        r, body = await admin_get(running, "/metrics")
        assert r.code == 200, body
        metrics = body.decode()
        assert 'harmony_target_client_aborts_total{backend="pacs",target="pacs"} 1.0' in metrics, metrics
        assert 'harmony_target_failures_total{backend="pacs",target="pacs"} 0.0' in metrics, metrics
    finally:
        await running.stop()
