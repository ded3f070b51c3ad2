"""Issue 12 defect 6: character sets, both directions, every query path.

Before: (a) C-FIND answers from the local archive carried no Specific
Character Set and were encoded as ASCII, so Greek and Japanese names came back
as ``?????^????``; (b) QIDO through the bridge sent ``Ωμέγα*`` to the PACS as
``?*`` (no (0008,0005), Latin-1), a wildcard matching every patient.

Data: Greek and Japanese in UTF-8 (ISO_IR 192), German in Latin-1 (ISO_IR 100)
and Japanese in ISO 2022 IR 87 (alphabetic, kanji and kana groups), made with
pydicom, stored in Harmony's archive and in Orthanc.  Driven by DCMTK's
findscu (answers written to files and decoded by pydicom with the character
set they declare), dicomweb-client, and Orthanc as the PACS and as the oracle.
"""

from __future__ import annotations

import uuid

import pytest
import pytest_twisted
from pydicom import dcmread
from twisted.internet import threads

from harmony.dicom import charset
from harmony.storage.query import text_values, value_matches
from tests.dicom_data import make_instance, save, uid
from tests.dicomweb_helpers import client, in_thread
from tests.endpoints.test_dicom_scp_peers import run

#: label -> (Specific Character Set, PatientName)
PEOPLE = {
    "greek": ("ISO_IR 192", "Ωμέγα^Άλφα"),
    "greek-other": ("ISO_IR 192", "Ωρίων^Βήτα"),
    "german": ("ISO_IR 100", "Müller^Jürgen"),
    "japanese-utf8": ("ISO_IR 192", "山田^花子"),
    "japanese-jis": (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    "ascii": (None, "Plain^Ascii"),
}


def make_people(folder, tag: str) -> dict:
    """One study per person; patient IDs carry *tag* so tests never see each other's data."""
    out = {}
    for n, (label, (scs, name)) in enumerate(PEOPLE.items()):
        ds = make_instance(patient_id=f"CS{tag}{n}", study_uid=uid(8, uuid.uuid4().int % 10 ** 15))
        if scs is not None:
            ds.SpecificCharacterSet = scs
        ds.PatientName = name
        ds.StudyDescription = "Étude" if label == "german" else "STUDY"
        out[label] = save(ds, folder / f"{label}.dcm")
    return out


async def findscu(port, aet, out, *keys, charset_key="ISO_IR 192"):
    out.mkdir(parents=True, exist_ok=True)
    args = ["-v", "-S", "-X", "-od", out, "-aet", "FINDSCU", "-aec", aet, "-k", "QueryRetrieveLevel=STUDY",
            "-k", "StudyInstanceUID", "-k", "PatientID"]
    if charset_key:
        args += ["-k", f"SpecificCharacterSet={charset_key}"]
    for k in keys:
        args += ["-k", k]
    r = await run("findscu", *args, "127.0.0.1", port)
    assert b"Received Final Find Response (Success)" in r.stderr, r.stderr
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def names(answers, tag) -> set:
    return {str(a.PatientName) for a in answers if str(a.PatientID).startswith(f"CS{tag}")}


@pytest.fixture
def tag():
    return uuid.uuid4().hex[:6].upper()


def test_declare_only_when_needed():
    from pydicom import Dataset
    ascii_only = Dataset.from_json({"00100010": {"vr": "PN", "Value": [{"Alphabetic": "A*"}]}})
    assert "SpecificCharacterSet" not in charset.declare(ascii_only)
    latin = Dataset.from_json({"00080005": {"vr": "CS", "Value": ["ISO_IR 100"]},
                               "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Ωμέγα*"}]}})
    assert charset.declare(latin).SpecificCharacterSet == "ISO_IR 192"
    nested = Dataset.from_json({"00081110": {"vr": "SQ", "Value": [{"00081030": {"vr": "LO", "Value": ["Ωμ"]}}]}})
    assert charset.declare(nested).SpecificCharacterSet == "ISO_IR 192"


def test_person_names_match_on_every_component_group():
    jp = {"vr": "PN", "Value": [{"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"}]}
    stored = text_values(jp)
    assert value_matches("PN", "山田*", stored) and value_matches("PN", "yamada*", stored)
    assert value_matches("PN", "やまだ^たろう", stored)
    assert value_matches("PN", "Yamada^Tarou=山田^太郎=やまだ^たろう", stored)
    assert not value_matches("PN", "田中*", stored)


@pytest_twisted.ensureDeferred
async def test_c_find_on_the_archive_round_trips_every_character_set(gateway, tmp_path, tag):
    people = make_people(tmp_path / "in", tag)
    for path in people.values():
        await gateway.store.put_file(path)
    await threads.deferToThread(gateway.orthanc.upload, list(people.values()))
    cases = [("Ωμέγα*", {"Ωμέγα^Άλφα"}), ("Ω*", {"Ωμέγα^Άλφα", "Ωρίων^Βήτα"}), ("Müller*", {"Müller^Jürgen"}),
             ("山田*", {"山田^花子", "Yamada^Tarou=山田^太郎=やまだ^たろう"}),
             ("Yamada*", {"Yamada^Tarou=山田^太郎=やまだ^たろう"}), ("Plain*", {"Plain^Ascii"})]
    for n, (query, expected) in enumerate(cases):
        ours = await findscu(gateway.archive_port, "HARMONY", tmp_path / f"h{n}", f"PatientName={query}",
                             "StudyDescription")
        assert names(ours, tag) == expected, query
        for answer in ours:
            if not str(answer.PatientName).isascii() or not str(answer.get("StudyDescription", "")).isascii():
                assert answer.SpecificCharacterSet == "ISO_IR 192", query
        if not query.startswith("山田"):  # Orthanc matches the whole PN, not each component group
            theirs = await findscu(gateway.orthanc.dicom_port, gateway.orthanc.aet, tmp_path / f"o{n}",
                                   f"PatientName={query}", "StudyDescription")
            assert names(theirs, tag) == expected, f"Orthanc disagrees on {query}"
    # Latin-1 text other than the name comes back right too.
    answers = await findscu(gateway.archive_port, "HARMONY", tmp_path / "de", "PatientName=Müller*",
                            f"PatientID=CS{tag}*", "StudyDescription")
    assert [a.StudyDescription for a in answers] == ["Étude"]


@pytest_twisted.ensureDeferred
async def test_a_latin1_query_finds_utf8_and_latin1_data(gateway, tmp_path, tag):
    """A client querying in ISO_IR 100 (findscu writes the bytes it is given)."""
    people = make_people(tmp_path / "in", tag)
    for path in people.values():
        await gateway.store.put_file(path)
    out = tmp_path / "latin"
    out.mkdir()
    # -k cannot carry Latin-1 bytes through argv as text: write the query file with pydicom.
    from pydicom import Dataset
    q = Dataset()
    q.SpecificCharacterSet = "ISO_IR 100"
    q.QueryRetrieveLevel = "STUDY"
    q.PatientName = "Müller*"
    q.PatientID = ""
    q.StudyInstanceUID = ""
    qfile = tmp_path / "query.dcm"
    q.save_as(qfile, implicit_vr=False, little_endian=True)
    r = await run("findscu", "-v", "-S", "-X", "-od", out, "-aet", "FINDSCU", "-aec", "HARMONY", "127.0.0.1",
                  gateway.archive_port, qfile)
    assert b"Received Final Find Response (Success)" in r.stderr, r.stderr
    assert names([dcmread(p) for p in out.glob("rsp*.dcm")], tag) == {"Müller^Jürgen"}


@pytest_twisted.ensureDeferred
async def test_qido_and_relayed_c_find_send_unicode_to_the_pacs(gateway, tmp_path, tag):
    """(b): QIDO via the bridge -> dicom_scu -> Orthanc, and findscu -> dicom_scp
    (RELAY) -> dicom_scu -> Orthanc: the PACS gets ISO_IR 192 and UTF-8."""
    people = make_people(tmp_path / "in", tag)
    await threads.deferToThread(gateway.orthanc.upload, list(people.values()))
    web = client(gateway.url("/pacs"))
    for query, expected in (("Ωμέγα*", {"Ωμέγα^Άλφα"}), ("Müller*", {"Müller^Jürgen"}), ("山田*", {"山田^花子"})):
        found = await in_thread(web.search_for_studies, search_filters={"PatientName": query,
                                                                        "PatientID": f"CS{tag}*"})
        got = {f["00100010"]["Value"][0]["Alphabetic"] for f in found}
        assert got == expected, (query, got)
        relayed = await findscu(gateway.relay_port, "RELAY", tmp_path / f"r{len(query)}{query[0]}",
                                f"PatientName={query}")
        assert names(relayed, tag) == expected, query
    # The archive's own QIDO as well.
    for path in people.values():
        await gateway.store.put_file(path)
    found = await in_thread(client(gateway.url("/dicomweb")).search_for_studies,
                            search_filters={"PatientName": "Ωμέγα*", "PatientID": f"CS{tag}*"})
    assert [f["00100010"]["Value"][0]["Alphabetic"] for f in found] == ["Ωμέγα^Άλφα"]
