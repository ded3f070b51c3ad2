"""Accept-header negotiation for DICOMweb resources (PS3.18 8.7).

Each resource offers a few representations; the client's media ranges are
tried by quality, and ``multipart/related`` ranges are matched on their
``type`` parameter.  No acceptable representation is a 406, not a guess.
"""

from __future__ import annotations

from harmony.dicomweb.uids import is_uid
from harmony.errors import BadRequest, NotAcceptable

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
OCTET = "application/octet-stream"
JPEG, PNG = "image/jpeg", "image/png"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"

# resource -> (single-part types, multipart part types, default (type, multipart))
OFFERS = {
    "qido": ((DICOM_JSON, "application/json"), (), (DICOM_JSON, False)),
    "metadata": ((DICOM_JSON, "application/json"), (), (DICOM_JSON, False)),
    "retrieve": ((), (DICOM,), (DICOM, True)),
    "frames": ((OCTET,), (OCTET, JPEG, PNG), (OCTET, True)),
    "bulkdata": ((OCTET,), (OCTET,), (OCTET, True)),
    "rendered": ((JPEG, PNG), (), (JPEG, False)),
}


def _split_top(text: str, sep: str) -> list[str]:
    """Split on *sep* outside double quotes."""
    out: list[str] = []
    cur: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def parse_media_range(text: str) -> tuple[str, dict]:
    parts = _split_top(text, ";")
    mtype = parts[0].strip().lower()
    params = {}
    for p in parts[1:]:
        k, eq, v = p.partition("=")
        if eq:
            params[k.strip().lower()] = v.strip().strip('"')
    return mtype, params


def parse_accept(header: str | None) -> list[tuple[str, dict, float]]:
    """Media ranges by descending quality (stable for equal q)."""
    if not header or not header.strip():
        return [("*/*", {}, 1.0)]
    ranges = []
    for item in _split_top(header, ","):
        if not item.strip():
            continue
        mtype, params = parse_media_range(item)
        try:
            q = float(params.pop("q", "1"))
        except ValueError:
            raise BadRequest("Accept header has a malformed q value") from None
        if q > 0:
            ranges.append((mtype, params, q))
    return sorted(ranges, key=lambda r: -r[2])


def _matches(rng: str, offer: str) -> bool:
    if rng in ("*/*", offer):
        return True
    return rng.endswith("/*") and offer.split("/")[0] == rng[:-2]


def negotiate(kind: str, header: str | None) -> tuple[str, bool, str | None]:
    """-> (part media type, multipart?, transfer syntax or None); 406 when nothing fits."""
    singles, parts, default = OFFERS[kind]
    for mtype, params, _q in parse_accept(header):
        ts = params.get("transfer-syntax")
        if ts is not None and ts != "*" and not is_uid(ts):
            raise BadRequest(f"transfer-syntax {ts!r} is not a UID or '*'")
        if mtype == "multipart/related":
            ptype = params.get("type", "").lower() or default[0]
            for offer in parts:
                if _matches(ptype, offer):
                    return offer, True, ts
            continue
        if mtype in ("*/*",) or (mtype.endswith("/*") and not singles):
            if any(_matches(mtype, d) for d in (default[0],)):
                return default[0], default[1], ts
        for offer in singles:
            if _matches(mtype, offer):
                return (DICOM_JSON if offer == "application/json" else offer), False, ts
    offered = [f'multipart/related; type="{p}"' for p in parts] + list(singles)
    raise NotAcceptable("none of the Accept media types can be served here; offered: " + ", ".join(offered))
