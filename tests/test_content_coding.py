"""Content codings through a running Harmony, hostile cases included.

The upstream here is the recording test server (tests/harness.py) made to
compress *regardless* of what it was asked: real servers do that (and
Orthanc, which honours the request, is used in test_dicomweb_third_party.py),
but none we can run can be made to, or to send a gzip bomb or a coding we do
not support.  The clients are python requests (gzip by default) and treq.
"""

from __future__ import annotations

import gzip
import io
import json

import pytest
import pytest_twisted
import requests
import treq

from tests.dicom_data import make_instance
from tests.dicomweb_helpers import ARCHIVE_BACKEND, bridge_pipeline, dicomweb_proxy_pipeline, in_thread, multipart
from tests.harness import MINIMAL_MAIN, proxy_pipeline, start_harmony, write_config

PIPES = ARCHIVE_BACKEND + bridge_pipeline("web", "archive", prefix="/archive") + """
[pipelines.api]
networks = ["default"]
endpoints = ["api"]
middleware = ["extract"]
backends = ["echo"]

[endpoints.api]
service = "http"
[endpoints.api.options]
path_prefix = "/api"

[middleware.extract]
type = "json_extractor"
strict = true
max_body_bytes = 100000

[backends.echo]
service = "echo"
"""

DICOM_JSON = b"application/dicom+json"


@pytest.fixture
def harmony(tmp_path, upstream):
    pipes = PIPES + dicomweb_proxy_pipeline("up", "/up", f"{upstream.url}/dw", "max_upload_bytes = 200000",
                                            "max_json_bytes = 100000")
    pipes += proxy_pipeline(upstream.url, name="raw", prefix="/raw", endpoint="raw", backend="rawup")
    path = write_config(tmp_path, MINIMAL_MAIN + pipes)
    running = pytest_twisted.blockon(start_harmony(path))
    running.upstream = upstream
    yield running
    pytest_twisted.blockon(running.stop())


def studies(upstream_url: str, n: int = 30) -> list:
    return [{"0020000D": {"vr": "UI", "Value": [f"1.2.3.{i}"]},
             "00081190": {"vr": "UR", "Value": [f"{upstream_url}/dw/studies/1.2.3.{i}"]},
             "00100010": {"vr": "PN", "Value": [{"Alphabetic": "CODING^TEST"}]}} for i in range(n)]


@pytest_twisted.ensureDeferred
async def test_gzip_the_upstream_was_not_asked_for_is_decoded_and_rewritten(harmony):
    up = harmony.upstream
    docs = studies(up.url)
    up.respond[b"/dw/studies"] = (200, {b"content-type": DICOM_JSON, b"content-encoding": b"gzip"},
                                  gzip.compress(json.dumps(docs).encode()))
    resp = await in_thread(requests.get, harmony.url("/up/studies"), timeout=30,
                           headers={"X-Forwarded-For": "198.51.100.7"})  # a remote client, via a local proxy
    assert resp.status_code == 200, resp.text
    assert up.requests[-1]["headers"][b"accept-encoding"] == [b"identity"]  # we asked for it plain
    got = resp.json()
    assert [d["00081190"]["Value"][0] for d in got] == [harmony.url(f"/up/studies/1.2.3.{i}") for i in range(30)]
    assert resp.headers["content-encoding"] == "gzip"  # and compressed it again for requests


@pytest_twisted.ensureDeferred
async def test_plain_passthrough_keeps_the_upstreams_coding_and_bytes(harmony):
    from twisted.internet import reactor
    from twisted.web.client import Agent
    from twisted.web.http_headers import Headers
    packed = gzip.compress(json.dumps(studies(harmony.upstream.url)).encode())
    harmony.upstream.respond[b"/doc"] = (200, {b"content-type": b"application/json",
                                               b"content-encoding": b"gzip"}, packed)
    resp = await Agent(reactor).request(b"GET", harmony.url("/raw/doc").encode(),
                                        Headers({"Accept-Encoding": ["gzip"], "X-Forwarded-For": ["198.51.100.7"]}))
    assert resp.code == 200, await treq.content(resp)
    assert resp.headers.getRawHeaders(b"content-encoding") == [b"gzip"]
    assert await treq.content(resp) == packed  # not decoded, not compressed twice
    assert not resp.headers.hasHeader(b"vary")  # the upstream's choice, not negotiated by us
    assert harmony.upstream.requests[-1]["headers"][b"accept-encoding"] == [b"gzip"]  # the client's, as sent


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("coding,body", [
    ("gzip", gzip.compress(b"[" + b" " * 5_000_000 + b"]")),   # ~5 KB on the wire, over max_json_bytes decoded
    ("gzip", b"not gzip"),
    ("br", b"\x0b\x01\x80[]\x03"),
])
async def test_upstream_bodies_we_cannot_read_are_502(harmony, coding, body):
    harmony.upstream.respond[b"/dw/studies"] = (200, {b"content-type": DICOM_JSON,
                                                      b"content-encoding": coding.encode()}, body)
    resp = await treq.get(harmony.url("/up/studies"))
    assert resp.code == 502
    problem = json.loads(await resp.content())
    assert problem["detail"] and problem["request_id"]


def _stow_body(rows=16, uid_root="1.2.826.0.1.3680043.10.1207.7"):
    datasets = [make_instance(patient_id="GZ-STOW", sop_uid=f"{uid_root}.{i}", seed=i, rows=rows, cols=rows)
                for i in (1, 2)]
    parts = []
    for ds in datasets:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        parts.append(buf.getvalue())
    return datasets, *multipart(parts)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("rows", [16, 512])  # in memory, and spooled to a file (> 256 KB compressed)
async def test_stow_with_a_gzip_request_body_is_stored(harmony, rows):
    datasets, body, ctype = _stow_body(rows, f"1.2.826.0.1.3680043.10.1207.{rows}")
    packed = gzip.compress(body)
    assert (len(packed) > 256 * 1024) is (rows == 512)
    resp = await in_thread(requests.post, harmony.url("/archive/studies"), data=packed, timeout=30,
                           headers={"Content-Type": ctype, "Content-Encoding": "gzip",
                                    "Accept": "application/dicom+json"})
    assert resp.status_code == 200, resp.text
    refs = resp.json()["00081199"]["Value"]
    assert sorted(r["00081155"]["Value"][0] for r in refs) == sorted(ds.SOPInstanceUID for ds in datasets)
    if rows != 16:
        return  # over /up's max_upload_bytes
    # A proxied STOW is decoded too: the upstream (which may not read gzip) gets it plain.
    resp = await in_thread(requests.post, harmony.url("/up/studies"), data=packed, timeout=30,
                           headers={"Content-Type": ctype, "Content-Encoding": "gzip"})
    assert resp.status_code == 200
    sent = harmony.upstream.requests[-1]
    assert sent["body"] == body and b"content-encoding" not in sent["headers"]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("prefix", ["/archive", "/up"])
@pytest.mark.parametrize("coding,mangle,status", [
    ("br", lambda b: b, 415),
    ("gzip, gzip", lambda b: gzip.compress(gzip.compress(b)), 415),
    ("gzip", lambda b: b"\x1f\x8b" + b"broken" * 100, 400),
    ("gzip", lambda b: gzip.compress(b)[:-100], 400),     # cut short
])
async def test_stow_request_codings_refused_clearly(harmony, prefix, coding, mangle, status):
    _, body, ctype = _stow_body()
    resp = await treq.post(harmony.url(prefix + "/studies"), mangle(body),
                           headers={"Content-Type": [ctype], "Content-Encoding": [coding]})
    assert resp.code == status
    assert json.loads(await resp.content())["status"] == status


@pytest_twisted.ensureDeferred
async def test_stow_gzip_bomb_is_cut_at_the_upload_cap_on_decoded_bytes(harmony):
    boundary = "harmony-test-boundary"
    bomb = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + b"\0" * 20_000_000)
    packed = gzip.compress(bomb)
    assert len(packed) < 200_000  # under max_upload_bytes on the wire
    ctype = f'multipart/related; type="application/dicom"; boundary={boundary}'
    resp = await treq.post(harmony.url("/up/studies"), packed,
                           headers={"Content-Type": [ctype], "Content-Encoding": ["gzip"]})
    assert resp.code == 413
    if harmony.upstream.requests:
        assert len(harmony.upstream.requests[-1]["body"]) <= 200_000 + 64 * 1024


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("coding,data,status", [
    ("gzip", gzip.compress(b'{"a": 1}'), 200),
    ("deflate", __import__("zlib").compress(b'{"a": 1}'), 200),
    ("br", b'{"a": 1}', 415),
    ("gzip", gzip.compress(b"[" + b" " * 1_000_000 + b"]"), 413),
    ("gzip", b"garbage", 400),
])
async def test_json_extractor_reads_coded_request_bodies(harmony, coding, data, status):
    resp = await treq.post(harmony.url("/api/x"), data,
                           headers={"Content-Type": ["application/json"], "Content-Encoding": [coding]})
    assert resp.code == status
    doc = json.loads(await resp.content())
    if status == 200:
        assert doc["normalized"] == {"a": 1}


