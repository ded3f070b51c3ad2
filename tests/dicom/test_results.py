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


def test_a_listener_gets_the_queued_items_then_each_as_it_is_put_and_hears_the_end():
    stream = ResultStream()
    stream.put("a")
    got = []
    ended = stream.listen(got.append)
    assert got == ["a"] and not ended.called and stream.pending == 0
    stream.put("b")
    assert got == ["a", "b"] and stream.pending == 0   # handed over on put, never queued
    stream.finish(SUCCESS)
    assert result_of(ended) is None


def test_a_listener_hears_a_failure_after_the_items_and_a_finished_stream_at_once():
    stream = ResultStream()
    stream.put(1)
    stream.fail(RuntimeError("pacs gone"))
    got = []
    failure_of(stream.listen(got.append), RuntimeError)
    assert got == [1]
    done = ResultStream()
    done.put(2)
    done.finish(SUCCESS)
    assert result_of(done.listen(got.append)) is None and got == [1, 2]
    live = ResultStream()
    ended = live.listen(got.append)
    live.fail(ValueError("x"))
    failure_of(ended, ValueError)


def test_unlisten_puts_the_stream_back_in_pull_mode():
    stream = ResultStream()
    got = []
    ended = stream.listen(got.append)
    stream.unlisten()
    stream.put("late")
    stream.finish(SUCCESS)
    assert got == [] and not ended.called
    assert result_of(stream.next()) == "late" and result_of(stream.next()) is None


def test_encoded_items_reach_a_listener_in_their_syntax_as_bytes_and_anyone_else_as_items():
    """``put_encoded``: a C-FIND match held as the bytes the PACS sent goes to a listener
    that relays in that syntax as those bytes; to a listener in another syntax, a pulling
    consumer, or after the listener stopped, it is ``as_item(data, syntax)``."""
    def as_item(data, syntax):
        return ("item", data, syntax)

    stream = ResultStream()
    stream.put_encoded(b"queued", "1.2.840.10008.1.2", as_item)      # nobody listens yet: queued as an item
    items, encoded = [], []
    ended = stream.listen(items.append, ("1.2.840.10008.1.2", encoded.append))
    stream.put_encoded(b"m1", "1.2.840.10008.1.2", as_item)
    stream.put_encoded(b"m2", "1.2.840.10008.1.2.1", as_item)        # another syntax: decoded by the consumer
    assert encoded == [b"m1"]
    assert items == [("item", b"queued", "1.2.840.10008.1.2"), ("item", b"m2", "1.2.840.10008.1.2.1")]
    stream.unlisten()
    stream.put_encoded(b"m3", "1.2.840.10008.1.2", as_item)
    assert encoded == [b"m1"] and stream.queued() == [("item", b"m3", "1.2.840.10008.1.2")]
    assert not ended.called

    plain = ResultStream()
    seen: list = []
    plain.listen(seen.append)                                         # a listener that takes only items
    plain.put_encoded(b"m", "1.2.840.10008.1.2", as_item)
    plain.finish(SUCCESS)
    assert seen == [("item", b"m", "1.2.840.10008.1.2")]
    plain.put_encoded(b"late", "1.2.840.10008.1.2", as_item)          # after the end: no listener any more
    assert plain.queued() == [("item", b"late", "1.2.840.10008.1.2")]
