"""harmony.storage.index and the level split it writes with (harmony.storage.query.split_levels).

What the ingest's shortcuts must never change: the patient, study and series records
are the same whichever way they are split and encoded, a record whose attributes did
not change is not encoded again, and one that did change is written again.
"""

from __future__ import annotations

import json

from harmony.storage import index as idx
from harmony.storage.query import LEVEL_TAGS, PATIENT, SERIES, STUDY, split_levels


def _attrs(study_description="CHEST", sop="1.2.826.0.1.3680043.10.543.90.1.1.1"):
    def text(vr, value):
        return {"vr": vr, "Value": [value]}
    return {
        "00080018": text("UI", sop),
        "00080020": text("DA", "20240102"),
        "00080050": text("SH", "ACC1"),
        "00080060": text("CS", "CT"),
        "00081030": text("LO", study_description),
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "TEST^ALPHA"}]},
        "00100020": text("LO", "PAT90"),
        "0020000D": text("UI", "1.2.826.0.1.3680043.10.543.90.1"),
        "0020000E": text("UI", "1.2.826.0.1.3680043.10.543.90.1.1"),
        "00200013": {"vr": "IS", "Value": [1]},
    }


def test_split_levels_is_the_three_filters_it_replaced():
    attrs = _attrs()
    assert split_levels(attrs) == {lvl: {t: v for t, v in attrs.items() if t in LEVEL_TAGS[lvl]}
                                   for lvl in (PATIENT, STUDY, SERIES)}
    # in the attributes' order, so the stored text is the same as before
    assert list(split_levels(attrs)[STUDY]) == ["00080020", "00080050", "00081030", "0020000D"]


def test_a_record_seen_unchanged_is_not_encoded_again(monkeypatch):
    texts = idx.LevelText()
    calls = []
    real = idx.jsonutil.dumps_stored
    monkeypatch.setattr(idx.jsonutil, "dumps_stored", lambda obj: calls.append(obj) or real(obj))
    record = split_levels(_attrs())[STUDY]
    first = texts.text(STUDY, "1.2.3", record)
    again = texts.text(STUDY, "1.2.3", dict(record))   # equal, not the same dict
    assert first == again == real(record) and len(calls) == 1
    changed = dict(record, **{"00081030": {"vr": "LO", "Value": ["HEAD"]}})
    assert texts.text(STUDY, "1.2.3", changed) == real(changed) and len(calls) == 2
    assert texts.text(STUDY, "9.9.9", record) == first and len(calls) == 3   # per entity


def test_the_remembered_texts_stay_bounded():
    texts = idx.LevelText(max_entries=4)
    for n in range(10):
        texts.text(SERIES, str(n), {"0020000E": {"vr": "UI", "Value": [str(n)]}})
    assert len(texts._seen) <= 4


def _upsert(conn, attrs, relpath):
    return idx.upsert_instance(conn, attrs, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                               transfer_syntax_uid="1.2.840.10008.1.2.1", relpath=relpath, size=1, now=0.0)


def test_a_study_attribute_that_changes_is_written_even_when_its_text_was_remembered(sqlite_index):
    sqlite_index.transaction(True, _upsert, (_attrs(), "a/b/1.dcm"))
    sqlite_index.transaction(True, _upsert, (_attrs(sop="1.2.826.0.1.3680043.10.543.90.1.1.2"), "a/b/2.dcm"))
    sqlite_index.transaction(True, _upsert, (_attrs("HEAD", sop="1.2.826.0.1.3680043.10.543.90.1.1.3"), "a/b/3.dcm"))
    rows = sqlite_index.read(lambda c: c.execute("SELECT attrs FROM studies").fetchall(), ())
    assert len(rows) == 1 and json.loads(rows[0][0])["00081030"]["Value"] == ["HEAD"]
    assert sqlite_index.read(lambda c: c.execute("SELECT count(*) FROM instances").fetchone()[0], ()) == 3
