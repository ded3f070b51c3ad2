"""harmony.dicom.results: the result contract between DICOM producers and consumers, in memory."""

from __future__ import annotations

from harmony.dicom.results import DicomInstance, ResultStream
from harmony.dicom.status import SUCCESS
from tests.memory import failure_of, result_of


def test_items_reach_a_waiting_consumer_and_the_end_is_none():
    stream = ResultStream()
    waiting = stream.next()
    assert not waiting.called
    stream.put("a")
    stream.put("b")
    assert result_of(waiting) == "a" and stream.pending == 1 and stream.queued() == ["b"]
    stream.finish(SUCCESS)
    assert stream.done and result_of(stream.next()) == "b" and result_of(stream.next()) is None


def test_a_consumer_waiting_at_the_end_hears_of_it():
    stream = ResultStream()
    waiting = stream.next()
    stream.finish(0xB000, "warnings")
    assert result_of(waiting) is None and (stream.status, stream.error_comment) == (0xB000, "warnings")


def test_a_failure_reaches_the_consumer_after_the_items():
    stream = ResultStream()
    stream.put(1)
    stream.fail(RuntimeError("pacs gone"))
    assert result_of(stream.next()) == 1
    failure_of(stream.next(), RuntimeError)
    waiting = ResultStream()
    d = waiting.next()
    waiting.fail(ValueError("x"))
    failure_of(d, ValueError)


def test_counts_announce_the_total_before_the_first_item():
    stream = ResultStream()
    counted = stream.when_counted()
    assert not counted.called
    stream.set_counts(remaining=3, completed=1, failed=1)
    assert result_of(counted) is stream and stream.total() == 5
    ended = ResultStream()
    ended.put("x")
    ended.put("y")
    ended.finish()
    assert result_of(ended.when_counted()).total() == 2


def test_cancel_asks_the_producer_once_and_not_after_the_end():
    asked = []
    stream = ResultStream(on_cancel=lambda: asked.append(1))
    stream.cancel()
    stream.cancel()
    assert stream.cancelled and asked == [1]
    finished = ResultStream(on_cancel=lambda: asked.append(2))
    finished.finish()
    finished.cancel()
    assert asked == [1] and not finished.cancelled


def test_collect_and_release(tmp_path):
    staged = tmp_path / "staged.dcm"
    staged.write_bytes(b"x")
    kept = tmp_path / "kept.dcm"
    kept.write_bytes(b"y")
    stream = ResultStream()
    stream.put(DicomInstance(staged, owned=True))
    stream.put(DicomInstance(kept))
    stream.finish()
    items = result_of(stream.collect())
    for item in items:
        item.release()
        item.release()  # twice is harmless
    assert not staged.exists() and kept.exists()
