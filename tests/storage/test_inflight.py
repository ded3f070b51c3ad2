"""The window overlapped flushes open, closed by in_flight rows (harmony.storage.inflight).

An instance's data sync, folder fsync and index commit run at the same time,
so a crash can come after its rows committed and before its file is on disk.
Here a real process is killed (``os._exit(9)``, no clean-up, no atexit) at
exactly that point - its rows committed, the flushes it waits for still
pending - and the store is reopened:

- after a kill -9 the page cache still holds the file: it is kept, synced
  and indexed (it may have been acknowledged a moment later);
- a power loss at that point can leave the file missing or cut short; no
  test can pull this machine's power, so the test does to the file what a
  lost data sync leaves (truncates or deletes it) before reopening - the one
  fake here.  A journaled instance (small, its bytes in its in_flight row,
  acknowledged at the commit) is written again from the row; a larger one
  (acknowledged only after its flushes) loses its rows, and a copy of the
  same instance filed before under another series is indexed again.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest_twisted
from twisted.internet import threads

from harmony.storage.store import InstanceStore
from tests.dicom_data import make_instance, save

#: argv: journal (1/0), root, then files to store; the last one is killed after its commit.
KILLED_AFTER_COMMIT = textwrap.dedent("""
    import os, sys
    from harmony.storage.store import InstanceStore
    journal, root, *files = sys.argv[1:]
    store = InstanceStore(root, min_free_bytes=0)
    store.journal = journal == "1"  # off: an instance too large for the journal
    for f in files[:-1]:
        store.put_file_sync(f, enqueue=["pacs"])  # acknowledged (put_file_sync returned)
    store.flushes_done_sync()  # their flushes (behind a journaled answer) done: settled in the next commit
    real_write = store.write_sync

    def kill_after_commit(fn, *args, **kwargs):
        result = real_write(fn, *args, **kwargs)
        if fn.__name__ == "tx":
            os._exit(9)  # rows and in_flight row committed; the data sync and folder fsync not awaited
        return result

    store.write_sync = kill_after_commit
    store.put_file_sync(files[-1], enqueue=["pacs"])
    sys.exit("not reached")
""")


def killed_after_commit(root, *files, journal=False):
    result = subprocess.run([sys.executable, "-c", KILLED_AFTER_COMMIT, "1" if journal else "0", str(root),
                             *map(str, files)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 9, result.stderr


def instance(folder, name, **kw):
    return save(make_instance(**kw), folder / f"{name}.dcm")


def final_path(store, path):
    from pydicom import dcmread
    ds = dcmread(path, stop_before_pixels=True)
    return store.instances_dir / store.relpath(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)


async def reopened(root):
    store = InstanceStore(root, min_free_bytes=0)
    await threads.deferToThread(store.open_sync)
    return store


def rows(store, sql, *args):
    return store.read_sync(lambda c: c.execute(sql, args).fetchall())


@pytest_twisted.ensureDeferred
async def test_killed_after_the_commit_before_the_flushes_the_file_is_kept(tmp_path):
    root = tmp_path / "store"
    acked = instance(tmp_path, "acked", seed=1)
    caught = instance(tmp_path, "caught", seed=2)
    killed_after_commit(root, acked, caught)
    store = await reopened(root)
    try:
        found = store.recovery
        # the acknowledged one's row was forgotten by the killed transaction itself
        assert (found.reason, found.in_flight, found.in_flight_removed) == ("unclean", 1, 0), found
        assert store.counts_sync()["instances"] == 2
        for path in (acked, caught):
            assert final_path(store, path).read_bytes() == path.read_bytes()
        assert len(rows(store, "SELECT * FROM queue")) == 2
        assert rows(store, "SELECT * FROM in_flight") == []
    finally:
        store.close()


@pytest_twisted.ensureDeferred
async def test_a_power_loss_after_the_commit_removes_the_rows_of_a_file_cut_short_or_lost(tmp_path):
    root = tmp_path / "store"
    acked = instance(tmp_path, "acked", seed=1)
    cut = instance(tmp_path, "cut", seed=2, series_uid="1.2.826.0.1.3680043.10.543.77.1")
    killed_after_commit(root, acked, cut)
    probe = InstanceStore(root, min_free_bytes=0)
    target = final_path(probe, cut)
    # What a power loss can leave of a file whose data sync had not finished (the fake):
    target.write_bytes(target.read_bytes()[:300])
    store = await reopened(root)
    try:
        found = store.recovery
        assert (found.in_flight, found.in_flight_removed) == (1, 1), found
        assert not target.exists()
        assert store.counts_sync()["instances"] == 1  # the acknowledged one, whole
        assert final_path(store, acked).read_bytes() == acked.read_bytes()
        from pydicom import dcmread
        lost = str(dcmread(cut, stop_before_pixels=True).SOPInstanceUID)
        assert rows(store, "SELECT * FROM queue WHERE sop_uid=?", lost) == []  # nothing to deliver
        assert rows(store, "SELECT * FROM series WHERE series_uid=?", "1.2.826.0.1.3680043.10.543.77.1") == []
    finally:
        store.close()


@pytest_twisted.ensureDeferred
async def test_a_lost_refiling_brings_back_the_copy_filed_before(tmp_path):
    """The same SOP Instance UID filed again under another series: the old copy is
    deleted only after the new one is on disk, and indexed again if the new one is lost."""
    root = tmp_path / "store"
    sop = "1.2.826.0.1.3680043.10.543.78.9"
    first = instance(tmp_path / "a", "first", seed=3, sop_uid=sop, series_uid="1.2.826.0.1.3680043.10.543.78.1")
    again = instance(tmp_path / "b", "again", seed=3, sop_uid=sop, series_uid="1.2.826.0.1.3680043.10.543.78.2")
    killed_after_commit(root, first, again)
    probe = InstanceStore(root, min_free_bytes=0)
    assert final_path(probe, first).exists()  # not deleted before the new copy's flushes
    final_path(probe, again).unlink()  # the fake power loss: the new name never reached the disk
    store = await reopened(root)
    try:
        found = store.recovery
        assert found.in_flight_removed == 1 and found.indexed == 1, found
        got = store.get_sync(sop)
        assert got is not None and got.path == final_path(store, first)
        assert got.path.read_bytes() == first.read_bytes()
        assert len(rows(store, "SELECT * FROM queue WHERE sop_uid=?", sop)) == 1  # still to deliver
    finally:
        store.close()


@pytest_twisted.ensureDeferred
async def test_a_clean_stop_leaves_nothing_to_check_and_rows_are_forgotten_as_flushes_finish(tmp_path):
    root = tmp_path / "store"
    files = [instance(tmp_path, f"i{n}", seed=10 + n) for n in range(4)]
    store = await reopened(root)
    try:
        for f in files[:3]:
            await store.put_file(f)
        # (journaled, their flushes finish behind the answers: wait for them)
        await threads.deferToThread(store.flushes_done_sync)
        await store.put_file(files[3])
        # each transaction forgets the rows of the instances durable before it
        assert len(rows(store, "SELECT * FROM in_flight")) == 1
    finally:
        store.close()
    store = await reopened(root)
    try:
        assert (store.recovery.reason, store.recovery.in_flight) == ("clean", 0)
        assert rows(store, "SELECT * FROM in_flight") == []
        assert store.counts_sync()["instances"] == 4
    finally:
        store.close()


@pytest_twisted.ensureDeferred
async def test_a_journaled_instance_survives_a_power_loss_after_its_commit(tmp_path):
    """Acknowledged at its commit, before its file's flushes: whatever a power loss
    leaves of the file, the bytes in its journal row bring it back whole."""
    root = tmp_path / "store"
    acked = instance(tmp_path, "acked", seed=1)
    cut = instance(tmp_path, "cut", seed=2)
    lost = instance(tmp_path, "lost", seed=4, series_uid="1.2.826.0.1.3680043.10.543.79.1")
    killed_after_commit(root, acked, cut, journal=True)
    probe = InstanceStore(root, min_free_bytes=0)
    target = final_path(probe, cut)
    target.write_bytes(target.read_bytes()[:300])  # the fake power loss (see the module docstring)
    store = await reopened(root)
    try:
        found = store.recovery
        assert (found.in_flight, found.in_flight_rewritten, found.in_flight_removed) == (1, 1, 0), found
        assert target.read_bytes() == cut.read_bytes()
        assert store.counts_sync()["instances"] == 2
        assert len(rows(store, "SELECT * FROM queue")) == 2
        assert rows(store, "SELECT * FROM in_flight") == []
    finally:
        store.close()
    killed_after_commit(root, lost, journal=True)
    final_path(probe, lost).unlink()  # this time the name itself never reached the disk
    store = await reopened(root)
    try:
        assert store.recovery.in_flight_rewritten == 1
        assert final_path(store, lost).read_bytes() == lost.read_bytes()
        assert store.counts_sync()["instances"] == 3
    finally:
        store.close()
