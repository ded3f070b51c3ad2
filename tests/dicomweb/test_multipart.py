"""harmony.dicomweb.multipart: multipart/related written part by part and parsed incrementally into
files, with preambles, truncation, size caps and byte-by-byte arrival."""

from __future__ import annotations

import io
import re

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer, task
from twisted.web.client import FileBodyProducer

from harmony.dicomweb.multipart import MultipartWriter, Part, StowParser, multipart_bytes, parse_body, split_held
from harmony.errors import BadRequest, PayloadTooLarge
from tests.memory import failure_of, fired, result_of

PARTS = [Part("application/dicom", data=b"DICM-one"), Part("application/dicom", data=b"\r\n--not-a-boundary\r\n")]


def _body():
    return multipart_bytes(PARTS, "application/dicom", boundary="b0undary")


def _contents(parts):
    return [open(p.path, "rb").read() for p in parts]


def test_written_bodies_parse_back_even_a_byte_at_a_time(tmp_path):
    body, content_type = _body()
    assert content_type == 'multipart/related; type="application/dicom"; boundary=b0undary'
    parser = StowParser("b0undary", tmp_path)
    for i in range(len(body)):
        parser.feed(body[i:i + 1])
    parts = parser.close()
    assert _contents(parts) == [b"DICM-one", b"\r\n--not-a-boundary\r\n"]
    assert parts[0].content_type == "application/dicom" and parts[0].size == 8


def test_a_preamble_is_skipped_and_each_part_is_announced(tmp_path):
    body, _ = _body()
    seen = []
    parser = StowParser("b0undary", tmp_path, on_part=lambda p: seen.append(p.size))
    parser.feed(b"This is a preamble.\r\n" + body)
    assert len(parser.close()) == 2 and seen == [8, 20]


def test_the_part_folder_is_made_by_the_first_part_not_by_the_parser(tmp_path):
    """A parser is made on the reactor for every STOW-RS request: it touches no file
    system there; the folder appears (again, if it was removed) when a part is written."""
    body, _ = _body()
    folder = tmp_path / "stow" / "deeper"
    parser = StowParser("b0undary", folder)
    assert not folder.exists() and parser._incremental is None
    assert _contents(parser.parse_whole(body)) == [b"DICM-one", b"\r\n--not-a-boundary\r\n"]
    assert parser._incremental is None  # the canonical body needed no incremental parser
    for part in parser.parts:
        part.release()
    folder.rmdir()
    parser = StowParser("b0undary", folder)
    parser.feed(b"preamble\r\n" + body)
    assert len(parser.close()) == 2 and folder.is_dir()


@pytest.mark.parametrize("cut", [10, -5])
def test_a_truncated_body_is_refused_and_leaves_no_file(tmp_path, cut):
    body, _ = _body()
    parser = StowParser("b0undary", tmp_path)
    parser.feed(body[:cut])
    with pytest.raises(BadRequest, match="closing boundary"):
        parser.close()
    assert list(tmp_path.iterdir()) == []


def test_limits(tmp_path):
    body, _ = _body()
    with pytest.raises(PayloadTooLarge):
        StowParser("b0undary", tmp_path, max_bytes=20).feed(body)
    with pytest.raises(BadRequest, match="does not contain its boundary"):
        StowParser("other", tmp_path).feed(b"x" * (70 * 1024))
    assert list(tmp_path.iterdir()) == []


def _outcome(parse, tmp_path):
    """What a parse gives: each part's headers and bytes (read from its file), or the error's type and text."""
    try:
        parts = parse()
    except (BadRequest, PayloadTooLarge) as e:
        assert list(tmp_path.iterdir()) == []  # nothing left behind
        return type(e).__name__, re.sub(r" at \d+$", "", str(e))  # python-multipart's offset is per chunk fed
    out = [(p.headers, open(p.path, "rb").read(), p.size) for p in parts]
    for p in parts:
        assert p.data is None or p.data == open(p.path, "rb").read()
        p.release()
    return out


WHOLE_BODIES = {
    "canonical": _body()[0],
    "preamble": b"This is a preamble.\r\n" + _body()[0],
    "epilogue": _body()[0] + b"an epilogue\r\n",
    "LF lines": _body()[0].replace(b"\r\n", b"\n"),
    "truncated": _body()[0][:-5],
    "no close delimiter": _body()[0].rsplit(b"--b0undary--", 1)[0],
    "padding after the delimiter": _body()[0].replace(b"--b0undary\r\n", b"--b0undary  \r\n", 1),
    "a part without headers": b"--b0undary\r\n\r\nxx\r\n--b0undary--\r\n",
    "a header without a colon": _body()[0].replace(b"Content-Length: 8", b"Content-Length 8"),
    "folded header": _body()[0].replace(b"Content-Length: 8", b"Content-Length:\r\n 8"),
    "no parts": b"--b0undary--\r\n",
    "garbage": b"x" * 100,
    "empty part": multipart_bytes([Part("application/dicom", data=b"")], "application/dicom", "b0undary")[0],
}


@pytest.mark.parametrize("name", sorted(WHOLE_BODIES))
def test_a_body_parsed_whole_gives_what_the_incremental_parser_gives(tmp_path, name):
    """parse_whole cuts canonical bodies in one pass and keeps each part's bytes; every
    other body (odd or hostile) must get exactly the incremental parser's answer."""
    body = WHOLE_BODIES[name]

    def incremental():
        parser = StowParser("b0undary", tmp_path)
        for i in range(0, len(body), 7):
            parser.feed(body[i:i + 7])
        return parser.close()

    whole = _outcome(lambda: StowParser("b0undary", tmp_path).parse_whole(body), tmp_path)
    assert whole == _outcome(incremental, tmp_path)
    if name in ("canonical", "preamble", "epilogue"):
        parts = StowParser("b0undary", tmp_path).parse_whole(body)
        assert [p.data for p in parts] == [b"DICM-one", b"\r\n--not-a-boundary\r\n"]  # kept: not read again


@pytest.mark.parametrize("name", sorted(WHOLE_BODIES))
def test_held_parts_are_the_incremental_parsers_parts_or_none(tmp_path, name):
    """split_held (a STOW-RS body held in memory, no files) gives each part's headers and
    bytes exactly as the incremental parser does, or None for a body it leaves to that
    parser (which then answers odd and hostile bodies as ever)."""
    body = WHOLE_BODIES[name]
    held = split_held(body, "b0undary")
    if name in ("canonical", "preamble", "epilogue", "empty part"):
        assert held is not None
    if held is not None:
        incremental = _outcome(lambda: StowParser("b0undary", tmp_path).parse_whole(body), tmp_path)
        assert [(p.headers, p.data, p.size) for p in held] == incremental
        assert all(p.path is None for p in held) and list(tmp_path.iterdir()) == []


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.binary(max_size=300), min_size=1, max_size=4), cuts=st.lists(st.integers(0, 2000)),
       headers=st.dictionaries(st.sampled_from(["Content-ID", "Content-Location", "X-Extra"]),
                               st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=20)))
def test_held_parts_equal_the_incremental_parse_of_the_body_cut_at_any_points(tmp_path, parts, cuts, headers):
    """Any part bytes (a boundary look-alike, CRLFs, nothing) and extra part headers: the held
    parts are what the incremental parser gives for the same body fed in pieces cut anywhere."""
    body, _ = multipart_bytes([Part("application/dicom", data=p, headers=headers) for p in parts],
                              "application/dicom", boundary="b0undary")
    held = split_held(body, "b0undary")
    assert held is not None  # what this proxy and every STOW-RS client write is canonical
    parser = StowParser("b0undary", tmp_path)
    last = 0
    for cut in sorted({c % (len(body) + 1) for c in cuts}) + [len(body)]:
        parser.feed(body[last:cut])
        last = cut
    fed = parser.close()
    try:
        assert [(p.headers, p.data) for p in held] == [(p.headers, open(p.path, "rb").read()) for p in fed]
    finally:
        parser.abort()


def test_a_body_parsed_whole_is_held_to_the_size_limit_before_any_file_is_written(tmp_path):
    body, _ = _body()
    with pytest.raises(PayloadTooLarge):
        StowParser("b0undary", tmp_path, max_bytes=len(body) - 1).parse_whole(body)
    assert list(tmp_path.iterdir()) == []
    assert len(StowParser("b0undary", tmp_path, max_bytes=len(body)).parse_whole(body)) == 2


class HandOff:
    """``run`` for parse_body: each call waits until :meth:`step` runs it (a thread
    pool's hand-off made visible); counts the calls in flight at once."""

    def __init__(self):
        self.queue: list = []
        self.most_in_flight = 0

    def __call__(self, fn, *args):
        d: defer.Deferred = defer.Deferred()
        self.queue.append((fn, args, d))
        self.most_in_flight = max(self.most_in_flight, len(self.queue))
        return d

    def step(self):
        fn, args, d = self.queue.pop(0)
        try:
            d.callback(fn(*args))
        except Exception:  # noqa: BLE001 - handed on like a thread's exception
            d.errback()


def now(fn, *args):
    return defer.maybeDeferred(fn, *args)


class OnlyInHandOff(StowParser):
    """A parser that fails the test if it is fed outside the hand-off (on the reactor)."""

    inside = False

    def feed(self, data):
        assert OnlyInHandOff.inside, "the parser ran on the reactor thread"
        super().feed(data)


def test_parse_body_reads_a_producer_off_the_reactor(tmp_path):
    body, _ = _body()
    clock = task.Clock()
    cooperator = task.Cooperator(scheduler=lambda step: clock.callLater(0, step))
    hand_off = HandOff()
    d = parse_body(FileBodyProducer(io.BytesIO(body), cooperator=cooperator, readSize=7),
                   OnlyInHandOff("b0undary", tmp_path), run=hand_off, finish=lambda parts: ("done", parts))
    while not fired(d):
        clock.advance(0)
        if hand_off.queue:
            OnlyInHandOff.inside = True
            hand_off.step()
            OnlyInHandOff.inside = False
    label, parts = result_of(d)
    assert label == "done" and _contents(parts) == [b"DICM-one", b"\r\n--not-a-boundary\r\n"]
    assert hand_off.most_in_flight == 1  # one thread at a time uses the parser
    failure_of(parse_body(b"garbage", StowParser("b0undary", tmp_path / "x"), run=now), BadRequest)


@pytest_twisted.ensureDeferred
async def test_parse_body_writes_part_files_on_a_thread_by_default(tmp_path):
    import threading
    threads_seen = []

    class Watched(StowParser):
        def _begin(self):  # a part file opened by the incremental parser
            threads_seen.append(threading.current_thread() is threading.main_thread())
            super()._begin()

        def _write_whole(self, headers, data):  # ... or by a body parsed whole
            threads_seen.append(threading.current_thread() is threading.main_thread())
            super()._write_whole(headers, data)

    body, _ = _body()
    parts = await parse_body(body, Watched("b0undary", tmp_path))
    assert len(parts) == 2 and threads_seen == [False, False]
    parts = await parse_body(WHOLE_BODIES["a part without headers"], Watched("b0undary", tmp_path / "odd"))
    assert len(parts) == 1 and threads_seen == [False] * 3  # that one went through the incremental parser


class Stalling:
    """A body producer driven by hand: what it is told, and what it writes."""

    def __init__(self):
        self.paused = self.resumed = self.stopped = 0
        self.consumer = None
        self.done: defer.Deferred = defer.Deferred()

    def startProducing(self, consumer):
        self.consumer = consumer
        return self.done

    def pauseProducing(self):
        self.paused += 1

    def resumeProducing(self):
        self.resumed += 1

    def stopProducing(self):
        self.stopped += 1


def test_a_fast_body_pauses_its_producer_while_the_parser_is_behind(tmp_path):
    from harmony.dicomweb.multipart import FEED_HIGH_WATER
    hand_off = HandOff()
    producer = Stalling()
    body = (b"--bb\r\nContent-Type: application/dicom\r\n\r\n" + b"x" * (FEED_HIGH_WATER + 1000)
            + b"\r\n--bb--\r\n")
    d = parse_body(producer, StowParser("bb", tmp_path), run=hand_off)
    producer.consumer.write(body[:100])  # a batch in flight ...
    for at in range(100, len(body), 64 * 1024):
        producer.consumer.write(body[at:at + 64 * 1024])  # ... while the rest arrives
    assert producer.paused == 1 and producer.resumed == 0
    hand_off.step()  # the first batch parsed: the rest goes to the thread at once
    assert hand_off.queue and producer.resumed == 0
    hand_off.step()
    assert producer.resumed == 1  # caught up: read on
    producer.done.callback(None)
    while hand_off.queue:
        hand_off.step()
    parts = result_of(d)
    assert [p.size for p in parts] == [FEED_HIGH_WATER + 1000]


def test_a_body_that_fails_mid_parse_waits_for_the_batch_in_flight_then_removes_its_files(tmp_path):
    hand_off = HandOff()
    producer = Stalling()
    d = parse_body(producer, StowParser("bb", tmp_path), run=hand_off)
    producer.consumer.write(b"--bb\r\nContent-Type: application/dicom\r\n\r\nDICM")
    producer.done.errback(PayloadTooLarge("the client sent too much"))  # e.g. the upload cap, while parsing
    assert not fired(d) and len(hand_off.queue) == 1  # the parser is still the thread's: no abort yet
    hand_off.step()  # the batch: a part file is open
    assert list(tmp_path.iterdir()) and len(hand_off.queue) == 1
    hand_off.step()  # then the abort
    failure_of(d, PayloadTooLarge)
    assert list(tmp_path.iterdir()) == []


class Consumer:
    def __init__(self):
        self.out = io.BytesIO()

    def write(self, data):
        self.out.write(data)

    def registerProducer(self, producer, streaming):
        pass

    def unregisterProducer(self):
        pass


@pytest_twisted.ensureDeferred
async def test_the_writer_asks_for_each_part_only_after_the_last_is_written(tmp_path):
    staged = tmp_path / "staged.dcm"
    staged.write_bytes(b"from-a-file")
    released = []
    parts = [Part("application/dicom", data=b"in-memory", release=lambda: released.append("first")),
             Part("application/dicom", path=staged), None]
    asked = []

    def next_part():
        asked.append(len(released))  # how many parts were written (and released) when asked
        return defer.succeed(parts[len(asked) - 1])

    consumer = Consumer()
    await MultipartWriter(next_part, "application/dicom", boundary="bb").startProducing(consumer)
    parser = StowParser("bb", tmp_path / "parsed")
    parser.feed(consumer.out.getvalue())
    assert _contents(parser.close()) == [b"in-memory", b"from-a-file"]
    assert asked == [0, 1, 1] and released == ["first"]
