"""Acknowledgements: building ours, reading a peer's.

Original mode answers AA (accepted), AE (error: the sender may resend) or
AR (rejected: resending the same message will not help).  Enhanced mode
(MSH-15/MSH-16 set) answers CA/CE/CR when the message is safely held, then
an application acknowledgement, each only when MSH-15/MSH-16 ask for it
(AL always, NE never, ER on error, SU on success).

A refusal carries an ERR segment: ERR-2 the location, ERR-3 the HL7 table
0357 code, ERR-4 severity, ERR-8 the reason.  The reason is ours (never
quoted message content), so an ACK carries no patient data beyond the
locator.  Versions before 2.5 read ERR-1 instead; it is filled for them.
"""

from __future__ import annotations

import itertools
import os
import time

import attr

from harmony.hl7.escaping import DEFAULT, Separators, escape, unescape
from harmony.hl7.message import ERROR_NAMES, HL7Error, V2Message, parse_message

ACCEPT, ERROR, REJECT = "AA", "AE", "AR"
COMMIT_ACCEPT, COMMIT_ERROR, COMMIT_REJECT = "CA", "CE", "CR"
POSITIVE = frozenset({ACCEPT, COMMIT_ACCEPT})
#: original-mode code -> its enhanced-mode (commit) counterpart
COMMIT_OF = {ACCEPT: COMMIT_ACCEPT, ERROR: COMMIT_ERROR, REJECT: COMMIT_REJECT}
#: MSH-15/MSH-16 values (HL7 table 0155)
ALWAYS, NEVER, ON_ERROR, ON_SUCCESS = "AL", "NE", "ER", "SU"

_counter = itertools.count(1)
_PREFIX = f"{os.getpid() % 100000:05d}"


def new_control_id() -> str:
    """Unique enough for ACK control IDs (MSH-10 is at most 20 characters in 2.5)."""
    return f"H{_PREFIX}{next(_counter) % 10 ** 13:013d}"


def wanted(condition: str, code: str) -> bool:
    """Does an MSH-15/16 condition ask for an acknowledgement with *code*?"""
    condition = (condition or ALWAYS).upper()
    if condition == NEVER:
        return False
    if condition == ON_ERROR:
        return code not in POSITIVE
    if condition == ON_SUCCESS:
        return code in POSITIVE
    return True


def is_enhanced(message: V2Message) -> bool:
    return bool(message.accept_ack_type or message.application_ack_type)


@attr.s(auto_attribs=True)
class AckInfo:
    """What a peer's ACK said."""
    code: str
    control_id: str
    text: str = ""
    error_code: str = ""
    raw: bytes = b""

    @property
    def positive(self) -> bool:
        return self.code in POSITIVE


def _timestamp(now: float | None) -> str:
    return time.strftime("%Y%m%d%H%M%S", time.gmtime(time.time() if now is None else now))


def build_ack(code: str, message: V2Message | None = None, *, error: HL7Error | None = None,
              text: str = "", now: float | None = None, control_id: str | None = None) -> bytes:
    """The ACK for *message* (or, when it could not be read, for *error*'s header).

    *text* goes to MSA-3 and, with *error*, to ERR-8; keep patient data out of it.
    """
    if message is not None:
        seps, fields, codec = message.separators, message.msh, message.codec
    elif error is not None and error.header is not None:
        seps, fields = error.header
        codec = "latin-1"  # only ASCII header fields are echoed; MSH-18 may be what failed
    else:
        seps, fields, codec = DEFAULT, ["MSH", "|"], "ascii"

    def f(n: int) -> str:
        return fields[n] if n < len(fields) else ""

    version = f(12).split(seps.component)[0] or "2.5"
    event = f(9).split(seps.component)[1] if seps.component in f(9) else ""
    msh = ["MSH", seps.msh2, f(5), f(6), f(3), f(4), _timestamp(now), "",
           seps.component.join(["ACK", event, "ACK"]) if event else "ACK",
           escape(control_id or new_control_id(), seps), f(11) or "P", f(12) or "2.5"]
    charset = f(18) if message is not None else ""
    if charset:
        msh += ["", "", "", "", "", charset]
    lines = [seps.field.join(msh)]
    msa = ["MSA", code, f(10)]
    if text:
        msa.append(escape(text[:80], seps, codec))
    lines.append(seps.field.join(msa))
    if error is not None:
        lines.append(err_segment(error, seps, version, codec))
    return ("\r".join(lines) + "\r").encode(codec if message is not None else "latin-1", "replace")


def err_segment(error: HL7Error, seps: Separators, version: str, codec: str = "utf-8") -> str:
    c = seps.component
    location = c.join([error.segment, str(error.sequence),
                       str(error.field) if error.field else ""]).rstrip(c) if error.segment else ""
    name = ERROR_NAMES.get(error.code, "")
    cwe = c.join([str(error.code), name, "HL70357"])
    text = escape(error.text[:250], seps, codec)
    try:
        old = tuple(int(p) for p in version.split(".")[:2]) < (2, 5)
    except ValueError:
        old = False
    err1 = ""
    if old:  # ERR-1 (ELD): segment^sequence^field^code&text&table
        sc = seps.subcomponent
        err1 = c.join([error.segment, str(error.sequence) if error.segment else "",
                       str(error.field) if error.field else "",
                       sc.join([str(error.code), name, "HL70357"])])
    severity = "E"
    return seps.field.join(["ERR", err1, location, cwe, severity, "", "", "", text])


def read_ack(raw: bytes) -> AckInfo:
    """Read a peer's ACK (MSA, and ERR-3 when there is one); HL7Error when it is not one."""
    message = parse_message(raw, required=(10,))
    msa = err = None
    for fields in message.segments():
        if fields[0] == "MSA" and msa is None:
            msa = fields
        elif fields[0] == "ERR" and err is None:
            err = fields
    if msa is None:
        raise HL7Error(REQUIRED_SEGMENT, "the acknowledgement has no MSA segment", segment="MSA")

    def at(fields, n):
        return fields[n] if n < len(fields) else ""
    code = at(msa, 1).strip().upper()
    if code not in (ACCEPT, ERROR, REJECT, COMMIT_ACCEPT, COMMIT_ERROR, COMMIT_REJECT):
        raise HL7Error(TABLE_VALUE, "MSA-1 is not an acknowledgement code", segment="MSA", field=1)
    seps, codec = message.separators, message.codec
    error_code = at(err, 3).split(seps.component)[0] if err is not None else ""
    return AckInfo(code=code, control_id=unescape(at(msa, 2), seps, codec), text=unescape(at(msa, 3), seps, codec),
                   error_code=error_code, raw=raw)


REQUIRED_SEGMENT = 100
TABLE_VALUE = 103
