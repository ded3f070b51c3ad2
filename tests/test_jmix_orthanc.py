"""The whole path against a real Orthanc: jmix endpoint -> jmix_builder ->
dicom_scu (C-GET, and C-MOVE to the proxy's own store SCP) -> envelope.

The study is the 3-series sample-study shape from the JMIX notes (two series
sharing a description), synthetic, uploaded to the session Orthanc under its own
UIDs so no other test sees it.
"""

from __future__ import annotations

import json

import pydicom
import pytest
import pytest_twisted
import treq

from harmony.jmix import VerifyOptions, open_envelope
from harmony.jmix.store import EnvelopeStore
from tests.harness import MINIMAL_MAIN, start_harmony, write_config
from tests.jmix_support import make_sample_study
from tests.peers import free_port

STUDY = "1.2.826.0.1.3680043.10.543.7133.2024"
ABSENT = "1.2.826.0.1.3680043.10.543.7133.2025"

PIPES = """
[pipelines.jmix]
networks = ["default"]
endpoints = ["jmix"]
middleware = ["jmix_builder"]
backends = ["pacs"]

[endpoints.jmix]
service = "jmix"
[endpoints.jmix.options]
path_prefix = "/"

[backends.pacs]
service = "dicom_scu"
[backends.pacs.options]
aet = "{aet}"
host = "127.0.0.1"
port = {port}
local_aet = "JMIX_SCU"
dimse_retrieve_mode = "{mode}"
incoming_store_port = {store_port}
"""


@pytest.fixture(scope="module")
def sample_in_orthanc(orthanc, tmp_path_factory):
    paths = make_sample_study(tmp_path_factory.mktemp("jmix-orthanc"), study_uid=STUDY)
    orthanc.upload(paths)
    yield {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in paths}
    # The Orthanc is the session's: leave it holding exactly the shared corpus again.
    for found in orthanc.rest("POST", "/tools/lookup", STUDY.encode(), "text/plain"):
        if found["Type"] == "Study":
            orthanc.rest("DELETE", f"/studies/{found['ID']}")


@pytest.fixture(params=["get", "move"])
def harmony(request, tmp_path, orthanc, sample_in_orthanc):
    store_port = free_port()
    orthanc.add_modality("jmixscu", "JMIX_SCU", store_port)
    main = MINIMAL_MAIN + f'\n[storage.options]\npath = "{tmp_path / "var"}"\n'
    path = write_config(tmp_path / "cfg", main, {"p": PIPES.format(
        aet=orthanc.aet, port=orthanc.dicom_port, mode=request.param, store_port=store_port)})
    running = pytest_twisted.blockon(start_harmony(path))
    yield running
    pytest_twisted.blockon(running.stop())
    EnvelopeStore.open(tmp_path / "var" / "jmix").close()


@pytest_twisted.ensureDeferred
async def test_sample_study_from_orthanc(harmony, sample_in_orthanc, tmp_path):
    url = harmony.url(f"/api/jmix?studyInstanceUid={STUDY}")
    resp = await treq.get(url)
    body = await resp.content()
    assert resp.code == 200, body
    (tmp_path / "e.zip").write_bytes(body)
    report = open_envelope(tmp_path / "e.zip", tmp_path / "open", VerifyOptions())
    assert report.ok, report.errors  # schema, files.json hashes, payload hash, DICOM counts
    assert report.warnings == []
    meta = report.metadata
    assert meta["patient"]["name"] == {"family": "Brown", "given": ["Jane"], "text": "Brown, Jane"}
    assert meta["studies"]["study_description"] == "CT Pulmonary Angiogram"
    series = meta["studies"]["series"]
    assert [(s["series_number"], s["series_description"], s["instance_count"]) for s in series] == [
        (1, "SAGITTAL CHEST", 5), (2, "CORONAL CHEST", 5), (3, "CORONAL CHEST", 5)]
    assert len({s["series_uid"] for s in series}) == 3
    files = sorted((report.payload / "dicom").iterdir())
    assert len(files) == 15
    for f in files:
        got = pydicom.dcmread(f)
        sent = sample_in_orthanc[f.name[:-4]]
        assert got.SOPInstanceUID == sent.SOPInstanceUID and got.PixelData == sent.PixelData
    # Served again from the store: same envelope, not a rebuild.
    resp2 = await treq.get(url)
    assert resp2.code == 200 and await resp2.content() == body
    assert resp2.headers.getRawHeaders("x-jmix-envelope-id") == resp.headers.getRawHeaders("x-jmix-envelope-id")
    manifest = await (await treq.get(harmony.url(f"/api/jmix/{report.envelope_id}/manifest"))).content()
    assert json.loads(manifest)["id"] == report.envelope_id


@pytest_twisted.ensureDeferred
async def test_study_absent_from_orthanc_is_404(harmony):
    resp = await treq.get(harmony.url(f"/api/jmix?studyInstanceUid={ABSENT}"))
    body = json.loads(await resp.content())
    assert resp.code == 404, body
    assert ABSENT in body["detail"]
