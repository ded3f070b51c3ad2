"""harmony.dicom.ul.commands: command sets equal to what pydicom/pynetdicom encode, and back."""

import pytest
from hypothesis import given, strategies as st
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from harmony.dicom.ul import commands

uids = st.from_regex(r"1\.2(\.[1-9][0-9]{0,5}){1,8}", fullmatch=True)
us = st.integers(min_value=0, max_value=0xFFFF)


def pydicom_encoding(command: dict) -> bytes:
    ds = Dataset()
    for keyword, value in command.items():
        setattr(ds, keyword, value)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, True
    write_dataset(body, ds)
    length = Dataset()
    length.CommandGroupLength = len(body.getvalue())
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, True
    write_dataset(head, length)
    return head.getvalue() + body.getvalue()


@given(sop_class=uids, sop_instance=uids, message_id=us, priority=st.sampled_from([0, 1, 2]),
       destination=st.from_regex(r"[A-Z][A-Z0-9_]{0,15}", fullmatch=True))
def test_requests_byte_identical_to_pydicom(sop_class, sop_instance, message_id, priority, destination):
    command = {"AffectedSOPClassUID": sop_class, "CommandField": commands.C_STORE_RQ, "MessageID": message_id,
               "Priority": priority, "CommandDataSetType": 0, "AffectedSOPInstanceUID": sop_instance,
               "MoveOriginatorApplicationEntityTitle": destination, "MoveOriginatorMessageID": message_id}
    assert commands.encode(command) == pydicom_encoding(command)


@given(remaining=us, completed=us, failed=us, warning=us, status=us)
def test_responses_round_trip(remaining, completed, failed, warning, status):
    command = {"AffectedSOPClassUID": "1.2.840.10008.5.1.4.1.2.2.3", "CommandField": commands.C_GET_RSP,
               "MessageIDBeingRespondedTo": 3, "CommandDataSetType": commands.NO_DATASET, "Status": status,
               "NumberOfRemainingSuboperations": remaining, "NumberOfCompletedSuboperations": completed,
               "NumberOfFailedSuboperations": failed, "NumberOfWarningSuboperations": warning}
    encoded = commands.encode(command)
    assert encoded == pydicom_encoding(command)
    decoded = commands.decode(encoded)
    assert {k: v for k, v in decoded.items() if k != "CommandGroupLength"} == command
    ds = read_dataset(DicomBytesIO(encoded), True, True)
    assert ds.Status == status


def test_error_comment_and_unknown_elements_survive():
    raw = commands.encode({"CommandField": commands.C_STORE_RSP, "Status": 0xC000, "ErrorComment": "odd"})
    raw += b"\x00\x00\x99\x99\x02\x00\x00\x00ab"          # a private-ish group-0000 element
    decoded = commands.decode(raw)
    assert decoded["ErrorComment"] == "odd"
    assert decoded["_unknown"] == [(0x9999, b"ab")]
    assert commands.decode(commands.encode(decoded))["_unknown"] == [(0x9999, b"ab")]


@pytest.mark.parametrize("raw", [b"\x00\x00\x00\x00\x04\x00", b"\x08\x00\x00\x01\x02\x00\x00\x00\x01\x00",
                                 b"\x00\x00\x00\x01\xff\x00\x00\x00\x01\x00", b""])
def test_malformed_command_sets(raw):
    with pytest.raises(commands.CommandError):
        commands.decode(raw)


@given(st.integers(0, 0xFFFF), st.sampled_from([0x0000, 0xFF00, 0xA700]), st.booleans())
def test_a_template_encodes_what_encode_does(message_id, status, dataset):
    find = (("AffectedSOPClassUID", "1.2.840.10008.5.1.4.1.2.2.1"), ("CommandField", commands.C_FIND_RQ),
            ("Priority", 0), ("CommandDataSetType", commands.HAS_DATASET))
    assert commands.encode_with_id(find, "MessageID", message_id) == commands.encode(dict(find, MessageID=message_id))
    answer = (("AffectedSOPClassUID", "1.2.840.10008.5.1.4.1.2.2.1"), ("CommandField", commands.C_FIND_RSP),
              ("Status", status), ("CommandDataSetType", commands.HAS_DATASET if dataset else commands.NO_DATASET))
    assert commands.encode_with_id(answer, "MessageIDBeingRespondedTo", message_id) == commands.encode(
        dict(answer, MessageIDBeingRespondedTo=message_id))


def test_the_same_bytes_decode_from_the_cache_into_a_dict_of_ones_own():
    data = commands.encode({"AffectedSOPClassUID": "1.2.3", "CommandField": commands.C_FIND_RSP, "Status": 0xFF00,
                            "MessageIDBeingRespondedTo": 7, "CommandDataSetType": commands.HAS_DATASET})
    first = commands.decode(data)
    first["Status"] = 0   # a caller owns what it got
    again = commands.decode(bytes(data))
    assert again["Status"] == 0xFF00 and again is not first and again["MessageIDBeingRespondedTo"] == 7


@given(sop_class=uids, sop_instance=uids, message_id=st.one_of(st.none(), us),
       status=st.sampled_from([0x0000, 0xA700, 0xA900, 0xC000, 0x0107]),
       comment=st.one_of(st.none(), st.from_regex(r"[ -~]{0,64}", fullmatch=True)))
def test_a_store_response_written_directly_is_what_encode_writes(sop_class, sop_instance, message_id, status,
                                                                  comment):
    command = {"AffectedSOPClassUID": sop_class, "CommandField": commands.C_STORE_RSP,
               "MessageIDBeingRespondedTo": message_id, "Status": status, "AffectedSOPInstanceUID": sop_instance}
    if comment is not None:
        command["ErrorComment"] = comment
    encoded = commands.store_response(sop_class, sop_instance, message_id, status, comment)
    assert encoded == commands.encode(command)
    decoded = commands.decode(encoded)
    assert (decoded["Status"], decoded["AffectedSOPInstanceUID"]) == (status, sop_instance)


id_fields = st.sampled_from(["MessageID", "MessageIDBeingRespondedTo"])
# An element the table does not know, ahead of the id, its value maybe holding an id's header (a hostile peer's).
unknown_values = st.one_of(st.binary(max_size=24), st.builds(
    bytes.__add__, st.sampled_from([b"\x00\x00\x10\x01\x02\x00\x00\x00", b"\x00\x00\x20\x01\x02\x00\x00\x00"]),
    st.binary(min_size=2, max_size=4)))


@given(sop_class=uids, field=st.sampled_from([commands.C_FIND_RQ, commands.C_FIND_RSP, commands.C_STORE_RSP]),
       id_field=id_fields, ids=st.lists(us, min_size=2, max_size=4), status=st.sampled_from([0x0000, 0xFF00]),
       unknown=st.one_of(st.none(), unknown_values), unknown_varies=st.booleans(),
       flip=st.one_of(st.none(), st.integers(0, 200)))
def test_a_decode_from_the_cache_equals_a_full_decode(sop_class, field, id_field, ids, status, unknown,
                                                      unknown_varies, flip):
    """The cache ignores the message id's value bytes: commands that differ in their id
    (or anywhere else) decode exactly as they would without a cache."""
    commands._DECODED.clear()
    for message_id in ids:
        data = commands.encode({"AffectedSOPClassUID": sop_class, "CommandField": field, id_field: message_id,
                                "Status": status, "CommandDataSetType": commands.NO_DATASET})
        if unknown is not None:
            value = unknown[:-2] + message_id.to_bytes(2, "little") if unknown_varies else unknown
            data = b"\x00\x00\x01\x00" + len(value).to_bytes(4, "little") + value + data
        if flip is not None and flip < len(data):   # one byte changed: a valid command or a refused one
            data = data[:flip] + bytes([data[flip] ^ 0x10]) + data[flip + 1:]
        try:
            expected = commands._decode(data)
        except commands.CommandError:
            with pytest.raises(commands.CommandError):
                commands.decode(data)
            continue
        assert commands.decode(data) == expected
        assert commands.decode(data) == expected


def test_a_command_with_a_new_message_id_decodes_from_the_cache():
    def find(message_id):
        return commands.encode({"AffectedSOPClassUID": "1.2.840.10008.5.1.4.1.2.2.1",
                                "CommandField": commands.C_FIND_RQ, "MessageID": message_id, "Priority": 0,
                                "CommandDataSetType": commands.HAS_DATASET})
    commands._DECODED.clear()
    assert commands.decode(find(1))["MessageID"] == 1
    assert len(commands._DECODED) == 1
    assert commands.decode(find(513))["MessageID"] == 513
    assert len(commands._DECODED) == 1


def test_a_flood_of_distinct_commands_keeps_the_cache_bounded():
    commands._DECODED.clear()
    for n in range(3 * commands._MAX_DECODED):
        commands.decode(commands.encode({"AffectedSOPClassUID": f"1.2.{n}", "CommandField": commands.C_ECHO_RQ,
                                         "MessageID": n, "CommandDataSetType": commands.NO_DATASET}))
        assert len(commands._DECODED) <= commands._MAX_DECODED
    big = commands.encode({"CommandField": commands.C_STORE_RSP, "Status": 0xC000,
                           "ErrorComment": "x" * commands._MAX_CACHED_BYTES})
    commands._DECODED.clear()
    assert commands.decode(big)["Status"] == 0xC000
    assert not commands._DECODED   # a large command is decoded, never kept
