"""harmony.middleware.json_extractor in memory: JSON bodies parsed into ``normalized`` once, strict
mode as the client's error, streams read within the cap and kept as bytes for later steps."""

from __future__ import annotations

import io

from twisted.internet import task
from twisted.web.client import FileBodyProducer

from harmony.errors import BadRequest, PayloadTooLarge
from harmony.middleware.json_extractor import JsonExtractor
from tests.memory import build, failure_of, fired, request, response, result_of

JSON = {"Content-Type": "application/fhir+json"}


def test_a_json_body_is_parsed_into_normalized():
    out = result_of(build(JsonExtractor).on_request(request("POST", headers=JSON, body=b'{"a": [1]}')))
    assert out.normalized == {"a": [1]} and out.body == b'{"a": [1]}'


def test_other_types_empty_bodies_and_a_view_already_there_are_left_alone():
    mw = build(JsonExtractor)
    text = result_of(mw.on_request(request("POST", headers={"Content-Type": "text/plain"}, body=b"{}")))
    assert text.normalized is None
    assert result_of(mw.on_request(request("POST", headers=JSON, body=b"  "))).normalized is None
    there = request("POST", headers=JSON, body=b'{"new": 1}', normalized={"old": 1})
    assert result_of(mw.on_request(there)).normalized == {"old": 1}


def test_strict_mode_refuses_bad_json_and_lenient_mode_passes_it():
    bad = b'{"a": '
    failure_of(build(JsonExtractor, {"strict": True}).on_request(request("POST", headers=JSON, body=bad)),
               BadRequest)
    assert result_of(build(JsonExtractor).on_request(request("POST", headers=JSON, body=bad))).body == bad


def test_a_stream_is_read_within_the_cap_and_kept_as_bytes():
    clock = task.Clock()
    cooperator = task.Cooperator(scheduler=lambda step: clock.callLater(0, step))
    body = FileBodyProducer(io.BytesIO(b'{"k": "' + b"v" * 100 + b'"}'), cooperator=cooperator, readSize=16)
    d = build(JsonExtractor).on_request(request("POST", headers=JSON, body=body))
    while not fired(d):
        clock.advance(0)
    out = result_of(d)
    assert out.normalized == {"k": "v" * 100} and isinstance(out.body, bytes)
    too_big = request("POST", headers={**JSON, "Content-Length": "100"}, body=b"{" + b" " * 98 + b"}")
    failure_of(build(JsonExtractor, {"strict": True, "max_body_bytes": 10}).on_request(too_big), PayloadTooLarge)


def test_the_response_side_only_when_asked():
    resp = response(headers={"Content-Type": "application/json"}, body=b"[1, 2]")
    assert build(JsonExtractor).on_response(request(), resp) is resp and resp.normalized is None
    assert result_of(build(JsonExtractor, {"apply": "right"}).on_response(request(), resp)).normalized == [1, 2]
