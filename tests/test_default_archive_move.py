"""Issue 12 defect 7: Orthanc 1.10 (which retrieves only by C-MOVE) retrieves
from the shipped ``etc/`` archive, run as it is under a real ``twistd`` (only
ports rewritten, and the shipped ``ORTHANC`` destination pointed at the test
Orthanc's port).  Before, the default archive refused with "C-MOVE command is
not supported".  A destination the config does not name gets 0xA801.

A plain synchronous test: it drives processes, not the reactor.
"""

from __future__ import annotations

import io
import json
import re

import pydicom

from tests.dicom_data import make_instance, save
from tests.peers import Orthanc
from tests.sf_helpers import HarmonyProcess
from tests.test_default_config import copy_etc, dcmtk


def test_orthanc_retrieves_from_the_default_archive_by_c_move(tmp_path):
    etc = tmp_path / "etc"
    ports = copy_etc(etc)
    orthanc = Orthanc(tmp_path / "orthanc", modalities={"harmony": ("HARMONY", "127.0.0.1", ports["scp"])})
    archive = etc / "pipelines" / "archive.toml"
    text, n = re.subn(r'(\nORTHANC = "127\.0\.0\.1:)4242"', lambda m: f'{m.group(1)}{orthanc.dicom_port}"',
                      archive.read_text())
    assert n == 1, "the shipped ORTHANC move destination changed shape"
    archive.write_text(text)
    studies = []
    for n in range(2):
        ds = make_instance(patient_id=f"MOVE{n}", patient_name=f"MOVE^{n}", seed=n)
        studies.append(ds)
        save(ds, tmp_path / f"in{n}.dcm")

    harmony = HarmonyProcess(etc, ports.values())
    harmony.config = etc / "harmony.toml"
    orthanc.start()
    try:
        harmony.start()
        r = dcmtk("storescu", "-aec", "HARMONY", "127.0.0.1", ports["scp"], tmp_path / "in0.dcm", tmp_path / "in1.dcm")
        assert r.returncode == 0 and b"E:" not in r.stderr, r.stderr

        # Orthanc's "query, then retrieve" (the Explorer's Query/Retrieve page).
        query = orthanc.rest("POST", "/modalities/harmony/query", json.dumps(
            {"Level": "Study", "Query": {"StudyInstanceUID": studies[0].StudyInstanceUID}}).encode())
        answers = orthanc.rest("GET", f"/queries/{query['ID']}/answers")
        assert len(answers) == 1
        orthanc.rest("POST", f"/queries/{query['ID']}/retrieve",
                     json.dumps({"TargetAet": "ORTHANC", "Synchronous": True}).encode())
        # ... and the direct route, /modalities/{id}/move.
        orthanc.rest("POST", "/modalities/harmony/move", json.dumps(
            {"Level": "Study", "Resources": [{"StudyInstanceUID": studies[1].StudyInstanceUID}],
             "TargetAet": "ORTHANC", "Synchronous": True}).encode())
        got = {orthanc.rest("GET", f"/instances/{i}/simplified-tags")["SOPInstanceUID"]: i
               for i in orthanc.instance_ids()}
        assert sorted(got) == sorted(ds.SOPInstanceUID for ds in studies)
        for ds in studies:
            stored = pydicom.dcmread(io.BytesIO(orthanc.rest("GET", f"/instances/{got[ds.SOPInstanceUID]}/file")))
            assert stored.PixelData == ds.PixelData

        # A destination the config does not list: refused, nothing sent anywhere.
        r = dcmtk("movescu", "-v", "-S", "-aec", "HARMONY", "-aem", "NOTLISTED", "-k", "QueryRetrieveLevel=STUDY",
                  "-k", f"StudyInstanceUID={studies[0].StudyInstanceUID}", "127.0.0.1", ports["scp"])
        assert b"Received Final Move Response (Refused: MoveDestinationUnknown)" in r.stderr, r.stderr
        assert len(orthanc.instance_ids()) == 2
    finally:
        harmony.stop()
        orthanc.stop()
