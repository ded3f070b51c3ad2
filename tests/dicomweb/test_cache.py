"""harmony.dicomweb.cache: metadata answers kept until they expire (on a task.Clock), shared
through the storage database layer, and identical fetches collapsed into one."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import task
from twisted.python.failure import Failure

from harmony.dicomweb.cache import BASE_PLACEHOLDER, MetadataCache, etag_for, with_base
from tests.memory import failure_of, result_of


def test_an_entry_lives_for_its_ttl(tmp_path):
    clock = task.Clock()
    cache = MetadataCache(tmp_path, clock, ttl=300)
    cache.put("series:1.2.3", b"[]")
    assert cache.get("series:1.2.3") == b"[]"
    clock.advance(301)
    assert cache.get("series:1.2.3") is None


def test_a_zero_ttl_caches_nothing_and_another_cache_on_the_folder_shares_entries(tmp_path):
    clock = task.Clock()
    off = MetadataCache(tmp_path / "off", clock, ttl=0)
    off.put("k", b"x")
    assert off.get("k") is None
    cache = MetadataCache(tmp_path / "on", clock)
    cache.put("k", b"x")
    # The entries live in the folder's database, so another process's cache on it sees them.
    assert MetadataCache(tmp_path / "on", clock).get("k") == b"x"
    assert MetadataCache(tmp_path / "on", clock, namespace="other-pacs").get("k") is None


@pytest_twisted.ensureDeferred
async def test_the_reactor_side_reads_and_writes_off_thread(tmp_path):
    cache = MetadataCache(tmp_path, task.Clock())
    await cache.put_async("k", b'{"a":1}')
    assert await cache.get_async("k") == b'{"a":1}'
    assert await cache.get_async("other") is None


def test_identical_fetches_wait_for_the_first(tmp_path):
    cache = MetadataCache(tmp_path, task.Clock())
    assert cache.join("k") is None and cache.running("k")
    second, third = cache.join("k"), cache.join("k")
    cache.settle("k", b"body")
    assert result_of(second) == b"body" and result_of(third) == b"body" and not cache.running("k")
    assert cache.join("k") is None
    waiting = cache.join("k")
    cache.settle("k", Failure(RuntimeError("pacs down")))
    failure_of(waiting, RuntimeError)


def test_etags_and_the_base_placeholder():
    assert etag_for(b"a") == etag_for(b"a") != etag_for(b"b") and etag_for(b"a").startswith('"')
    body = f'{{"url": "{BASE_PLACEHOLDER}/studies/1"}}'.encode()
    assert with_base(body, "https://h.test/dicomweb") == b'{"url": "https://h.test/dicomweb/studies/1"}'


def test_concurrent_first_uses_make_the_schema_once(tmp_path, monkeypatch):
    """Two first metadata requests on two threads: one opens the sqlite file and makes
    its schema, the other waits for it (two at once met "database is locked")."""
    import threading

    from harmony.storage.database import SqliteDatabase

    made, inside, both = [], threading.Event(), threading.Barrier(2)
    create_schema = SqliteDatabase.create_schema

    def counted(self, script, pg_script):
        made.append(threading.current_thread().name)
        inside.set()
        try:   # the second caller must never get here: waiting for it is bounded
            both.wait(timeout=1)
        except threading.BrokenBarrierError:
            pass
        create_schema(self, script, pg_script)

    monkeypatch.setattr(SqliteDatabase, "create_schema", counted)
    cache = MetadataCache(tmp_path, task.Clock(), ttl=60)
    errors: list = []

    def first_use():
        try:
            cache.put("k", b"body")
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    one = threading.Thread(target=first_use, name="one")
    two = threading.Thread(target=first_use, name="two")
    one.start()
    assert inside.wait(30)
    two.start()   # while "one" is still making the schema
    one.join()
    two.join()
    cache.close()
    assert errors == []
    assert made == ["one"]
    assert MetadataCache(tmp_path, task.Clock(), ttl=60).get("k") == b"body"
