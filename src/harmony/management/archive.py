"""The console's view of the local archive: patients -> studies -> series ->
instances from a store's index, and thumbnails.

Read straight from the store's sqlite index on its read threads (the same
index C-FIND uses), a level at a time, so a large archive costs one page of
rows per click.  Thumbnails are rendered by the code that answers WADO-RS
``/thumbnail`` (:func:`harmony.dicomweb.pixels.render`), on the store's threads.
These answers carry PHI: only the console's archive pages ask for them.
"""

from __future__ import annotations

import json

from harmony.envelope import ResponseEnvelope
from harmony.errors import NotAcceptable, NotFound
from harmony.storage.index import first
from harmony.storage.query import tag_hex

T = {k: tag_hex(k) for k in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                              "StudyDescription", "AccessionNumber", "SeriesDescription", "SeriesNumber",
                              "InstanceNumber", "Modality")}


def stores(runtime) -> dict:
    """Backend name -> InstanceStore for every backend with a store (one name per folder)."""
    out, seen = {}, set()
    for name, backend in sorted(runtime.backends.items()):
        store = getattr(backend, "store", None)
        if store is None or not hasattr(store, "read") or getattr(store, "closed", False):
            continue
        if store.root in seen:
            continue
        seen.add(store.root)
        out[name] = store
    return out


def describe(runtime) -> list[dict]:
    return [{"name": name, "type": runtime.config.backends[name].type if name in runtime.config.backends else "?"}
            for name in stores(runtime)]


def _attrs(text) -> dict:
    try:
        return json.loads(text or "{}")
    except ValueError:
        return {}


def person_name(attrs: dict) -> str:
    """A PN value as DICOM writes it: its alphabetic, ideographic and phonetic
    groups joined by ``=`` (so a name is shown whole, not just its first group)."""
    values = (attrs.get(T["PatientName"]) or {}).get("Value") or []
    if not values:
        return ""
    v = values[0]
    if not isinstance(v, dict):
        return str(v)
    groups = [str(v.get(k, "")) for k in ("Alphabetic", "Ideographic", "Phonetic")]
    while groups and not groups[-1]:
        groups.pop()
    return "=".join(groups)


def _patients(conn, q: str, limit: int) -> list[dict]:
    rows = conn.execute(
        "SELECT p.pk, p.patient_id, p.attrs, count(s.pk) FROM patients p LEFT JOIN studies s ON s.patient_pk = p.pk "
        "GROUP BY p.pk ORDER BY p.pk DESC")
    out = []
    needle = q.lower()
    for pk, pid, attrs, n in rows:
        a = _attrs(attrs)
        name = person_name(a)
        if needle and needle not in (pid or "").lower() and needle not in name.lower():
            continue
        out.append({"pk": pk, "patient_id": pid, "name": name, "birth_date": first(a, T["PatientBirthDate"]),
                    "sex": first(a, T["PatientSex"]), "studies": n})
        if len(out) >= limit:
            break
    return out


def _studies(conn, patient_pk: int) -> list[dict]:
    rows = conn.execute(
        "SELECT st.study_uid, st.accession, st.study_date, st.attrs, "
        "(SELECT count(*) FROM series se WHERE se.study_pk = st.pk), "
        "(SELECT count(*) FROM instances i JOIN series se ON se.pk = i.series_pk WHERE se.study_pk = st.pk) "
        "FROM studies st WHERE st.patient_pk = ? ORDER BY st.study_date DESC, st.pk DESC", (patient_pk,))
    return [{"study_instance_uid": uid, "accession": acc, "date": date,
             "description": first(_attrs(attrs), T["StudyDescription"]), "series": ns, "instances": ni}
            for uid, acc, date, attrs, ns, ni in rows]


def _series(conn, study_uid: str) -> list[dict]:
    rows = conn.execute(
        "SELECT se.series_uid, se.modality, se.attrs, (SELECT count(*) FROM instances i WHERE i.series_pk = se.pk) "
        "FROM series se JOIN studies st ON st.pk = se.study_pk WHERE st.study_uid = ? ORDER BY se.pk", (study_uid,))
    return [{"series_instance_uid": uid, "modality": modality, "number": first(_attrs(a), T["SeriesNumber"]),
             "description": first(_attrs(a), T["SeriesDescription"]), "instances": n} for uid, modality, a, n in rows]


def _instances(conn, series_uid: str) -> list[dict]:
    rows = conn.execute(
        "SELECT i.sop_uid, i.sop_class_uid, i.transfer_syntax_uid, i.size, i.stored_at, i.attrs FROM instances i "
        "JOIN series se ON se.pk = i.series_pk WHERE se.series_uid = ? ORDER BY i.pk", (series_uid,))
    return [{"sop_instance_uid": sop, "sop_class_uid": cls, "transfer_syntax_uid": ts, "size": size,
             "stored_at": stored, "number": first(_attrs(a), T["InstanceNumber"])}
            for sop, cls, ts, size, stored, a in rows]


def patients(store, q: str, limit: int):
    return store.read(_patients, q, limit).addCallback(lambda rows: {"patients": rows})


def studies(store, patient_pk: int):
    return store.read(_studies, patient_pk).addCallback(lambda rows: {"studies": rows})


def series(store, study_uid: str):
    return store.read(_series, study_uid).addCallback(lambda rows: {"series": rows})


def instances(store, series_uid: str):
    return store.read(_instances, series_uid).addCallback(lambda rows: {"instances": rows})


def thumbnail(store, sop_uid: str):
    """A small JPEG of the instance's first frame (the WADO-RS thumbnail rendering)."""
    from harmony.dicomweb import pixels

    def found(instance):
        if instance is None:
            raise NotFound(f"no instance {sop_uid}")
        return store.run(_render, pixels, instance.path)

    def _render(pixels, path):
        try:
            return pixels.render(path, 1, thumbnail=True)
        except NotFound:
            raise
        except Exception as e:  # no pixel data, an unsupported transfer syntax...
            raise NotAcceptable(f"cannot render a thumbnail: {e}") from None

    def respond(data):
        response = ResponseEnvelope(200, body=data)
        response.headers.setRawHeaders(b"content-type", [b"image/jpeg"])
        return response

    d = store.run(store.get_sync, sop_uid)
    return d.addCallback(found).addCallback(respond)
