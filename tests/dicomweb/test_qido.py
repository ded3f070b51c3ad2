"""harmony.dicomweb.qido: QIDO-RS query parameters to DICOM JSON matching keys and back."""

from __future__ import annotations

import pytest

from harmony.dicomweb.qido import (
    STUDY_KEYS,
    QidoQuery,
    add_path_uids,
    parse_query,
    resolve_attribute,
    return_keys,
    to_query_pairs,
)
from harmony.errors import BadRequest


def test_keywords_and_tags_become_matching_keys():
    q, warnings = parse_query([("PatientID", "SYN-*"), ("00080060", "CT"), ("StudyDate", "20240101-20241231"),
                               ("PatientName", ""), ("includefield", "StudyDescription,all"),
                               ("limit", "10"), ("offset", "5"), ("fuzzymatching", "true")])
    assert q.match["00100020"] == {"vr": "LO", "Value": ["SYN-*"]}
    assert q.match["00080060"]["Value"] == ["CT"]
    assert q.match["00080020"]["Value"] == ["20240101-20241231"]
    assert "Value" not in q.match["00100010"]  # asked to be returned, not matched
    assert (q.include_all, q.includefield, q.limit, q.offset, q.fuzzymatching) == (True, ["00081030"], 10, 5, True)
    assert warnings == []


def test_a_limit_over_the_maximum_is_clamped_with_a_warning():
    q, warnings = parse_query([("limit", "5000")], max_limit=100)
    assert q.limit == 100 and warnings and warnings[0].startswith("299 harmony")
    assert parse_query([], max_limit=100)[0].limit == 100


@pytest.mark.parametrize("pairs", [
    [("NotAKeyword", "x")], [("limit", "0")], [("limit", "ten")], [("offset", "-1")],
    [("limit", "1"), ("limit", "2")], [("fuzzymatching", "yes")], [("limit", "9" * 19)],
])
def test_bad_parameters_are_400(pairs):
    with pytest.raises(BadRequest):
        parse_query(pairs)


def test_resolve_attribute():
    assert resolve_attribute("PatientID") == "00100020" and resolve_attribute("0020000d") == "0020000D"
    with pytest.raises(BadRequest):
        resolve_attribute("../etc")


def test_path_uids_win_and_return_keys_include_parents():
    q, _ = parse_query([("StudyInstanceUID", "9.9"), ("includefield", "00181030")])
    add_path_uids(q, "1.2", "1.2.3")
    assert q.match["0020000D"]["Value"] == ["1.2"] and q.match["0020000E"]["Value"] == ["1.2.3"]
    keys = return_keys("SERIES", q)
    assert set(STUDY_KEYS) <= set(keys) and "0020000E" in keys and keys[-1] == "00181030"
    assert len(keys) == len(set(keys))


def test_to_query_pairs_is_the_inverse():
    q, _ = parse_query([("PatientID", "SYN-1"), ("StudyInstanceUID", "1.2,1.3"), ("limit", "3"),
                        ("includefield", "all")])
    pairs = to_query_pairs(q.match, q, skip={"00100020"})
    assert ("0020000D", "1.2,1.3") in pairs and ("limit", "3") in pairs and ("includefield", "all") in pairs
    assert all(k != "00100020" for k, _v in pairs)
    assert to_query_pairs({}, QidoQuery()) == []
