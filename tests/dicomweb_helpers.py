"""Helpers for DICOMweb tests: dicomweb-client (blocking) run off the reactor,
and comparisons with Orthanc's own answers."""

from __future__ import annotations

import io

import pydicom
from dicomweb_client.api import DICOMwebClient
from twisted.internet.threads import deferToThread

#: Attributes QIDO comparisons look at (present in Orthanc's answers and ours).
COMPARE = ("0020000D", "0020000E", "00080018", "00100020", "00100010", "00080020", "00080060",
           "00080050", "00201206", "00201208", "00201209", "00200011", "00200013", "0008103E")


def client(url: str) -> DICOMwebClient:
    return DICOMwebClient(url=url)


def in_thread(fn, *args, **kwargs):
    """dicomweb-client is blocking (requests): run it on the thread pool."""
    return deferToThread(fn, *args, **kwargs)


def strip_padding(v):
    return v.rstrip(" \x00") if isinstance(v, str) else v


def summary(result: dict, keys=COMPARE) -> dict:
    out = {}
    for k in keys:
        if k in result and result[k].get("Value"):
            vals = result[k]["Value"]
            out[k] = tuple(str(v.get("Alphabetic", v)) if isinstance(v, dict) else strip_padding(str(v))
                           for v in vals)
    return out


def summaries(results: list, key="00080018", keys=COMPARE) -> list:
    return sorted((summary(r, keys) for r in results), key=lambda s: tuple(sorted(s.items())))


def same_dataset(a: pydicom.Dataset, b: pydicom.Dataset) -> bool:
    """Same attributes and values, file meta aside (each server writes its own)."""
    return {e.tag: e.value for e in a if e.tag.group != 0x0002} == {e.tag: e.value for e in b if e.tag.group != 0x0002}


def read(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def orthanc_qido(orthanc, path: str, params: dict | None = None) -> list:
    """Orthanc's own QIDO answer, with the query sent unencoded (Orthanc 1.10
    does not percent-decode, so dicomweb-client's '%2A' is no wildcard there)."""
    import json as _json
    query = "&".join(f"{k}={v}" for k, v in (params or {}).items())
    raw = orthanc.rest("GET", "/dicom-web" + path + ("?" + query if query else ""))
    return _json.loads(raw) if isinstance(raw, (bytes, str)) and raw else (raw or [])


def multipart(parts: list[bytes], boundary="harmony-test-boundary"):
    """A STOW-RS body of application/dicom *parts*, and its Content-Type."""
    out = b""
    for p in parts:
        out += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, f'multipart/related; type="application/dicom"; boundary="{boundary}"'


#: Corpus studies 1 and 3 (tests/dicom_data.py).
S1, S3 = "1.2.826.0.1.3680043.10.543.1.1", "1.2.826.0.1.3680043.10.543.1.3"
#: (client method, its kwargs, the same query as an Orthanc QIDO path, params): compared answer for answer.
QIDO_CASES = [
    ("search_for_studies", {}, "/studies", {}),
    ("search_for_studies", {"search_filters": {"PatientID": "PAT001"}}, "/studies", {"PatientID": "PAT001"}),
    ("search_for_studies", {"search_filters": {"StudyDate": "20230101-20241231"}}, "/studies",
     {"StudyDate": "20230101-20241231"}),
    ("search_for_studies", {"search_filters": {"AccessionNumber": "ACC00*"}}, "/studies", {"AccessionNumber": "ACC00*"}),
    ("search_for_studies", {"search_filters": {"PatientName": "TEST^B*"}}, "/studies", {"PatientName": "TEST^B*"}),
    ("search_for_series", {"search_filters": {"Modality": "MR"}}, "/series", {"Modality": "MR"}),
    ("search_for_series", {"study_instance_uid": S1}, f"/studies/{S1}/series", {}),
    ("search_for_instances", {"study_instance_uid": S3, "series_instance_uid": S3 + ".1"},
     f"/studies/{S3}/series/{S3}.1/instances", {}),
    ("search_for_instances", {"search_filters": {"SeriesDescription": "AXIAL"}}, "/instances",
     {"SeriesDescription": "AXIAL"}),
    ("search_for_studies", {"fields": ["StudyDescription"]}, "/studies", {"includefield": "StudyDescription"}),
]


def bridge_pipeline(name: str, backend: str, prefix: str = "/dicomweb", middleware: str | None = None) -> str:
    """TOML: pipeline *name* = ``dicomweb`` endpoint ``{name}_web`` at *prefix* ->
    ``dicomweb_bridge`` *middleware* (``{name}_bridge``) -> the backend *backend* (defined elsewhere)."""
    middleware = middleware or f"{name}_bridge"
    return f"""
[pipelines.{name}]
networks = ["default"]
endpoints = ["{name}_web"]
middleware = ["{middleware}"]
backends = ["{backend}"]

[endpoints.{name}_web]
service = "dicomweb"
[endpoints.{name}_web.options]
path_prefix = "{prefix}"

[middleware.{middleware}]
type = "dicomweb_bridge"
"""


#: TOML: Harmony's own archive as backend ``archive`` (storage under the config's folder).
ARCHIVE_BACKEND = """
[storage.options]
path = "store"
min_free_mb = 0

[backends.archive]
service = "local_archive"
"""


def dicomweb_proxy_pipeline(name: str, prefix: str, base_url: str, endpoint_options: str = "",
                            backend_options: str = "") -> str:
    """TOML: pipeline *name* = ``dicomweb`` endpoint ``{name}_web`` at *prefix* ->
    ``dicomweb`` backend *name* forwarding to *base_url* (extra option lines for either)."""
    return f"""
[pipelines.{name}]
networks = ["default"]
endpoints = ["{name}_web"]
backends = ["{name}"]

[endpoints.{name}_web]
service = "dicomweb"
[endpoints.{name}_web.options]
path_prefix = "{prefix}"
{endpoint_options}
[backends.{name}]
service = "dicomweb"
[backends.{name}.options]
base_url = "{base_url}"
{backend_options}
"""


def assert_wado_equal(proxy, native, corpus, inst):
    """Blocking: WADO-RS instance, series and study of *inst* from *proxy* equal
    *native*'s (Orthanc's plugin) answers, as stored (transfer-syntax=*)."""
    media = [("application/dicom", "*")]
    ours = proxy.retrieve_instance(inst.study_uid, inst.series_uid, inst.sop_uid, media_types=media)
    theirs = native.retrieve_instance(inst.study_uid, inst.series_uid, inst.sop_uid, media_types=media)
    assert same_dataset(ours, theirs)
    series = proxy.retrieve_series(inst.study_uid, inst.series_uid, media_types=media)
    assert sorted(d.SOPInstanceUID for d in series) == sorted(i.sop_uid for i in corpus
                                                             if i.series_uid == inst.series_uid)
    study = proxy.retrieve_study(inst.study_uid, media_types=media)
    native_study = native.retrieve_study(inst.study_uid, media_types=media)
    by_uid = {d.SOPInstanceUID: d for d in native_study}
    assert len(study) == len(native_study) and all(same_dataset(d, by_uid[d.SOPInstanceUID]) for d in study)

