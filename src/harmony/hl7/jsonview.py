"""The normalised JSON view of a v2 message, and ER7 made back from one.

Middleware works on JSON (the JOLT ``transform`` maps it to FHIR), so the
endpoint puts this view in ``request.normalized``::

    {"message":    {"type": "ADT", "event": "A01", "control_id": "...", ...},
     "separators": "|^~\\\\&",
     "order":      ["MSH", "EVN", "PID", "PV1"],
     "MSH": [{"3": [{"1": "SENDER"}], ...}],
     "PID": [{"3": [{"1": "12345", "4": {"1": "HOSP", "2": "1.2.3", "3": "ISO"}}, {"1": "999"}],
              "5": [{"1": "Doe", "2": "John"}]}]}

Every segment ID maps to a list of its occurrences (one PID or ten OBX
alike); a field is a list of repetitions; a repetition maps component
positions to text, or to a map of sub-component positions when it has
sub-components.  Text is unescaped (:mod:`harmony.hl7.escaping`); empty
fields and components are left out.  Positions are HL7's (1-based; MSH-3 is
``"3"``; MSH-1/MSH-2 are ``separators``).  ``order`` keeps the segment order
(an ORU's OBR/OBX groups).

:func:`to_er7` accepts the same shape and is lenient where a JOLT spec
writing one would want it: a field may be a plain string (one repetition,
one component) or one repetition's map; ``order`` may be left out (MSH first,
then segments in the order the keys appear).  A view made by
:func:`to_view` comes back as the same message, up to trailing empty
delimiters (which carry no meaning in v2).
"""

from __future__ import annotations

import hl7

from harmony.hl7.escaping import DEFAULT, Separators, escape, unescape
from harmony.hl7.message import CHARSETS, SEGMENT_ID, V2Message

HEADER_KEYS = ("message", "separators", "order")


def _reps(field):
    items = list(field)
    if items and all(isinstance(i, hl7.Repetition) for i in items):
        return items
    return [field]


def _comps(rep):
    items = list(rep)
    if items and all(isinstance(i, hl7.Component) for i in items):
        return items
    return [rep]


def _subs(comp):
    return [comp] if isinstance(comp, str) else [str(s) for s in comp]


def _numbered(values) -> dict:
    return {str(i): v for i, v in enumerate(values, start=1) if v not in ("", {}, None)}


def field_view(field, seps: Separators, codec: str) -> list:
    reps = []
    for rep in _reps(field):
        comps = []
        for comp in _comps(rep):
            subs = [unescape(s, seps, codec) for s in _subs(comp)]
            comps.append(subs[0] if len(subs) == 1 else _numbered(subs))
        reps.append(_numbered(comps))
    while reps and not reps[-1]:
        reps.pop()
    return reps


def to_view(message: V2Message) -> dict:
    seps, codec = message.separators, message.codec
    view: dict = {
        "message": {
            "type": message.message_type, "event": message.trigger_event, "structure": message.structure,
            "control_id": message.control_id, "processing_id": message.processing_id,
            "version": message.version, "charset": message.charset,
            "sending_application": message.field(3), "sending_facility": message.field(4),
            "receiving_application": message.field(5), "receiving_facility": message.field(6),
            "timestamp": message.component(7, 1),
        },
        "separators": seps.field + seps.msh2,
        "order": [],
    }
    for segment in message.parsed:
        seg_id = str(segment[0])
        view["order"].append(seg_id)
        first = 3 if seg_id == "MSH" else 1
        fields = {}
        for n in range(first, len(segment)):
            value = field_view(segment[n], seps, codec)
            if value:
                fields[str(n)] = value
        view.setdefault(seg_id, []).append(fields)
    return view


# ---------------------------------------------------------------- view -> ER7


class ViewError(ValueError):
    """The JSON is not a v2 message view; the message says where."""


def _positions(obj, where: str) -> list:
    """{"1": a, "3": b} -> [a, None, b]; a list is taken as positions 1..n."""
    if isinstance(obj, list):
        return list(obj)
    if not isinstance(obj, dict):
        raise ViewError(f"{where}: expected an object of positions")
    out: list = []
    for key, value in obj.items():
        try:
            pos = int(key)
        except (TypeError, ValueError):
            raise ViewError(f"{where}: {key!r} is not a position") from None
        if not 1 <= pos <= 999:
            raise ViewError(f"{where}: position {pos} is out of range")
        while len(out) < pos:
            out.append(None)
        out[pos - 1] = value
    return out


def _text(value, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        raise ViewError(f"{where}: expected text")
    if isinstance(value, (int, float)):
        return str(value)
    if not isinstance(value, str):
        raise ViewError(f"{where}: expected text")
    return value


def _component(value, seps, codec, where) -> str:
    if isinstance(value, dict):
        subs = _positions(value, where)
        return seps.subcomponent.join(escape(_text(s, where), seps, codec) for s in subs)
    return escape(_text(value, where), seps, codec)


def _repetition(value, seps, codec, where) -> str:
    if isinstance(value, dict):
        comps = _positions(value, where)
        return seps.component.join(_component(c, seps, codec, f"{where}.{i}") for i, c in enumerate(comps, 1))
    return _component(value, seps, codec, where)


def _field(value, seps, codec, where) -> str:
    reps = value if isinstance(value, list) else [value]
    return seps.repetition.join(_repetition(r, seps, codec, f"{where}[{i}]") for i, r in enumerate(reps))


def _segment(seg_id: str, fields, seps, codec, where) -> str:
    values = _positions(fields, where)
    if seg_id == "MSH":
        values = values[2:]  # MSH-1 and MSH-2 come from the separators
        parts = [seps.msh2] + [_field(v, seps, codec, f"{where}.{i}") if v is not None else ""
                               for i, v in enumerate(values, start=3)]
        text = "MSH" + seps.field + seps.field.join(parts)
    else:
        text = seg_id + "".join(seps.field + (_field(v, seps, codec, f"{where}.{i}") if v is not None else "")
                                for i, v in enumerate(values, start=1))
    return text.rstrip(seps.field)


def view_codec(view: dict) -> tuple[str, str]:
    """(MSH-18 as the view says it, Python codec)."""
    try:
        msh18 = view["MSH"][0].get("18")
    except (KeyError, IndexError, TypeError, AttributeError):
        msh18 = None
    charset = ""
    if msh18 is not None:
        first = msh18[0] if isinstance(msh18, list) and msh18 else msh18
        if isinstance(first, dict):
            first = first.get("1", "")
        charset = first if isinstance(first, str) else ""
    if not charset:
        return "", "utf-8"
    codec = CHARSETS.get(charset.strip().upper())
    if codec is None:
        raise ViewError(f"MSH.18: unsupported character set {charset!r}")
    return charset, codec


def to_er7(view: dict, *, segment_terminator: str = "\r") -> bytes:
    """A message view (see the module docstring) -> the message's bytes."""
    if not isinstance(view, dict):
        raise ViewError("a message view is a JSON object")
    raw_seps = view.get("separators") or (DEFAULT.field + DEFAULT.msh2)
    if not isinstance(raw_seps, str) or len(raw_seps) < 5:
        raise ViewError("separators: expected text like '|^~\\&'")
    seps = Separators.from_msh2(raw_seps[0], raw_seps[1:])
    try:
        seps.check()
    except ValueError as e:
        raise ViewError(f"separators: {e}") from None
    _, codec = view_codec(view)
    order = view.get("order")
    if order is None:
        def count(occurrences):
            return len(occurrences) if isinstance(occurrences, list) else 1
        order = ["MSH"] * count(view.get("MSH", [])) + [
            k for k, occurrences in view.items() if k not in HEADER_KEYS and k != "MSH"
            for _ in range(count(occurrences))]
    if not order or order[0] != "MSH":
        raise ViewError("order: a message begins with MSH")
    seen: dict = {}
    lines = []
    for seg_id in order:
        if not isinstance(seg_id, str) or not SEGMENT_ID.fullmatch(seg_id):
            raise ViewError(f"order: {seg_id!r} is not a segment ID")
        occurrences = view.get(seg_id)
        if isinstance(occurrences, dict):
            occurrences = [occurrences]
        n = seen.get(seg_id, 0)
        if not isinstance(occurrences, list) or n >= len(occurrences):
            raise ViewError(f"order: names {seg_id} more often than the view has it")
        seen[seg_id] = n + 1
        lines.append(_segment(seg_id, occurrences[n] or {}, seps, codec, f"{seg_id}[{n}]"))
    try:
        return (segment_terminator.join(lines) + segment_terminator).encode(codec)
    except UnicodeEncodeError:
        raise ViewError(f"the text cannot be written in the character set of MSH-18 ({codec})") from None
