"""One HL7 v2 message: bytes in, the header a router needs, a parse tree.

The bytes are the truth (a relay forwards them unchanged); everything else
is derived: the separators from MSH-1/MSH-2, the character set from MSH-18
(read before decoding: MSH is ASCII in every character set v2 allows), the
text, python-hl7's parse tree and the MSH fields that become envelope
metadata.  Whatever is wrong becomes an :class:`HL7Error` carrying the HL7
table 0357 code, a segment/field locator and a text free of message content,
which is what an ERR segment needs.
"""

from __future__ import annotations

import codecs
import re

import attr

import hl7
from harmony.hl7.escaping import Separators, unescape

#: HL7 table 0211 (MSH-18) -> Python codec.  ISO IR-87/159 (JIS X 0208/0212
#: via ISO 2022) share one codec family.
CHARSETS = {
    "ASCII": "ascii",
    "UNICODE UTF-8": "utf-8", "UNICODE": "utf-8", "UTF-8": "utf-8",
    "UNICODE UTF-16": "utf-16", "UNICODE UTF-32": "utf-32",
    "8859/1": "latin-1", "8859/2": "iso8859-2", "8859/3": "iso8859-3", "8859/4": "iso8859-4",
    "8859/5": "iso8859-5", "8859/6": "iso8859-6", "8859/7": "iso8859-7", "8859/8": "iso8859-8",
    "8859/9": "iso8859-9", "8859/15": "iso8859-15",
    "ISO IR14": "iso2022_jp", "ISO IR87": "iso2022_jp", "ISO IR159": "iso2022_jp_1",
    "GB 18030-2000": "gb18030", "KS X 1001": "euc_kr", "BIG-5": "big5",
    "WINDOWS-1252": "cp1252",  # not in table 0211, but what many senders really write
}

SEGMENT_ID = re.compile(r"[A-Z][A-Z0-9]{2}")

# HL7 table 0357 (message error condition codes)
MESSAGE_ACCEPTED = 0
SEGMENT_SEQUENCE_ERROR = 100
REQUIRED_FIELD_MISSING = 101
DATA_TYPE_ERROR = 102
TABLE_VALUE_NOT_FOUND = 103
UNSUPPORTED_MESSAGE_TYPE = 200
UNSUPPORTED_EVENT_CODE = 201
UNSUPPORTED_PROCESSING_ID = 202
UNSUPPORTED_VERSION_ID = 203
DUPLICATE_KEY = 205
APPLICATION_INTERNAL_ERROR = 207

ERROR_NAMES = {0: "Message accepted", 100: "Segment sequence error", 101: "Required field missing",
               102: "Data type error", 103: "Table value not found", 200: "Unsupported message type",
               201: "Unsupported event code", 202: "Unsupported processing id", 203: "Unsupported version id",
               204: "Unknown key identifier", 205: "Duplicate key identifier", 206: "Application record locked",
               207: "Application internal error"}


class HL7Error(Exception):
    """A message we cannot take, said the way an ERR segment says it.

    ``locator`` is ERR-2 (segment ID, sequence, field position); ``text``
    never quotes message content (it ends up in logs and ACKs).
    """

    def __init__(self, code: int, text: str, *, segment: str = "MSH", sequence: int = 1,
                 field: int | None = None, ack_code: str = "AR"):
        super().__init__(text)
        self.code = code
        self.text = text
        self.segment = segment
        self.sequence = sequence
        self.field = field
        self.ack_code = ack_code
        #: (Separators, raw MSH fields) when MSH could be read (see parse_message).
        self.header: tuple | None = None


def codec_for(charset: str, default: str = "utf-8") -> str:
    """The Python codec for an MSH-18 value (empty: *default*); HL7Error if unknown."""
    name = charset.strip().upper()
    if not name:
        return default
    codec = CHARSETS.get(name)
    if codec is None:
        raise HL7Error(DATA_TYPE_ERROR, "unsupported character set in MSH-18", field=18)
    return codec


def charset_for(codec: str) -> str:
    """The MSH-18 value to write for a Python codec (empty for ASCII-compatible defaults)."""
    norm = codecs.lookup(codec).name
    for name, c in CHARSETS.items():
        if codecs.lookup(c).name == norm:
            return name
    raise ValueError(f"no HL7 character set name for codec {codec!r}")


def _msh_fields(raw: bytes) -> tuple[Separators, list[str]]:
    """Separators and the MSH fields as ER7 text, from bytes, before decoding.

    ``fields[n]`` is MSH-n (fields[1] the field separator, fields[2] MSH-2).
    """
    if raw[:3] != b"MSH":
        raise HL7Error(SEGMENT_SEQUENCE_ERROR, "the message does not begin with an MSH segment")
    end = len(raw)
    for terminator in (b"\r", b"\n"):
        k = raw.find(terminator)
        if 0 <= k < end:
            end = k
    header = raw[:end].decode("latin-1")
    if len(header) < 8:
        raise HL7Error(REQUIRED_FIELD_MISSING, "MSH-1/MSH-2 (delimiters) are missing", field=2)
    sep = header[3]
    parts = header.split(sep)
    try:
        seps = Separators.from_msh2(sep, parts[1])
        seps.check()
    except ValueError as e:
        raise HL7Error(DATA_TYPE_ERROR, str(e), field=2) from None
    return seps, ["MSH", sep] + parts[1:]


def _first_component(value: str, seps: Separators) -> str:
    return value.split(seps.repetition, 1)[0].split(seps.component, 1)[0]


@attr.s(auto_attribs=True, slots=True)
class V2Message:
    raw: bytes
    text: str
    separators: Separators
    #: MSH-18 as written ("" when absent) and the codec it means.
    charset: str
    codec: str
    #: MSH fields as written (ER7, escaped), by number: msh[1] is MSH-1.
    msh: list
    #: The text with segments ended by CR only (what python-hl7 parses).
    normalised: str = ""
    _tree: object = None

    @property
    def parsed(self) -> hl7.Message:
        """python-hl7's parse tree, made on first use: a relay that only reads the
        header never pays for parsing the body (python-hl7 costs ~1 ms a message)."""
        if self._tree is None:
            try:
                self._tree = hl7.parse(self.normalised)
            except Exception as e:  # noqa: BLE001 - any parser failure is a malformed message
                raise HL7Error(SEGMENT_SEQUENCE_ERROR,
                               f"the message cannot be parsed ({type(e).__name__})") from None
        return self._tree

    def segments(self) -> list[list[str]]:
        """Each segment's fields as written (ER7), without python-hl7: for the few
        fields an ACK reader needs."""
        return [seg.split(self.separators.field) for seg in self.normalised.split("\r")]

    def raw_field(self, n: int) -> str:
        return self.msh[n] if n < len(self.msh) else ""

    def field(self, n: int) -> str:
        """MSH-n unescaped, delimiters between its components kept (a display value)."""
        return unescape(self.raw_field(n), self.separators, self.codec) if n > 2 else self.raw_field(n)

    def component(self, n: int, c: int) -> str:
        value = self.raw_field(n).split(self.separators.repetition, 1)[0]
        parts = value.split(self.separators.component)
        return unescape(parts[c - 1], self.separators, self.codec) if c <= len(parts) else ""

    @property
    def message_type(self) -> str:
        return self.component(9, 1)

    @property
    def trigger_event(self) -> str:
        return self.component(9, 2)

    @property
    def structure(self) -> str:
        return self.component(9, 3)

    @property
    def control_id(self) -> str:
        return self.field(10)

    @property
    def processing_id(self) -> str:
        return self.component(11, 1)

    @property
    def version(self) -> str:
        return self.component(12, 1)

    @property
    def accept_ack_type(self) -> str:
        return self.field(15).strip().upper()

    @property
    def application_ack_type(self) -> str:
        return self.field(16).strip().upper()

    def metadata(self) -> dict:
        """The string map an envelope carries (``hl7.*``; no patient data)."""
        return {
            "hl7.message_type": self.message_type, "hl7.trigger_event": self.trigger_event,
            "hl7.structure": self.structure, "hl7.control_id": self.control_id,
            "hl7.sending_application": self.field(3), "hl7.sending_facility": self.field(4),
            "hl7.receiving_application": self.field(5), "hl7.receiving_facility": self.field(6),
            "hl7.processing_id": self.processing_id, "hl7.version": self.version,
            "hl7.charset": self.charset or "", "hl7.accept_ack_type": self.accept_ack_type,
            "hl7.application_ack_type": self.application_ack_type,
        }


def _segment_of(text: str, offset: int) -> tuple[str, int]:
    """Segment ID and its 1-based position at *offset* (for a locator)."""
    before = text[:offset].replace("\n", "\r")
    start = before.rfind("\r") + 1
    return text[start:start + 3], before.count("\r") + 1


def parse_message(raw: bytes, default_charset: str = "utf-8", *, required=(9, 10)) -> V2Message:
    """Bytes (one message, no MLLP framing) -> :class:`V2Message`, or HL7Error.

    An HL7Error raised once MSH could be read carries ``header``: the
    separators and raw MSH fields, so the ACK can still name the control ID.
    """
    seps, fields = _msh_fields(raw)
    try:
        return _parse(raw, default_charset, required, seps, fields)
    except HL7Error as e:
        e.header = (seps, fields)
        raise


def _parse(raw, default_charset, required, seps, fields) -> V2Message:
    charset = _first_component(fields[18], seps) if len(fields) > 18 else ""
    codec = codec_for(charset, default_charset)
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError as e:
        seg, seq = _segment_of(raw.decode("latin-1"), e.start)
        raise HL7Error(DATA_TYPE_ERROR, f"the message is not valid {charset or default_charset} text",
                       segment=seg if seg.isalnum() else "MSH", sequence=seq) from None
    if "\x00" in text:
        raise HL7Error(DATA_TYPE_ERROR, "the message contains NUL characters")
    # MSH again from the decoded text: its fields in the message's own character set.
    msh_text = text.replace("\r\n", "\r").replace("\n", "\r").split("\r", 1)[0]
    msh = ["MSH", seps.field] + msh_text.split(seps.field)[1:]
    for n in required:
        value = msh[n] if n < len(msh) else ""
        if n == 9:
            value = value.split(seps.component)[0]
        if not value.strip():
            raise HL7Error(REQUIRED_FIELD_MISSING, f"MSH-{n} is required", field=n)
    normalised = text.replace("\r\n", "\r").replace("\n", "\r").strip("\r")
    for index, segment in enumerate(normalised.split("\r"), start=1):
        if not SEGMENT_ID.fullmatch(segment[:3]) or segment[3:4] not in ("", seps.field):
            raise HL7Error(SEGMENT_SEQUENCE_ERROR, f"segment {index} has no valid segment ID",
                           segment="", sequence=index)
    return V2Message(raw=raw, text=text, separators=seps, charset=charset, codec=codec, msh=msh,
                     normalised=normalised)


def read_header(raw: bytes) -> tuple[Separators, list]:
    """The separators and MSH fields (ER7, as written) without decoding or
    parsing the rest: what a relay needs (MSH-10) at the cost of one split."""
    return _msh_fields(raw)
