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
from pydicom import Dataset
from pydicom.uid import ExplicitVRBigEndian
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

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



def answer_values(ds) -> list:
    """Each element of an answer as (tag, value as text), read with the answer's character set."""
    return [(elem.tag, str(elem.value)) for elem in ds if elem.tag.group != 0x0002]


def find_big_endian(port: int, keys: dict) -> list:
    """A C-FIND by pynetdicom proposing only Explicit VR Big Endian: Harmony's query
    association to the PACS offers only little-endian syntaxes, so each match is
    decoded and encoded again for this client."""
    ae = AE(ae_title="IOPBIG")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind, ExplicitVRBigEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="HARMONY")
    assert assoc.is_established
    try:
        assert [str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts] == [ExplicitVRBigEndian]
        query = Dataset()
        for keyword, value in keys.items():
            setattr(query, keyword, "" if value is None else value)
        answers, final = [], None
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            if status is not None and status.Status in (0xFF00, 0xFF01):
                answers.append(identifier)
            elif status is not None:
                final = status.Status
    finally:
        assoc.release()
        ae.shutdown()
    assert final == 0x0000
    return answers


@pytest.mark.parametrize("name", ["greek", "japanese", "latin1", "iso2022"])
def test_matches_relayed_as_received_equal_decoded_ones(name, router, charsets, tmp_path):
    """A C-FIND match the PACS sent in the client's transfer syntax goes on as its bytes
    (``ResultStream.put_encoded``: DCMTK findscu, little endian); one for a client in
    another syntax is decoded and encoded again (a big-endian client).  Both must say
    the same, in every character set, and findscu's must be the PACS's own answer."""
    load(router, charsets)
    _charset, person, prefix = CHARSETS[name]
    keys = {"SpecificCharacterSet": "ISO_IR 192", "PatientName": prefix, "PatientID": None,
            "StudyInstanceUID": None, "StudyDescription": None}
    relayed, final = findscu(router.scp_port, "STUDY", keys, tmp_path / "relayed")
    assert "Success" in final
    direct, final = findscu(router.pacs.dicom_port, "STUDY", keys, tmp_path / "direct", aec=router.pacs.aet,
                            extra=("-aet", "ORTHANC"))   # a caller the PACS lists
    assert "Success" in final
    decoded = find_big_endian(router.scp_port, {"QueryRetrieveLevel": "STUDY", **keys})
    assert [str(a.PatientName) for a in relayed] == [person]
    assert [answer_values(a) for a in relayed] == [answer_values(a) for a in direct]
    assert [answer_values(a) for a in relayed] == [answer_values(a) for a in decoded]
