"""The embedded sqlite index (WAL mode) of what the store holds.

Four tables - patients, studies, series, instances - each with a few indexed
columns for the common narrowing keys and the level's attributes as DICOM JSON.
A query narrows in SQL (UIDs, PatientID, AccessionNumber, dates, modality) and
decides in Python with :mod:`harmony.storage.query`, so every C-FIND matching
rule applies to every stored attribute, not just the indexed ones.

All functions take a ``sqlite3.Connection`` and run on a storage thread.
"""

from __future__ import annotations

import json
import sqlite3

from harmony.storage.query import (COMPUTED, IMAGE, PATIENT, SERIES, STUDY, split_levels, tag_hex,
                                   text_values)

SCHEMA = """
CREATE TABLE IF NOT EXISTS patients (
  pk INTEGER PRIMARY KEY, patient_key TEXT NOT NULL UNIQUE, patient_id TEXT, attrs TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS studies (
  pk INTEGER PRIMARY KEY, study_uid TEXT NOT NULL UNIQUE, patient_pk INTEGER NOT NULL REFERENCES patients(pk),
  accession TEXT, study_date TEXT, attrs TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS series (
  pk INTEGER PRIMARY KEY, series_uid TEXT NOT NULL UNIQUE, study_pk INTEGER NOT NULL REFERENCES studies(pk),
  modality TEXT, attrs TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS instances (
  pk INTEGER PRIMARY KEY, sop_uid TEXT NOT NULL UNIQUE, series_pk INTEGER NOT NULL REFERENCES series(pk),
  sop_class_uid TEXT, transfer_syntax_uid TEXT, relpath TEXT NOT NULL, size INTEGER, stored_at REAL,
  attrs TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS patients_id ON patients(patient_id);
CREATE INDEX IF NOT EXISTS studies_patient ON studies(patient_pk);
CREATE INDEX IF NOT EXISTS studies_accession ON studies(accession);
CREATE INDEX IF NOT EXISTS studies_date ON studies(study_date);
CREATE INDEX IF NOT EXISTS series_study ON series(study_pk);
CREATE INDEX IF NOT EXISTS series_modality ON series(modality);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_pk);
"""

T_PATIENT_ID = tag_hex("PatientID")
T_ISSUER = tag_hex("IssuerOfPatientID")
T_STUDY_UID = tag_hex("StudyInstanceUID")
T_SERIES_UID = tag_hex("SeriesInstanceUID")
T_SOP_UID = tag_hex("SOPInstanceUID")
T_ACCESSION = tag_hex("AccessionNumber")
T_STUDY_DATE = tag_hex("StudyDate")
T_MODALITY = tag_hex("Modality")


def first(attrs: dict, th: str) -> str:
    values = text_values(attrs.get(th))
    return values[0] if values else ""


def upsert_instance(conn: sqlite3.Connection, attrs: dict, *, sop_class_uid: str, transfer_syntax_uid: str,
                    relpath: str, size: int, now: float) -> str | None:
    """Index one instance (inside the caller's transaction).

    Returns the relative path of a previous copy the caller should delete
    (same SOP Instance UID filed elsewhere), or None.
    """
    levels = split_levels(attrs)
    pid, issuer = first(attrs, T_PATIENT_ID), first(attrs, T_ISSUER)
    patient_pk = conn.execute(
        "INSERT INTO patients(patient_key, patient_id, attrs) VALUES(?,?,?) "
        "ON CONFLICT(patient_key) DO UPDATE SET attrs=excluded.attrs RETURNING pk",
        (f"{pid}\\{issuer}", pid, json.dumps(levels[PATIENT]))).fetchone()[0]
    study_pk = conn.execute(
        "INSERT INTO studies(study_uid, patient_pk, accession, study_date, attrs) VALUES(?,?,?,?,?) "
        "ON CONFLICT(study_uid) DO UPDATE SET patient_pk=excluded.patient_pk, accession=excluded.accession, "
        "study_date=excluded.study_date, attrs=excluded.attrs RETURNING pk",
        (first(attrs, T_STUDY_UID), patient_pk, first(attrs, T_ACCESSION), first(attrs, T_STUDY_DATE),
         json.dumps(levels[STUDY]))).fetchone()[0]
    series_pk = conn.execute(
        "INSERT INTO series(series_uid, study_pk, modality, attrs) VALUES(?,?,?,?) "
        "ON CONFLICT(series_uid) DO UPDATE SET study_pk=excluded.study_pk, modality=excluded.modality, "
        "attrs=excluded.attrs RETURNING pk",
        (first(attrs, T_SERIES_UID), study_pk, first(attrs, T_MODALITY), json.dumps(levels[SERIES]))).fetchone()[0]
    sop = first(attrs, T_SOP_UID)
    old = conn.execute("SELECT relpath, series_pk FROM instances WHERE sop_uid=?", (sop,)).fetchone()
    conn.execute(
        "INSERT INTO instances(sop_uid, series_pk, sop_class_uid, transfer_syntax_uid, relpath, size, stored_at, attrs) "
        "VALUES(?,?,?,?,?,?,?,?) ON CONFLICT(sop_uid) DO UPDATE SET series_pk=excluded.series_pk, "
        "sop_class_uid=excluded.sop_class_uid, transfer_syntax_uid=excluded.transfer_syntax_uid, "
        "relpath=excluded.relpath, size=excluded.size, stored_at=excluded.stored_at, attrs=excluded.attrs",
        (sop, series_pk, sop_class_uid, transfer_syntax_uid, relpath, size, now, json.dumps(attrs)))
    if old is not None and old[1] != series_pk:
        prune_empty(conn, old[1])
    if old is not None and old[0] != relpath:
        return old[0]
    return None


def prune_empty(conn: sqlite3.Connection, series_pk: int) -> None:
    """Drop a series, study and patient left with nothing under them."""
    row = conn.execute("SELECT study_pk FROM series WHERE pk=?", (series_pk,)).fetchone()
    if row is None:
        return
    study_pk = row[0]
    conn.execute("DELETE FROM series WHERE pk=? AND NOT EXISTS (SELECT 1 FROM instances WHERE series_pk=?)",
                 (series_pk, series_pk))
    row = conn.execute("SELECT patient_pk FROM studies WHERE pk=?", (study_pk,)).fetchone()
    conn.execute("DELETE FROM studies WHERE pk=? AND NOT EXISTS (SELECT 1 FROM series WHERE study_pk=?)",
                 (study_pk, study_pk))
    if row is not None:
        conn.execute("DELETE FROM patients WHERE pk=? AND NOT EXISTS (SELECT 1 FROM studies WHERE patient_pk=?)",
                     (row[0], row[0]))


def delete_instance(conn: sqlite3.Connection, sop_uid: str) -> str | None:
    """Remove one instance from the index; returns its relative path."""
    row = conn.execute("SELECT relpath, series_pk FROM instances WHERE sop_uid=?", (sop_uid,)).fetchone()
    if row is None:
        return None
    conn.execute("DELETE FROM instances WHERE sop_uid=?", (sop_uid,))
    prune_empty(conn, row[1])
    return row[0]


# --------------------------------------------------------------------------- queries

_COUNTS = {
    PATIENT: ("(SELECT count(*) FROM studies s2 WHERE s2.patient_pk=p.pk)",
              "(SELECT count(*) FROM series e2 JOIN studies s2 ON e2.study_pk=s2.pk WHERE s2.patient_pk=p.pk)",
              "(SELECT count(*) FROM instances i2 JOIN series e2 ON i2.series_pk=e2.pk "
              "JOIN studies s2 ON e2.study_pk=s2.pk WHERE s2.patient_pk=p.pk)"),
    STUDY: ("(SELECT group_concat(m, '\\') FROM (SELECT DISTINCT e2.modality AS m FROM series e2 "
            "WHERE e2.study_pk=st.pk ORDER BY m))",
            "(SELECT group_concat(c, '\\') FROM (SELECT DISTINCT i2.sop_class_uid AS c FROM instances i2 "
            "JOIN series e2 ON i2.series_pk=e2.pk WHERE e2.study_pk=st.pk ORDER BY c))",
            "(SELECT count(*) FROM series e2 WHERE e2.study_pk=st.pk)",
            "(SELECT count(*) FROM instances i2 JOIN series e2 ON i2.series_pk=e2.pk WHERE e2.study_pk=st.pk)"),
    SERIES: ("(SELECT count(*) FROM instances i2 WHERE i2.series_pk=se.pk)",),
}
_COMPUTED_VR = {"ModalitiesInStudy": "CS", "SOPClassesInStudy": "UI"}

_FROM = {
    PATIENT: "FROM patients p",
    STUDY: "FROM studies st JOIN patients p ON st.patient_pk=p.pk",
    SERIES: "FROM series se JOIN studies st ON se.study_pk=st.pk JOIN patients p ON st.patient_pk=p.pk",
    IMAGE: "FROM instances i JOIN series se ON i.series_pk=se.pk JOIN studies st ON se.study_pk=st.pk "
           "JOIN patients p ON st.patient_pk=p.pk",
}
_ATTR_COLS = {PATIENT: ("p",), STUDY: ("p", "st"), SERIES: ("p", "st", "se"), IMAGE: ("p", "st", "se", "i")}


def _prefilter(keys: list, level: str) -> tuple[list[str], list]:
    """SQL conditions for the indexed keys whose values are plain (no wildcard)."""
    where, args = [], []
    depth = ("PATIENT", "STUDY", "SERIES", "IMAGE").index(level)
    columns = {T_PATIENT_ID: ("p.patient_id", 0), T_STUDY_UID: ("st.study_uid", 1),
               T_ACCESSION: ("st.accession", 1), T_SERIES_UID: ("se.series_uid", 2),
               T_MODALITY: ("se.modality", 2), T_SOP_UID: ("i.sop_uid", 3)}
    for th, vr, values in keys:
        if not values or th not in columns:
            continue
        col, col_depth = columns[th]
        if col_depth > depth or any(("*" in v or "?" in v) for v in values):
            continue
        if vr == "PN":
            continue
        where.append(f"{col} IN ({','.join('?' * len(values))})")
        args.extend(v.strip() for v in values)
    for th, vr, values in keys:
        if th == T_STUDY_DATE and depth >= 1 and len(values) == 1 and "-" in values[0]:
            lo, _, hi = values[0].partition("-")
            if lo.strip():
                where.append("st.study_date >= ?")
                args.append(lo.strip())
            if hi.strip():
                where.append("substr(st.study_date, 1, ?) <= ?")
                args.extend([len(hi.strip()), hi.strip()])
    return where, args


def candidates(conn: sqlite3.Connection, keys: list, level: str):
    """Yield ``(record, row)`` for each entity at *level* the SQL prefilter lets
    through; *record* merges every level's attributes plus computed ones, and
    *row* carries the instance's file columns at IMAGE level."""
    cols = [f"{a}.attrs" for a in _ATTR_COLS[level]]
    computed = []
    for lvl in _ATTR_COLS_LEVELS[level]:
        computed.extend(zip(COMPUTED[lvl], _COUNTS[lvl]))
    cols += [expr for _name, expr in computed]
    if level == IMAGE:
        cols += ["i.relpath", "i.sop_class_uid", "i.transfer_syntax_uid", "i.size", "i.sop_uid",
                 "se.series_uid", "st.study_uid"]
    where, args = _prefilter(keys, level)
    sql = f"SELECT {', '.join(cols)} {_FROM[level]}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    n_attrs = len(_ATTR_COLS[level])
    for row in conn.execute(sql, args):
        record: dict = {}
        # Instance attributes first; each level's own record then wins for its
        # own tags (a patient renamed by a later study is renamed everywhere).
        for blob in reversed(row[:n_attrs]):
            record.update(json.loads(blob))
        for (name, _expr), value in zip(computed, row[n_attrs:n_attrs + len(computed)]):
            record[tag_hex(name)] = _computed_json(name, value)
        yield record, row[n_attrs + len(computed):]


_ATTR_COLS_LEVELS = {PATIENT: (PATIENT,), STUDY: (PATIENT, STUDY), SERIES: (PATIENT, STUDY, SERIES),
                     IMAGE: (PATIENT, STUDY, SERIES)}


def _computed_json(name: str, value) -> dict:
    vr = _COMPUTED_VR.get(name, "IS")
    if value is None or value == "":
        return {"vr": vr}
    if vr == "IS":
        return {"vr": vr, "Value": [int(value)]}
    return {"vr": vr, "Value": [v for v in str(value).split("\\") if v]}
