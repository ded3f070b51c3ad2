"""Non-Latin patient data through every query path: DCMTK findscu and Orthanc's
C-FIND SCU against the archive and the router, and QIDO-RS (dicomweb-client)
against the archive and the bridge.  The data: UTF-8 Greek, Japanese and
German names, a Latin-1 (ISO_IR 100) name and an ISO 2022 IR 87 (JIS) name
with its ideographic and phonetic groups, stored by DCMTK's storescu or in
the PACS.  Each query by a name prefix must find exactly its patient and
return the name unchanged.
"""

from __future__ import annotations

import pytest

from tests.dicomweb_helpers import client
from tests.interop.data import CHARSETS
from tests.interop.support import findscu, orthanc_find, storescu, upload


def load(stack, charsets):
    """The charset patients into the stack's store (the archive, or the PACS behind the router)."""
    if stack.pacs is not None:
        upload(stack.pacs, [c.path for c in charsets.values()])
    else:
        storescu(stack.scp_port, [c.path for c in charsets.values()])


def pn_text(value) -> str:
    """A DICOM JSON PN value as the '='-joined string pydicom uses."""
    groups = [value.get(k, "") for k in ("Alphabetic", "Ideographic", "Phonetic")]
    return "=".join(groups).rstrip("=")


def check_findscu(stack, name, charsets, tmp_path):
    _charset, person, prefix = CHARSETS[name]
    answers, final = findscu(stack.scp_port, "STUDY", {"SpecificCharacterSet": "ISO_IR 192", "PatientName": prefix,
                                                       "PatientID": None, "StudyInstanceUID": None}, tmp_path)
    assert "Success" in final
    assert [(a.StudyInstanceUID, str(a.PatientName)) for a in answers] == [(charsets[name].study_uid, person)]


def check_orthanc(stack, name, charsets, _tmp_path):
    _charset, person, prefix = CHARSETS[name]
    answers = orthanc_find(stack.client, "harmony", "Study", {"PatientName": prefix, "StudyInstanceUID": "",
                                                              "PatientID": ""})
    assert [(a["StudyInstanceUID"], a["PatientName"]) for a in answers] == [(charsets[name].study_uid, person)]


def check_qido(stack, name, charsets, _tmp_path):
    _charset, person, prefix = CHARSETS[name]
    found = client(stack.web_url).search_for_studies(search_filters={"PatientName": prefix})
    assert [(f["0020000D"]["Value"][0], pn_text(f["00100010"]["Value"][0])) for f in found] == \
        [(charsets[name].study_uid, person)]


CHECKS = {"findscu": check_findscu, "orthanc": check_orthanc, "qido": check_qido}


@pytest.mark.parametrize("shape", ["archive", "router"])
@pytest.mark.parametrize("name", list(CHARSETS))
@pytest.mark.parametrize("path", list(CHECKS))
def test_charset_query(path, shape, name, request, charsets, tmp_path):
    """Before defect 6's fix the archive's C-FIND answers carried no character
    set and were encoded as Latin-1 (Greek came back as ``?????^????``), and the
    bridge sent QIDO values to the PACS as Latin-1 without (0008,0005)."""
    stack = request.getfixturevalue(shape)
    load(stack, charsets)
    CHECKS[path](stack, name, charsets, tmp_path)
