"""harmony.envelope: the protocol-neutral request and response, and bodies that stay streams until
someone needs them whole (then within a cap)."""

from __future__ import annotations

import io

import pytest
import pytest_twisted
from twisted.internet import task
from twisted.web.client import FileBodyProducer
from twisted.web.iweb import UNKNOWN_LENGTH

from harmony.envelope import (
    BytesProducer,
    CooperativeProducer,
    MadeOnRead,
    RequestEnvelope,
    ResponseEnvelope,
    as_producer,
    body_length,
    header,
    is_json_type,
    media_type,
    parse_query,
    read_body,
)
from harmony.errors import PayloadTooLarge
from tests.memory import failure_of, fired, request, result_of


def _file_producer(data: bytes, clock: task.Clock, **kwargs):
    cooperator = task.Cooperator(scheduler=lambda step: clock.callLater(0, step),
                                 terminationPredicateFactory=lambda: lambda: True)
    return FileBodyProducer(io.BytesIO(data), cooperator=cooperator, **kwargs)


def _drive(d, clock):
    while not fired(d):
        clock.advance(0)
    return d


def test_media_types_and_json():
    assert media_type("Application/FHIR+JSON; charset=utf-8") == "application/fhir+json"
    assert media_type(b"text/plain") == "text/plain" and media_type(None) == ""
    assert is_json_type("application/dicom+json") and is_json_type("application/vnd.x+json")
    assert not is_json_type("text/json-ish")


def test_query_and_headers_keep_order_repeats_and_blanks():
    assert parse_query(b"a=1&b=&a=2&c") == [("a", "1"), ("b", ""), ("a", "2"), ("c", "")]
    req = request(headers={"X-A": ["one", "two"]}, query=parse_query("k=v&k=w"))
    assert req.header("x-a") == "one" and req.header("absent", "d") == "d"
    assert req.query_values("k") == ["v", "w"] and req.query_value("k") == "v" and req.query_value("z") is None
    assert header(req.headers, "X-A") == "one"


def test_a_json_response_knows_its_document():
    response = ResponseEnvelope.json(201, {"ü": [1]}, "application/fhir+json")
    assert response.body == '{"ü":[1]}'.encode() and response.normalized == {"ü": [1]}
    assert response.header("content-type") == "application/fhir+json"


def test_a_normalized_view_made_on_read_is_made_once_and_only_when_read():
    made = []
    env = RequestEnvelope(normalized=MadeOnRead(lambda: made.append(1) or {"00080052": {"vr": "CS"}}))
    assert not env.normalized_read() and made == []
    assert env.normalized == {"00080052": {"vr": "CS"}} and env.normalized_read()
    assert env.normalized is env.normalized and made == [1]
    env.normalized = {"replaced": True}            # a middleware replacing it
    assert env.normalized == {"replaced": True} and made == [1]
    given = RequestEnvelope(normalized={"a": 1})
    assert given.normalized_read() and given.normalized == {"a": 1}
    assert RequestEnvelope().normalized is None and RequestEnvelope().normalized_read()


def test_body_length_and_producers():
    assert (body_length(None), body_length(b"abc"), body_length(BytesProducer(b"abcd"))) == (0, 3, 4)
    assert body_length(type("Stream", (), {"length": UNKNOWN_LENGTH})()) is None
    assert as_producer(b"") is None and as_producer(None) is None
    producer = as_producer(b"xyz")
    assert isinstance(producer, BytesProducer) and result_of(read_body(producer)) == b"xyz"


def test_read_body_caps_bytes_and_streams():
    assert result_of(read_body(b"12345", 5)) == b"12345"
    failure_of(read_body(b"123456", 5), PayloadTooLarge)
    failure_of(read_body(BytesProducer(b"123456"), 5), PayloadTooLarge)  # a known length: refused unread
    clock = task.Clock()
    unknown = _file_producer(b"x" * 100, clock, readSize=10)
    unknown.length = UNKNOWN_LENGTH
    d = _drive(read_body(unknown, 50), clock)
    failure_of(d, PayloadTooLarge)
    assert result_of(_drive(read_body(_file_producer(b"y" * 100, clock, readSize=10), None), clock)) == b"y" * 100


class Countdown(CooperativeProducer):
    def __init__(self, n):
        self.n = n
        self.stopped = False

    def _produce(self, consumer):
        for i in range(self.n):
            consumer.write(b"%d," % i)
            yield None

    def _stopped(self):
        self.stopped = True


class Broken(CooperativeProducer):
    def _produce(self, consumer):
        consumer.write(b"half")
        yield None
        raise RuntimeError("the PACS went away")


@pytest_twisted.ensureDeferred
async def test_a_cooperative_producer_writes_pauses_and_fails_loudly():
    sink = io.BytesIO()
    producer = Countdown(3)
    await producer.startProducing(sink)
    assert sink.getvalue() == b"0,1,2,"
    with pytest.raises(RuntimeError, match="went away"):
        await Broken().startProducing(io.BytesIO())  # a truncated body must never look complete
    endless = Countdown(10**9)
    d = endless.startProducing(io.BytesIO())
    endless.pauseProducing()
    endless.resumeProducing()
    endless.stopProducing()
    assert endless.stopped
    with pytest.raises(task.TaskStopped):
        await d


class Holding(CooperativeProducer):
    """Writes while holding something it must let go of, however it ends (a staged file)."""

    def __init__(self):
        self.held = False

    def _produce(self, consumer):
        self.held = True
        try:
            while True:
                consumer.write(b"x")
                yield None
        finally:
            self.held = False


@pytest_twisted.ensureDeferred
async def test_a_stopped_producer_lets_go_of_what_it_was_writing_at_once():
    """Its generator is closed on stop, so its ``finally`` runs then (the instance being
    sent is released), not when the garbage collector gets to the stopped generator."""
    from twisted.internet import reactor
    body = Holding()
    d = body.startProducing(io.BytesIO())
    for _ in range(100):
        if body.held:
            break
        await task.deferLater(reactor, 0, lambda: None)
    assert body.held, "the cooperator never started the body"
    body.stopProducing()
    assert not body.held
    with pytest.raises(task.TaskStopped):
        await d


def test_request_ids_are_random_v4_uuids_and_differ_in_forked_workers():
    import os
    import uuid

    from harmony.envelope import new_request_id

    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(uuid.UUID(i).version == 4 and uuid.UUID(i).variant == uuid.RFC_4122 for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a worker process: CPython reseeds the generator after fork
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    assert len(child) == 32 and child != new_request_id()
