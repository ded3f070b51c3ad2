"""The HL7 v2 toolkit in memory: framing bounds, escaping, components,
repetitions, sub-components, other delimiters and character sets round-trip
through the JSON view without loss; ACKs in both modes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harmony.hl7 import ack as hack
from harmony.hl7.escaping import DEFAULT, Separators, escape, unescape
from harmony.hl7.framing import FramingError, MessageTooLarge, MllpDecoder, frame
from harmony.hl7.jsonview import to_er7, to_view
from harmony.hl7.message import HL7Error, parse_message
from tests.hl7.peers import adt, oru


def test_decoder_splits_frames_across_chunks():
    d = MllpDecoder(1000)
    data = frame(b"MSH|one\r") + b"\r\n" + frame(b"MSH|two\r")
    out = []
    for i in range(len(data)):
        out += d.feed(data[i:i + 1])
    assert out == [b"MSH|one\r", b"MSH|two\r"] and d.idle


#: message bytes: anything but the frame's own 0x0B and 0x1C
_message_bytes = st.binary(min_size=1, max_size=60).map(lambda b: b.replace(b"\x0b", b"").replace(b"\x1c", b""))


@settings(max_examples=300)
@given(st.lists(_message_bytes.filter(bool), min_size=1, max_size=8), st.lists(st.sampled_from([b"", b"\r\n", b"\n"]),
       min_size=8, max_size=8), st.lists(st.integers(0, 600), max_size=30))
def test_decoder_gives_every_frame_once_in_order_however_the_stream_is_cut(messages, gaps, cuts):
    """Pipelined frames read in arbitrary TCP chunks (frames split and merged
    anywhere, the end marker's 0x1C and 0x0D in different reads) come out
    whole, in order, none merged, none lost."""
    stream = b"".join(frame(m) + gap for m, gap in zip(messages, gaps))
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    d = MllpDecoder(100)
    out = []
    for a, b in zip(points, points[1:]):
        out += d.feed(stream[a:b])
    assert out == messages and d.idle


def test_decoder_refuses_oversize_before_the_end():
    d = MllpDecoder(100)
    d.feed(b"\x0b" + b"x" * 100)
    with pytest.raises(MessageTooLarge):
        d.feed(b"x")
    assert d.buffered <= 101


@pytest.mark.parametrize("data", [b"junk\x0bMSH\x1c\r", b"\x0bMSH\x1cX", b"\x0bMS\x0bH\x1c\r"])
def test_decoder_refuses_bad_framing(data):
    with pytest.raises(FramingError):
        MllpDecoder(1000).feed(data)


def test_escapes_round_trip():
    text = "a|b^c~d\\e&f\rg \\H\\bold\\N\\ h\\.br\\i"
    for seps in (DEFAULT, Separators("#", "!", "@", "$", "%")):
        written = escape(text, seps)
        assert unescape(written, seps) == text
    assert escape("a|b", DEFAULT) == "a\\F\\b"
    assert unescape("\\X48C3A9\\", DEFAULT, "utf-8") == "Hé"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40))
def test_escape_is_inverted_by_unescape(text):
    # "\\" followed by a formatting command is the one documented ambiguity
    if "\\" in text:
        text = text.replace("\\", "/")
    assert unescape(escape(text, DEFAULT), DEFAULT) == text


MESSAGES = [
    adt("RT-1", extra="NTE|1||pipe \\F\\ caret \\S\\ amp \\T\\ tilde \\R\\ esc \\E\\ hex \\X0D\\ fmt \\.br\\ end"),
    oru("RT-2"),
    adt("RT-3", charset="UNICODE UTF-8", family="Müller-Łukasz", given="Zoë"),
    adt("RT-4", charset="8859/1", family="Müller", given="José"),
    # repetitions, components, sub-components in one field
    b"MSH|^~\\&|A|B|C|D|20260101||ADT^A08|RT-5|P|2.5\rPID|1||111^^^H&1.2.3&ISO~222^^^X&9.9&ISO||A^B^C^^Dr\r",
    # other delimiters than |^~\&
    b"MSH#!@$%#A#B#C#D#20260101##ADT!A04#RT-6#P#2.5\rPID#1##111!!!H%1.2%ISO@222##A$F$B!C\r",
]


@pytest.mark.parametrize("raw", MESSAGES, ids=lambda m: m.split(b"\r")[0][-14:].decode("latin-1"))
def test_message_round_trips_through_the_json_view(raw):
    message = parse_message(raw)
    view = to_view(message)
    assert to_er7(view) == raw
    # and the view reads as plain text
    if b"RT-3" in raw:
        assert view["PID"][0]["5"][0] == {"1": "Müller-Łukasz", "2": "Zoë"}
    if b"RT-4" in raw:
        assert message.codec == "latin-1" and view["PID"][0]["5"][0]["1"] == "Müller"
    if b"RT-5" in raw:
        assert view["PID"][0]["3"][1]["4"] == {"1": "X", "2": "9.9", "3": "ISO"}
    if b"RT-6" in raw:
        assert view["PID"][0]["5"][0]["1"] == "A#B" and view["separators"] == "#!@$%"


def test_view_written_by_a_spec_is_completed():
    view = {"MSH": {"3": "HARMONY", "9": {"1": "ADT", "2": "A08"}, "10": "X1", "12": "2.5"},
            "PID": {"3": [{"1": "M1"}], "5": {"1": "Doe|Jr", "2": "Jane"}}}
    assert to_er7(view) == b"MSH|^~\\&|HARMONY||||||ADT^A08|X1||2.5\rPID|||M1||Doe\\F\\Jr^Jane\r"


def test_charset_mismatch_is_a_located_error():
    raw = adt("CS-1", charset="UNICODE UTF-8").replace(b"Anna", b"Ann\xe9")
    with pytest.raises(HL7Error) as e:
        parse_message(raw)
    assert e.value.code == 102 and e.value.segment == "PID" and e.value.sequence == 3


def test_enhanced_mode_conditions():
    m = parse_message(adt("EN-1", msh15="AL", msh16="ER"))
    assert hack.is_enhanced(m)
    assert hack.wanted(m.accept_ack_type, "CA") and not hack.wanted(m.application_ack_type, "AA")
    assert hack.wanted(m.application_ack_type, "AE")
    text = hack.build_ack("CA", m).decode()
    assert "MSA|CA|EN-1" in text and "|ACK^A01^ACK|" in text


def test_err_for_old_versions_fills_err1():
    m = parse_message(adt("OLD-1").replace(b"|P|2.5", b"|P|2.3"))
    e = HL7Error(101, "MSH-10 is required", field=10)
    text = hack.build_ack("AR", m, error=e).decode()
    assert "ERR|MSH^1^10^101&Required field missing&HL70357|MSH^1^10|101^" in text
