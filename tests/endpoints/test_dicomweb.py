"""The dicomweb endpoint's parsing and refusals: unit tests of the pure parts,
and the envelope it hands a pipeline (seen through the echo backend)."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
import treq

from harmony.dicomweb import accept, qido, routes
from harmony.endpoints.dicomweb import stow_boundary
from harmony.errors import BadRequest, MethodNotAllowed, NotAcceptable, NotFound, UnsupportedMediaType
from tests.harness import MINIMAL_MAIN, start_harmony, write_config

# ---------------------------------------------------------------- pure parsing


@pytest.mark.parametrize("method,path,service,resource,level", [
    ("GET", "/studies", "qido", "studies", "STUDY"),
    ("GET", "/series", "qido", "series", "SERIES"),
    ("GET", "/instances", "qido", "instances", "IMAGE"),
    ("GET", "/studies/1.2/series", "qido", "series", "SERIES"),
    ("GET", "/studies/1.2/instances", "qido", "instances", "IMAGE"),
    ("GET", "/studies/1.2/series/1.3/instances", "qido", "instances", "IMAGE"),
    ("GET", "/studies/1.2", "wado", "study", "STUDY"),
    ("GET", "/studies/1.2/metadata", "wado", "metadata", "STUDY"),
    ("GET", "/studies/1.2/series/1.3", "wado", "series", "SERIES"),
    ("GET", "/studies/1.2/series/1.3/rendered", "wado", "rendered", "SERIES"),
    ("GET", "/studies/1.2/series/1.3/instances/1.4", "wado", "instance", "IMAGE"),
    ("GET", "/studies/1.2/series/1.3/instances/1.4/thumbnail", "wado", "thumbnail", "IMAGE"),
    ("GET", "/studies/1.2/series/1.3/instances/1.4/frames/1,3", "wado", "frames", "IMAGE"),
    ("GET", "/studies/1.2/series/1.3/instances/1.4/frames/2/rendered", "wado", "rendered", "IMAGE"),
    ("GET", "/studies/1.2/series/1.3/instances/1.4/bulkdata/7fe00010", "wado", "bulkdata", "IMAGE"),
    ("POST", "/studies", "stow", "studies", "STUDY"),
    ("POST", "/studies/1.2", "stow", "studies", "STUDY"),
    ("GET", "/aets/PACS_1/rs/studies", "qido", "studies", "STUDY"),
])
def test_routes(method, path, service, resource, level):
    r = routes.parse_path(method, path)
    assert (r.service, r.resource, r.level) == (service, resource, level)
    assert r.path == path.replace("/aets/PACS_1/rs", "")


def test_route_details():
    r = routes.parse_path("GET", "/aets/PACS/rs/studies/1.2/series/1.3/instances/1.4/frames/1,3")
    assert (r.aet, r.study_uid, r.series_uid, r.instance_uid, r.frames) == ("PACS", "1.2", "1.3", "1.4", (1, 3))
    assert routes.parse_path("GET", "/studies/1/series/2/instances/3/bulkdata/00540016/0/00181072").bulk_path == \
        ("00540016", "0", "00181072")


@pytest.mark.parametrize("method,path,error", [
    ("GET", "/studies/..", BadRequest),
    ("GET", "/studies/1.2/series/%2e%2e", BadRequest),
    ("GET", "/studies/1.2/series/..%2F..%2Fetc", BadRequest),
    ("GET", "/studies/1.2a", BadRequest),          # a letter: not a UID
    ("GET", "/studies/" + "1." * 40 + "1", BadRequest),  # longer than 64
    ("GET", "/studies/1/series/2/instances/3/frames/0", BadRequest),
    ("GET", "/studies/1/series/2/instances/3/frames/1,x", BadRequest),
    ("GET", "/studies/1/series/2/instances/3/bulkdata/7FE00010/0", BadRequest),
    ("GET", "/studies/1/series/2/instances/3/bulkdata/../x", BadRequest),
    ("GET", "/aets/../rs/studies", BadRequest),
    ("GET", "/aets/A/xx/studies", NotFound),
    ("GET", "/patients", NotFound),
    ("GET", "/", NotFound),
    ("DELETE", "/studies/1.2", MethodNotAllowed),
    ("POST", "/series", MethodNotAllowed),
])
def test_route_refusals(method, path, error):
    with pytest.raises(error):
        routes.parse_path(method, path)


def test_qido_parameters_to_dicom_json():
    q, warnings = qido.parse_query([
        ("PatientID", "PAT*"), ("00100010", "DOE^J?"), ("StudyDate", "20240101-"), ("StudyTime", "0800-1200"),
        ("StudyInstanceUID", "1.2.3,1.2.4"), ("StudyInstanceUID", "1.2.5"), ("AccessionNumber", ""),
        ("ReferencedStudySequence.ReferencedSOPInstanceUID", "1.9"), ("SeriesNumber", "3"),
        ("includefield", "StudyDescription,00081030"), ("includefield", "ModalitiesInStudy"),
        ("fuzzymatching", "true"), ("limit", "10"), ("offset", "5"), ("_", "123"),
    ], max_limit=5)
    m = q.match
    assert m["00100020"] == {"vr": "LO", "Value": ["PAT*"]}
    assert m["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "DOE^J?"}]}
    assert m["00080020"] == {"vr": "DA", "Value": ["20240101-"]}
    assert m["00080030"] == {"vr": "TM", "Value": ["0800-1200"]}
    assert m["0020000D"] == {"vr": "UI", "Value": ["1.2.3", "1.2.4", "1.2.5"]}
    assert m["00080050"] == {"vr": "SH"}
    assert m["00081110"] == {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.9"]}}]}
    assert m["00200011"] == {"vr": "IS", "Value": [3]}
    assert q.includefield == ["00081030", "00080061"]
    assert q.fuzzymatching and q.offset == 5
    assert q.limit == 5 and "maximum 5" in warnings[0]
    pairs = qido.to_query_pairs(m, q, skip={"00200011"})
    assert ("00100010", "DOE^J?") in pairs and ("0020000D", "1.2.3,1.2.4,1.2.5") in pairs
    assert ("00081110.00081155", "1.9") in pairs and ("limit", "5") in pairs
    assert not any(k == "00200011" for k, _ in pairs)
    again, _ = qido.parse_query(pairs)
    assert again.match == {k: v for k, v in m.items() if k != "00200011"}


@pytest.mark.parametrize("pairs", [
    [("limit", "0")], [("limit", "-1")], [("limit", "ten")], [("offset", "-3")], [("limit", "1"), ("limit", "2")],
    [("fuzzymatching", "yes")], [("NoSuchKeyword", "x")], [("0010002", "x")],
    [("StudyDate", "2024")], [("StudyDate", "20240101-2024")], [("StudyInstanceUID", "1.2.*")],
    [("SeriesNumber", "abc")], [("PatientID", "A"), ("PatientID", "B")], [("PixelData", "x")],
    [("includefield", "Bogus")],
    # absurd numbers (issue 12, defect 15): int() refuses 4,301+ digits, isdigit() admits superscripts
    [("limit", "9" * 5000)], [("offset", "1" * 5000)], [("limit", "1" * 19)], [("limit", "\u00b2")],
    [("offset", "\u0661")],
])
def test_qido_refusals(pairs):
    with pytest.raises(BadRequest):
        qido.parse_query(pairs)


def test_return_keys_span_parent_levels():
    q, _ = qido.parse_query([("includefield", "StudyDescription")])
    keys = qido.return_keys("IMAGE", q, study_in_path=False, series_in_path=False)
    assert "00100020" in keys and "0020000E" in keys and "00080018" in keys and keys[-1] == "00081030"
    assert "00100020" in qido.return_keys("SERIES", q, study_in_path=True, series_in_path=False)
    assert "0020000E" not in qido.return_keys("STUDY", q)


@pytest.mark.parametrize("kind,header,expected", [
    ("qido", None, ("application/dicom+json", False, None)),
    ("qido", "application/json", ("application/dicom+json", False, None)),
    ("retrieve", None, ("application/dicom", True, None)),
    ("retrieve", 'multipart/related; type="application/dicom"; transfer-syntax=*', ("application/dicom", True, "*")),
    ("retrieve", "multipart/related; type=application/dicom; transfer-syntax=1.2.840.10008.1.2.1",
     ("application/dicom", True, "1.2.840.10008.1.2.1")),
    ("frames", 'multipart/related; type="application/octet-stream"; transfer-syntax=*',
     ("application/octet-stream", True, "*")),
    ("frames", "application/octet-stream", ("application/octet-stream", False, None)),
    ("frames", 'multipart/related; type="image/png"', ("image/png", True, None)),
    ("rendered", "image/png;q=0.5, image/jpeg", ("image/jpeg", False, None)),
    ("rendered", "image/*", ("image/jpeg", False, None)),
    ("rendered", "text/html, */*;q=0.1", ("image/jpeg", False, None)),
])
def test_accept_negotiation(kind, header, expected):
    assert accept.negotiate(kind, header) == expected


@pytest.mark.parametrize("kind,header", [
    ("qido", 'multipart/related; type="application/dicom+xml"'),
    ("retrieve", "application/zip"),
    ("retrieve", 'multipart/related; type="image/jpeg"'),
    ("rendered", "image/gif"),
    ("metadata", "application/dicom+xml"),
])
def test_accept_refusals(kind, header):
    with pytest.raises(NotAcceptable):
        accept.negotiate(kind, header)


def test_stow_content_types():
    assert stow_boundary('multipart/related; type="application/dicom"; boundary="a b=c"') == "a b=c"
    assert stow_boundary("Multipart/Related; boundary=xyz; start=foo; type=application/dicom") == "xyz"
    with pytest.raises(UnsupportedMediaType):
        stow_boundary("application/dicom")
    with pytest.raises(UnsupportedMediaType):
        stow_boundary('multipart/related; type="application/dicom+json"; boundary=x')
    with pytest.raises(BadRequest):
        stow_boundary('multipart/related; type="application/dicom"')
    # Orthanc 1.10's STOW-RS client: "<uuid>-<uuid>", 73 characters (RFC 2046 says 70).
    orthanc = "3b5a8e2c-6f0e-4a7b-9d1e-0c2f4e6a8b10-8d1f2e3c-4b5a-4c6d-8e7f-9a0b1c2d3e4f"
    assert len(orthanc) == 73
    assert stow_boundary(f'multipart/related; type="application/dicom"; boundary={orthanc}') == orthanc
    assert stow_boundary("multipart/related; boundary=" + "b" * 200) == "b" * 200
    with pytest.raises(BadRequest):
        stow_boundary("multipart/related; boundary=" + "b" * 201)


# ---------------------------------------------------------------- through a pipeline

ECHO = """
[pipelines.dw]
networks = ["default"]
endpoints = ["web"]
backends = ["echo"]

[endpoints.web]
service = "dicomweb"
[endpoints.web.options]
path_prefix = "/dw"
max_upload_bytes = 1000
qido_max_limit = 50

[pipelines.public]
networks = ["default"]
endpoints = ["public"]
backends = ["echo"]

[endpoints.public]
service = "dicomweb"
[endpoints.public.options]
path_prefix = "/pub"
public_base_url = "https://images.example.org/dicom-web/"

[backends.echo]
service = "echo"
"""


@pytest.fixture(scope="module")
def harmony(tmp_path_factory):
    path = write_config(tmp_path_factory.mktemp("dwe"), MINIMAL_MAIN, {"p": ECHO})
    running = pytest_twisted.blockon(start_harmony(path))
    yield running
    pytest_twisted.blockon(running.stop())


@pytest_twisted.ensureDeferred
async def test_envelope_for_qido(harmony):
    resp = await treq.get(harmony.url("/dw/studies/1.2.3/series?Modality=CT&includefield=all&limit=500"),
                          headers={"Host": "127.0.0.1"})
    assert resp.code == 200
    assert resp.headers.getRawHeaders("warning")[0].startswith("299 harmony")
    doc = json.loads(await resp.content())
    md = doc["metadata"]
    assert md["protocol"] == "dicomweb" and md["dicomweb.service"] == "qido"
    assert md["dicomweb.resource"] == "series" and md["query_level"] == "SERIES"
    assert md["dicomweb.study_uid"] == "1.2.3" and md["dicomweb.includefield"] == "all"
    assert md["dicomweb.limit"] == "50" and md["dicomweb.accept"] == "application/dicom+json"
    # Host without a port (as dicomweb-client sends it) is completed with the real port.
    assert md["dicomweb.base_url"] == harmony.url("/dw")
    assert doc["normalized"] == {"00080060": {"vr": "CS", "Value": ["CT"]},
                                 "0020000D": {"vr": "UI", "Value": ["1.2.3"]}}


@pytest_twisted.ensureDeferred
async def test_public_base_url_wins_over_forwarded_headers(harmony):
    resp = await treq.get(harmony.url("/pub/aets/X/rs/instances"), headers={"X-Forwarded-Host": "evil.example"})
    md = json.loads(await resp.content())["metadata"]
    assert md["dicomweb.base_url"] == "https://images.example.org/dicom-web/aets/X/rs"


@pytest_twisted.ensureDeferred
async def test_envelope_for_frames_and_forwarded_base(harmony):
    resp = await treq.get(harmony.url("/dw/aets/PACS/rs/studies/1/series/2/instances/3/frames/1,2"),
                          headers={"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*',
                                   "X-Forwarded-Proto": "https", "X-Forwarded-Host": "viewer.example:8443"})
    md = json.loads(await resp.content())["metadata"]
    assert md["dicomweb.frames"] == "1,2" and md["dicomweb.transfer_syntax"] == "*"
    assert md["dicomweb.aet"] == "PACS" and md["dicomweb.path"] == "/studies/1/series/2/instances/3/frames/1,2"
    assert md["dicomweb.base_url"] == "https://viewer.example:8443/dw/aets/PACS/rs"


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("method,path,headers,body,status", [
    ("GET", "/dw/studies?limit=0", {}, b"", 400),
    ("GET", "/dw/studies?limit=" + "9" * 5000, {}, b"", 400),
    ("GET", "/dw/studies?offset=" + "9" * 5000, {}, b"", 400),
    ("GET", "/dw/studies?Bogus=1", {}, b"", 400),
    ("GET", "/dw/studies/1.2.x/series", {}, b"", 400),
    ("GET", "/dw/studies/1.2/series/..%2F..%2F", {}, b"", 400),
    ("GET", "/dw/studies/1.2", {"Accept": "application/zip"}, b"", 406),
    ("GET", "/dw/studies/1.2/rendered", {"Accept": "image/gif"}, b"", 406),
    ("POST", "/dw/studies", {"Content-Type": "application/dicom"}, b"x", 415),
    ("POST", "/dw/studies", {"Content-Type": "multipart/related; type=application/dicom"}, b"x", 400),
    ("POST", "/dw/studies", {"Content-Type": "multipart/related; boundary=B"}, b"not multipart", 400),
    ("POST", "/dw/studies", {"Content-Type": "multipart/related; boundary=B"}, b"--B\r\n" + b"x" * 2000, 413),
    ("PUT", "/dw/studies", {}, b"", 405),
])
async def test_refusals_carry_problem_details(harmony, method, path, headers, body, status):
    resp = await treq.request(method, harmony.url(path), headers=headers, data=body or None)
    assert resp.code == status
    doc = json.loads(await resp.content())
    assert doc["status"] == status and doc["detail"]
