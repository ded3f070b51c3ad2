"""The ``deidentify`` middleware's other paths and its refusals:

- DCMTK ``findscu`` -> ``dicom_scp`` -> deidentify -> ``local_archive`` of originals: C-FIND answers carry the
  pseudonyms, never a name;
- HTTP Part-10 ingest through it (the ``http`` endpoint): de-identified into the archive; hostile input
  (not DICOM, truncated, too large, not a DICOM operation at all) is refused with a problem body and
  nothing reaches the backend;
- pixels: a mask rule cleans a suspect instance (rectangle blacked out, Clean Pixel Data recorded).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest_twisted
import treq
from pydicom import dcmread
from twisted.internet import threads

from harmony.deid import Deidentifier, Keyring, MaskRule, PixelPolicy, Profile, ProfileOptions, generate_secret_file
from harmony.deid import read_secret
from harmony.deid.files import DEIDENTIFIED, QUARANTINED, deidentify_file
from tests.deid.synthetic import PATIENT_ID, simple_instance
from tests.deid.test_middleware import ARCHIVE, bridge_via_deid, deid_toml, dimse_via_deid
from tests.dicomweb_helpers import client, in_thread
from tests.harness import MINIMAL_MAIN, start_harmony, write_config
from tests.peers import free_port
from tests.endpoints.test_dicom_scp_peers import find

ROOT = "1.2.826.0.1.3680043.9999.66."


def config(folder, scp_port):
    return write_config(folder, MINIMAL_MAIN + ARCHIVE + """
[endpoints.ingest]
service = "http"
path_prefix = "/ingest"

[pipelines.http]
endpoints = ["ingest"]
middleware = ["deid"]
backends = ["archive"]
""" + dimse_via_deid(scp_port, "archive", query=True)
        + bridge_via_deid("archive")
        + deid_toml(extra="max_body_bytes = 20000\nbackend_data = \"deidentified\"\n"))


def part10(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest_twisted.ensureDeferred
async def test_http_ingest_cfind_and_refusals(tmp_path):
    scp_port = free_port()
    cfg = config(tmp_path / "h", scp_port)
    generate_secret_file(tmp_path / "h" / "deid.key")
    keys = Keyring(read_secret(tmp_path / "h" / "deid.key"))
    harmony = await start_harmony(cfg)
    url = harmony.url("/ingest")
    try:
        good = part10(simple_instance(ROOT + "1", ROOT + "1.1", ROOT + "1.1.1"))
        r = await treq.post(url, data=good, headers={"Content-Type": "application/dicom"})
        assert r.code == 200, await r.content()
        assert json.loads(await r.content())["stored"] == keys.uid(ROOT + "1.1.1")
        # hostile and foreign input: refused with a problem body, nothing stored
        refusals = [
            (b"not dicom at all" * 10, "application/dicom", 400),
            (good[: len(good) // 2], "application/dicom", 400),
            (good + b"\0" * 30000, "application/dicom", 413),
            (b'{"resourceType": "Patient"}', "application/json", 400),
        ]
        for body, ctype, status in refusals:
            r = await treq.post(url, data=body, headers={"Content-Type": ctype})
            text = (await r.content()).decode()
            assert r.code == status, (status, text)
            assert "detail" in json.loads(text) and PATIENT_ID not in text
        r = await treq.get(url)
        assert r.code == 400 and "DICOM operations only" in (await r.content()).decode()
        archived = [p for p in (tmp_path / "h" / "store").rglob("*.dcm") if "deidentify" not in p.parts]
        assert len(archived) == 1 and dcmread(archived[0]).PatientIdentityRemoved == "YES"
        # C-FIND over DIMSE, answered from the archive through the middleware
        answers, log = await find(scp_port, "HARMONY", "-S", ["QueryRetrieveLevel=STUDY", "StudyInstanceUID",
                                                                 "PatientID", "PatientName", "StudyDate",
                                                                 "AccessionNumber"], tmp_path / "find")
        (answer,) = [json.loads(a) for a in answers]
        assert answer["0020000D"]["Value"] == [keys.uid(ROOT + "1")]
        assert answer["00100020"]["Value"] == [keys.patient_pseudonym(PATIENT_ID)]
        assert "SECRET" not in json.dumps(answer) and "DOE" not in json.dumps(answer)
        assert "20190314" not in json.dumps(answer)  # dates shifted (retain_longitudinal = "modified")
        # a query by name finds nothing identifying; by pseudonym it finds the study
        answers, _ = await find(scp_port, "HARMONY", "-S", ["QueryRetrieveLevel=STUDY", "StudyInstanceUID",
                                                            f"PatientID={keys.patient_pseudonym(PATIENT_ID)}"],
                                tmp_path / "find2")
        assert [json.loads(a)["0020000D"]["Value"] for a in answers] == [[keys.uid(ROOT + "1")]]
    finally:
        await harmony.stop()


@pytest_twisted.ensureDeferred
async def test_stow_parts_are_stored_deidentified_and_the_answer_names_what_was_stored(tmp_path):
    cfg = config(tmp_path / "h", free_port())
    generate_secret_file(tmp_path / "h" / "deid.key")
    keys = Keyring(read_secret(tmp_path / "h" / "deid.key"))
    harmony = await start_harmony(cfg)
    try:
        sent = [simple_instance(ROOT + "5", ROOT + "5.1", ROOT + f"5.1.{i}") for i in (1, 2)]
        for ds in sent:  # dicomweb-client writes a dataset as it is: without a preamble it is not Part-10
            ds.preamble = b"\0" * 128
        result = await in_thread(client(harmony.url("/dicomweb")).store_instances, sent)
        refs = result.ReferencedSOPSequence
        assert sorted(r.ReferencedSOPInstanceUID for r in refs) == sorted(keys.uid(ROOT + f"5.1.{i}") for i in (1, 2))
        assert all(r.WarningReason == 0xB000 for r in refs)  # coercion of data elements
        assert all(keys.uid(ROOT + "5") in r.RetrieveURL for r in refs)
        archived = [p for p in (tmp_path / "h" / "store").rglob("*.dcm") if "deidentify" not in p.parts]
        assert len(archived) == 2
        assert not any(PATIENT_ID.encode() in p.read_bytes() or b"SECRET" in p.read_bytes() for p in archived)
        # and WADO-RS by the UIDs the answer gave returns them (the archive holds de-identified data)
        got = await in_thread(client(harmony.url("/dicomweb")).retrieve_study, keys.uid(ROOT + "5"))
        assert sorted(ds.SOPInstanceUID for ds in got) == sorted(r.ReferencedSOPInstanceUID for r in refs)
    finally:
        await harmony.stop()


def test_mask_rule_cleans_a_suspect_instance(tmp_path):
    src = tmp_path / "us.dcm"
    ds = simple_instance(ROOT + "2", ROOT + "2.1", ROOT + "2.1.1", modality="US",
                         sop_class="1.2.840.10008.5.1.4.1.1.6.1", burned_in="YES")
    ds.Manufacturer, ds.ManufacturerModelName = "ACME Medical", "Sono 3000"
    ds.PixelData = bytes([200]) * 64
    ds.save_as(src, enforce_file_format=True)
    deid = Deidentifier(Profile(ProfileOptions()), Keyring(b"k" * 32))
    assert deidentify_file(deid, PixelPolicy(), src, tmp_path / "q.dcm").verdict == QUARANTINED
    assert not (tmp_path / "q.dcm").exists()
    rule = MaskRule.from_dict(0, {"name": "acme", "manufacturer": "^acme", "model": "Sono", "rows": 8,
                                  "rectangles": [[0, 0, 8, 2], [6, 6, 2, 2]]})
    out = deidentify_file(deid, PixelPolicy(rules=(rule,)), src, tmp_path / "m.dcm")
    assert out.verdict == DEIDENTIFIED and out.masked_by == "acme"
    masked = dcmread(tmp_path / "m.dcm")
    pixels = masked.pixel_array
    assert (pixels[:2, :] == 0).all() and (pixels[6:, 6:] == 0).all()
    assert (pixels[2:6, :] == 200).all()
    assert masked.BurnedInAnnotation == "NO"
    assert "113101" in [i.CodeValue for i in masked.DeidentificationMethodCodeSequence]
    other = MaskRule.from_dict(1, {"manufacturer": "OTHER", "rectangles": [[0, 0, 1, 1]]})
    assert deidentify_file(deid, PixelPolicy(rules=(other,)), src, tmp_path / "n.dcm").verdict == QUARANTINED
    assert deidentify_file(deid, PixelPolicy(suspect="forward"), src, tmp_path / "f.dcm").verdict == DEIDENTIFIED
    assert np.array_equal(dcmread(tmp_path / "f.dcm").pixel_array, ds.pixel_array)  # forwarded as it was


def test_clean_ct_is_not_suspect_but_a_burned_in_yes_is(tmp_path):
    policy = PixelPolicy()
    ct = simple_instance(ROOT + "3", ROOT + "3.1", ROOT + "3.1.1")
    assert policy.reason(ct) is None
    ct.BurnedInAnnotation = "YES"
    assert policy.reason(ct) == "BurnedInAnnotation YES"
    sc = simple_instance(ROOT + "3", ROOT + "3.1", ROOT + "3.1.2", modality="CT", sop_class="1.2.840.10008.5.1.4.1.1.7")
    assert policy.reason(sc).startswith("SOP class")
    no_pixels = simple_instance(ROOT + "3", ROOT + "3.1", ROOT + "3.1.3", modality="US")
    del no_pixels.PixelData
    assert policy.reason(no_pixels) is None
