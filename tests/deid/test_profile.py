"""Each action of PS3.15 Table E.1-1, verified attribute by attribute on an instance carrying every attribute."""

import datetime
import io
import subprocess
import sys

import pytest
from pydicom import dcmread
from pydicom.datadict import dictionary_VR

from harmony.deid import Deidentifier, Keyring, LookupTable, Profile, ProfileError, ProfileOptions
from harmony.deid import table
from harmony.deid.profile import parse_private_entry
from tests.deid.synthetic import NESTED_NAME, PATIENT_ID, PATIENT_NAME, full_instance, first_vr

SECRET = b"0123456789abcdef0123456789abcdef"
COMBINED_KEEP_PRESENT = {"X/Z": "Z", "X/D": "D", "Z/D": "D", "X/Z/D": "D", "X/Z/U*": "U"}
ALL_OPTIONS = dict(retain_uids=True, retain_device_identity=True, retain_institution_identity=True,
                   retain_patient_characteristics=True, retain_long_modified_dates=True, clean_descriptors=True,
                   clean_structured_content=True, clean_graphics=True, retain_safe_private=True,
                   safe_private=(parse_private_entry("0029,ACME SAFE,10"),))


def expected_action(basic, opts, selected):
    """The standard's legend, restated independently of the engine."""
    chosen = {o: a for o, a in opts.items() if o in selected}
    if "K" in chosen.values():
        return "K"
    if "C" in chosen.values():
        return "C:" + next(o for o, a in chosen.items() if a == "C")
    return COMBINED_KEEP_PRESENT.get(basic, basic)


def patient_key(original):
    """The Patient ID alone keys pseudonyms and shifts (C-FIND answers rarely carry its issuer)."""
    return str(original.PatientID)


def run(options: ProfileOptions, **kw):
    original = full_instance(**kw)
    out = full_instance(**kw)
    deid = Deidentifier(Profile(options), Keyring(SECRET))
    deid.dataset(out)
    return original, out, deid


def check_attribute(tag, action, original, out, deid, selected):
    vr = first_vr(dictionary_VR(tag))
    before = original[tag].value
    if action == "X":
        assert tag not in out, f"{tag:08X} should be removed"
        return
    assert tag in out, f"{tag:08X} should be present ({action})"
    after = out[tag].value
    if vr == "SQ":
        if action == "Z":
            assert len(after) == 0
        else:  # items kept, their contents de-identified with the same table
            item = after[0]
            assert "PersonName" not in item or item.PersonName != NESTED_NAME
            ref = item.ReferencedSOPInstanceUID
            if "retain_uids" in selected:
                assert ref == before[0].ReferencedSOPInstanceUID
            else:
                assert ref == deid.keys.uid(before[0].ReferencedSOPInstanceUID)
        return
    if action == "K":
        assert after == before
    elif tag == 0x00100020:
        assert after == deid.keys.patient_pseudonym(patient_key(original))
    elif tag == 0x00100010:
        assert str(after) == deid.keys.patient_pseudonym(patient_key(original))
    elif action == "Z":
        assert after in ("", None, b"") or after == [], f"{tag:08X} should be empty, is {after!r}"
    elif vr == "UI" and action in ("U", "D"):
        assert after == deid.keys.uid(before) and after.startswith("2.25.") and len(after) <= 64
    elif action == "D":
        assert after not in ("", None, b"") and after != before, f"{tag:08X}: dummy expected"
    elif action == "C:retain_long_modified_dates":
        if vr in ("DA", "DT"):
            shift = deid.keys.date_shift(patient_key(original))
            day = datetime.datetime.strptime(str(before)[:8], "%Y%m%d").date() + shift
            assert str(after) == day.strftime("%Y%m%d") + str(before)[8:]
        else:
            assert after == before  # times of day survive a whole-day shift
    elif action == "C:retain_device_identity":
        assert str(after).startswith("DEV") and after != before
    elif action.startswith("C:"):  # text cleaning: identifying values cut out
        if vr in ("OB", "OW", "UN"):
            raise AssertionError("binary values are removed, not kept")
        assert "DOE" not in str(after) and "SECRETNAME" not in str(after)
    else:
        raise AssertionError(f"unexpected action {action}")


@pytest.mark.parametrize("options", [ProfileOptions(), ProfileOptions(**ALL_OPTIONS),
                                     ProfileOptions(retain_long_full_dates=True, clean_descriptors=True)],
                         ids=["basic", "all-options-modified-dates", "full-dates"])
def test_every_attribute_gets_its_action(options):
    original, out, deid = run(options)
    selected = set(options.selected())
    checked = 0
    for tag, name, basic, opts in table.ATTRIBUTES:
        if tag not in original:
            continue
        action = expected_action(basic, opts, selected)
        if action.startswith("C:") and first_vr(dictionary_VR(tag)) in ("OB", "OW", "UN") \
                and action != "C:retain_device_identity":
            action = "X"
        check_attribute(tag, action, original, out, deid, selected)
        checked += 1
    assert checked == len(table.ATTRIBUTES) - 3  # all but the command (0000) and file meta (0002) rows


def test_marks_the_method_and_options():
    _, out, _ = run(ProfileOptions(**ALL_OPTIONS))
    assert out.PatientIdentityRemoved == "YES"
    codes = [i.CodeValue for i in out.DeidentificationMethodCodeSequence]
    assert codes[0] == "113100"
    assert set(codes) == {"113100", "113103", "113104", "113105", "113107", "113108", "113109", "113110",
                          "113111", "113112"}
    assert all(i.CodingSchemeDesignator == "DCM" for i in out.DeidentificationMethodCodeSequence)
    assert all(len(v) <= 64 for v in out.DeidentificationMethod)
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    _, basic, _ = run(ProfileOptions())
    assert [i.CodeValue for i in basic.DeidentificationMethodCodeSequence] == ["113100"]
    assert basic.LongitudinalTemporalInformationModified == "REMOVED"


def test_private_tags_removed_unless_allow_listed():
    _, basic, _ = run(ProfileOptions())
    assert not [e for e in basic if e.tag.is_private]
    _, kept, _ = run(ProfileOptions(retain_safe_private=True, safe_private=(parse_private_entry("0029,ACME SAFE,10"),)))
    private = {int(e.tag): e.value for e in kept if e.tag.is_private}
    assert private == {0x00290010: "ACME SAFE", 0x00291010: "3.5"}  # the creator and the one safe element


def test_repeating_groups_and_nested_sequences_and_file_meta():
    original, out, deid = run(ProfileOptions())
    for tag in (0x50003000, 0x60003000, 0x60004000):
        assert tag not in out
    assert out[0x60000010].value == 4  # overlay rows are not identifying
    src = out.SharedFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    orig_src = original.SharedFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert src.ReferencedSOPInstanceUID == deid.keys.uid(orig_src.ReferencedSOPInstanceUID)
    assert src.ReferencedSOPClassUID == orig_src.ReferencedSOPClassUID  # SOP classes are not identifying
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert "SourceApplicationEntityTitle" not in out.file_meta


def test_no_original_value_left_in_the_bytes():
    original, out, _ = run(ProfileOptions())
    buf = io.BytesIO()
    out.save_as(buf, enforce_file_format=True)
    raw = buf.getvalue()
    assert b"SECRET" not in raw
    for elem in original.iterall():
        if elem.VR in ("PN", "LO", "SH", "UI", "LT", "ST", "UT", "UC", "DA", "DT") and \
                elem.tag not in (0x00080016, 0x00081150, 0x00020002) and isinstance(elem.value, str) and elem.value:
            assert elem.value.encode() not in raw, f"{elem.tag} {elem.value!r} survived"
    dcmread(io.BytesIO(raw))  # still a valid Part-10 file


def test_consistent_across_runs_and_processes():
    a = full_instance()
    Deidentifier(Profile(ProfileOptions(retain_long_modified_dates=True)), Keyring(SECRET)).dataset(a)
    code = ("import sys; sys.path.insert(0, '.');"
            "from tests.deid.synthetic import full_instance;"
            "from harmony.deid import *;"
            "ds = full_instance();"
            f"Deidentifier(Profile(ProfileOptions(retain_long_modified_dates=True)), Keyring({SECRET!r})).dataset(ds);"
            "print(ds.StudyInstanceUID, ds.SOPInstanceUID, ds.PatientID, ds.StudyDate,"
            " ds[0x00081140][0].ReferencedSOPInstanceUID)")
    other = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    assert other == [a.StudyInstanceUID, a.SOPInstanceUID, a.PatientID, a.StudyDate,
                     a[0x00081140][0].ReferencedSOPInstanceUID]
    b = full_instance()
    Deidentifier(Profile(ProfileOptions()), Keyring(b"another secret of 32 bytes......")).dataset(b)
    assert b.StudyInstanceUID != a.StudyInstanceUID and b.PatientID != a.PatientID


def test_same_patient_same_shift_other_patient_other_pseudonym():
    keys = Keyring(SECRET)
    assert keys.date_shift("P1") == keys.date_shift("P1")
    assert -3650 <= keys.date_shift("P1").days <= -1
    assert keys.patient_pseudonym("P1") != keys.patient_pseudonym("P2")


def test_lookup_table_supplies_pseudonyms(tmp_path):
    csv = tmp_path / "ids.csv"
    csv.write_text(f"PatientID,Pseudonym,PseudonymName\n{PATIENT_ID},STUDY-042,SUBJECT^42\n")
    ds = full_instance()
    Deidentifier(Profile(ProfileOptions()), Keyring(SECRET), LookupTable.load(csv)).dataset(ds)
    assert (ds.PatientID, str(ds.PatientName)) == ("STUDY-042", "SUBJECT^42")
    bad = tmp_path / "bad.csv"
    bad.write_text("id,name\n1,2\n")
    with pytest.raises(ValueError, match="bad.csv"):
        LookupTable.load(bad)


def test_option_errors_name_their_key():
    with pytest.raises(ProfileError, match="retain_longitudinal"):
        Profile(ProfileOptions(retain_long_full_dates=True, retain_long_modified_dates=True))
    with pytest.raises(ProfileError, match="safe_private"):
        parse_private_entry("0028,NOT PRIVATE,10")
    with pytest.raises(ValueError, match="at least 16"):
        Keyring(b"short")


def test_report_names_actions_not_values():
    ds = full_instance()
    report = []
    Deidentifier(Profile(ProfileOptions()), Keyring(SECRET)).dataset(ds, report)
    assert any(c.tag == 0x00100010 and c.name == "Patient's Name" for c in report)
    assert not any(PATIENT_NAME in repr(c) for c in report)


def test_own_pseudonyms_are_recognised_and_never_hashed_twice():
    keys = Keyring(SECRET)
    uid = keys.uid("1.2.3.4")
    assert keys.is_ours_uid(uid) and not keys.is_ours_uid("1.2.3.4")
    assert not Keyring(b"another secret of 32 bytes......").is_ours_uid(uid)
    import uuid as _uuid
    assert _uuid.UUID(int=int(uid[5:])).version == 8
    randoms = [f"2.25.{_uuid.uuid4().int}" for _ in range(2000)]
    assert not any(keys.is_ours_uid(u) for u in randoms)
    assert keys.is_ours_patient(keys.patient_pseudonym("P1")) and not keys.is_ours_patient("PAT12345")
    once = full_instance()
    deid = Deidentifier(Profile(ProfileOptions(retain_long_modified_dates=True)), keys)
    deid.dataset(once)
    before = once.to_json_dict()
    deid.dataset(once)
    assert once.to_json_dict() == before  # idempotent: dates not shifted twice, UIDs not re-hashed
