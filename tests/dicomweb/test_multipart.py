"""harmony.dicomweb.multipart: multipart/related written part by part and parsed incrementally into
files, with preambles, truncation, size caps and byte-by-byte arrival."""

from __future__ import annotations

import io

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.web.client import FileBodyProducer

from harmony.dicomweb.multipart import MultipartWriter, Part, StowParser, multipart_bytes, parse_body
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


def test_parse_body_reads_a_producer(tmp_path):
    body, _ = _body()
    clock = task.Clock()
    cooperator = task.Cooperator(scheduler=lambda step: clock.callLater(0, step))
    d = parse_body(FileBodyProducer(io.BytesIO(body), cooperator=cooperator, readSize=7),
                   StowParser("b0undary", tmp_path))
    while not fired(d):
        clock.advance(0)
    assert _contents(result_of(d)) == [b"DICM-one", b"\r\n--not-a-boundary\r\n"]
    failure_of(parse_body(b"garbage", StowParser("b0undary", tmp_path / "x")), BadRequest)


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
