"""harmony.backends.echo: the echo shows exactly what middleware made of a request."""

from __future__ import annotations

import io
import json

from twisted.internet import task
from twisted.web.client import FileBodyProducer

from harmony.backends.echo import EchoBackend
from tests.memory import build, fired, request, result_of


def test_the_echo_describes_the_request():
    req = request("PUT", "/x", headers={"X-A": ["1", "2"]}, body=b"hello", query=[("q", "1"), ("q", "2")],
                  metadata={"auth.sub": "alice"}, normalized={"k": "v"})
    response = result_of(build(EchoBackend, name="echo").send(req))
    assert response.status == 200 and response.header("content-type") == "application/json"
    doc = json.loads(response.body)
    assert doc["method"] == "PUT" and doc["subpath"] == "/x"
    assert doc["query"] == {"q": ["1", "2"]} and doc["headers"]["x-a"] == ["1", "2"]
    assert doc["metadata"] == {"auth.sub": "alice"} and doc["normalized"] == {"k": "v"}
    assert (doc["body"], doc["body_encoding"]) == ("hello", "utf-8")


def test_binary_bodies_come_back_as_base64():
    doc = json.loads(result_of(EchoBackend("echo").send(request(body=b"\xff\x00"))).body)
    assert (doc["body"], doc["body_encoding"]) == ("/wA=", "base64")


def test_a_streamed_body_is_read_whole():
    clock = task.Clock()
    cooperator = task.Cooperator(scheduler=lambda step: clock.callLater(0, step))
    body = FileBodyProducer(io.BytesIO(b"abc" * 1000), cooperator=cooperator, readSize=512)
    d = EchoBackend("echo").send(request(body=body))
    while not fired(d):
        clock.advance(0)
    assert json.loads(result_of(d).body)["body"] == "abc" * 1000
