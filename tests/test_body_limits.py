"""Oversized request bodies are refused where they arrive (issue 12, defect 16).

A declared Content-Length over the endpoint's limit gets 413 as soon as the
head is in: the raw-socket client sends the head only (a 2 GiB upload it never
sends), so a 413 can only come from the head.  A chunked body is cut the moment
it passes the limit: the client sends one chunk past it and never the end,
so again the answer can only come from the cut.  Nothing reaches the upstream.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import defer

from tests.harness import ECHO, MINIMAL_MAIN, http_pipeline, raw_exchange, start_harmony, write_config

TWO_GIB = 2 * 1024 ** 3

def pipelines(upstream: str, store) -> str:
    """One endpoint of each HTTP-family type, each with a small body limit."""
    up = f'service = "http"\n[backends.up.options]\nbase_url = "{upstream}"'
    return (http_pipeline("api", "/api", "api", "up", up, options="max_body_bytes = 100000")
            + http_pipeline("dw", "/dw", "dw", "echo", ECHO, service="dicomweb", options="max_upload_bytes = 100000")
            + http_pipeline("fhir", "/fhir", "fhir", "echo", "", service="fhir", options="max_resource_bytes = 4096")
            + http_pipeline("jmix", "/jmix", "jmix", "echo", "", service="jmix",
                            options=f'store_dir = "{store}"\nmax_upload_bytes = 100000'))


@pytest.fixture
def harmony(tmp_path, upstream):
    text = pipelines(upstream.url + "/base", tmp_path / "jmix")
    running = pytest_twisted.blockon(defer.ensureDeferred(start_harmony(
        write_config(tmp_path / "conf", MINIMAL_MAIN, {"p": text}))))
    yield running
    pytest_twisted.blockon(running.stop())


ENDPOINTS = [
    # path, content type, limit option, body dialect
    ("/api/upload", "application/octet-stream", "max_body_bytes", "problem"),
    ("/dw/studies", 'multipart/related; type="application/dicom"; boundary=B', "max_upload_bytes", "problem"),
    ("/fhir/Patient", "application/fhir+json", "max_resource_bytes", "outcome"),
    ("/jmix/api/jmix", "application/zip", "max_upload_bytes", "problem"),
]


def split(answer: bytes):
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, json.loads(body)


def check_refusal(answer, option, dialect):
    head, doc = split(answer)
    assert head.startswith(b"HTTP/1.1 413 "), answer[:300]
    assert b"100 Continue" not in answer and b"connection: close" in head.lower()
    if dialect == "problem":
        assert b"application/problem+json" in head
        assert doc["status"] == 413 and option in doc["detail"] and doc["request_id"]
    else:
        assert doc["resourceType"] == "OperationOutcome" and option in json.dumps(doc)


@pytest.mark.parametrize("path,ctype,option,dialect", ENDPOINTS)
@pytest.mark.parametrize("expect", [False, True])
@pytest_twisted.ensureDeferred
async def test_a_declared_length_over_the_limit_is_refused_when_the_head_arrives(
        harmony, upstream, path, ctype, option, dialect, expect):
    head = (f"POST {path} HTTP/1.1\r\nHost: a\r\nContent-Type: {ctype}\r\nContent-Length: {TWO_GIB}\r\n"
            + ("Expect: 100-continue\r\n" if expect else "") + "\r\n").encode()
    answer = await raw_exchange(harmony.port(), head)  # the body is never sent
    check_refusal(answer, option, dialect)
    assert upstream.requests == []


@pytest.mark.parametrize("path,ctype,option,dialect", ENDPOINTS)
@pytest_twisted.ensureDeferred
async def test_a_chunked_body_is_cut_as_it_passes_the_limit(harmony, upstream, path, ctype, option, dialect):
    chunk = b"\x00" * 65536
    data = (f"POST {path} HTTP/1.1\r\nHost: a\r\nContent-Type: {ctype}\r\nTransfer-Encoding: chunked\r\n\r\n"
            .encode() + (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 2)  # 128 KiB, and no last chunk
    answer = await raw_exchange(harmony.port(), data)
    check_refusal(answer, option, dialect)
    assert upstream.requests == []
    target = harmony.service.runtime.backends["up"].target_pool.targets[0]
    assert target.failures_total == 0 and target.in_flight == 0  # the client's fault, not the upstream's


@pytest_twisted.ensureDeferred
async def test_bodies_within_the_limit_still_pass(harmony, upstream):
    import treq
    resp = await treq.post(harmony.url("/api/upload"), b"x" * 100000)
    assert resp.code == 200 and upstream.requests[-1]["body"] == b"x" * 100000
    resp = await treq.post(harmony.url("/api/upload"), b"x" * 100001)
    assert resp.code == 413
