"""harmony.dicom.ul.pdu: framing checks lengths at the header, before buffering a body."""

import struct

import pytest

from harmony.dicom.ul import pdu


def test_pdus_cut_across_arbitrary_reads():
    stream = pdu.release_rq() + pdu.pdata(1, 0x03, b"abc") + pdu.abort()
    framer = pdu.PDUFramer()
    got = []
    for i in range(len(stream)):
        got += framer.feed(stream[i:i + 1])
    assert [t for t, _ in got] == [pdu.A_RELEASE_RQ, pdu.P_DATA_TF, pdu.A_ABORT]
    assert framer.buffered == 0
    assert list(pdu.pdvs(got[1][1]))[0][:2] == (1, 0x03)
    assert bytes(list(pdu.pdvs(got[1][1]))[0][2]) == b"abc"


def test_oversized_declared_length_refused_at_the_header():
    framer = pdu.PDUFramer(max_length=16384)
    with pytest.raises(pdu.PDUError) as e:
        framer.feed(struct.pack(">BxI", pdu.P_DATA_TF, 0xFFFFFFFF))
    assert "over the limit" in str(e.value)
    assert e.value.reason == 0x06


def test_unknown_pdu_type_refused():
    with pytest.raises(pdu.PDUError) as e:
        pdu.PDUFramer().feed(b"\x47\x45\x54 / HTTP/1.1\r\n")   # an HTTP client on the DICOM port
    assert e.value.reason == 0x01


def test_partial_pdu_waits_without_copying_more_than_it_holds():
    framer = pdu.PDUFramer(max_length=1000)
    assert framer.feed(struct.pack(">BxI", pdu.P_DATA_TF, 500) + b"x" * 100) == []
    assert framer.buffered == 106


@pytest.mark.parametrize("body", [b"\x00\x00\x00", b"\x00\x00\x00\x09\x01\x03ab", b"\x00\x00\x00\x01\x01"])
def test_malformed_pdv_items(body):
    with pytest.raises(pdu.PDUError):
        list(pdu.pdvs(body))


def test_abort_and_reject_bodies():
    assert pdu.parse_abort(pdu.abort(2, 6)[6:]) == (2, 6)
    assert pdu.parse_abort(pdu.abort(0, 6)[6:]) == (0, 0)    # a user abort carries no reason
    assert pdu.parse_rj(pdu.associate_rj(1, 1, 7)[6:]) == (1, 1, 7)
