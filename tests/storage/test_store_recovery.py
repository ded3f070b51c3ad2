"""Crash recovery of the instance store (issue 12, defect 23).

A crash between the rename into ``instances/`` and the index commit used to
leave a complete file that no query, retrieve or delete ever saw again.  Here a
real process is killed at exactly that point (``os._exit`` from the index
write, after the rename), a truncated and a garbage file are dropped into the
layout as a torn write would leave them, and the store is reopened: complete
files are indexed, the rest removed, counts logged without UIDs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest_twisted
from twisted.logger import formatEvent, globalLogPublisher

from harmony.storage.store import CLEAN_MARKER, InstanceStore

CRASH_BETWEEN_RENAME_AND_COMMIT = textwrap.dedent("""
    import os, sys
    from harmony.storage.store import InstanceStore
    root, indexed, crashing = sys.argv[1:4]
    store = InstanceStore(root, min_free_bytes=0)
    store.put_file_sync(indexed)

    def die_before_commit(fn, *args, **kwargs):
        os._exit(9)  # the file is renamed into place and fsynced; the row never commits

    store.write_sync = die_before_commit
    store.put_file_sync(crashing)
    sys.exit("not reached")
""")


def crash_after_rename(root, indexed, crashing):
    result = subprocess.run([sys.executable, "-c", CRASH_BETWEEN_RENAME_AND_COMMIT, str(root), str(indexed),
                             str(crashing)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 9, result.stderr


def layout_path(store, inst):
    return store.instances_dir / store.relpath(inst.study_uid, inst.series_uid, inst.sop_uid)


@pytest_twisted.ensureDeferred
async def test_files_without_a_row_after_a_crash_are_indexed_or_removed(tmp_path, corpus):
    root = tmp_path / "store"
    indexed, crashed, torn, garbage = corpus[0], corpus[1], corpus[5], corpus[6]
    crash_after_rename(root, indexed.path, crashed.path)

    probe = InstanceStore(root, min_free_bytes=0)
    assert layout_path(probe, crashed).exists()  # the crash left the file ...
    # ... and a torn write or a disk fault leaves these (no row either):
    target = layout_path(probe, torn)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(torn.path.read_bytes()[:400])
    target = layout_path(probe, garbage)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"\0" * 128 + b"DICM" + b"not really")
    stray = layout_path(probe, garbage).parent / "README.txt"
    stray.write_text("an operator's note")

    events = []
    globalLogPublisher.addObserver(events.append)
    store = InstanceStore(root, min_free_bytes=0)
    try:
        store.open_sync()  # on the reactor thread: the scan must go to a storage thread
        assert store.recovered is not None and not store.recovered.called
        found = await store.recovered
        assert (found.reason, found.indexed, found.removed, found.ignored) == ("unclean", 1, 2, 1), found
        got = await store.run(store.get_sync, crashed.sop_uid)
        assert got is not None and got.path == layout_path(store, crashed)
        assert got.path.read_bytes() == crashed.path.read_bytes()
        assert (await store.run(store.get_sync, indexed.sop_uid)) is not None
        assert not layout_path(store, torn).exists() and not layout_path(store, garbage).exists()
        assert await store.run(store.get_sync, torn.sop_uid) is None
        assert stray.exists()  # not a name the store makes: left alone
        counts = await store.run(store.counts_sync)
        assert counts["instances"] == 2
    finally:
        globalLogPublisher.removeObserver(events.append)
        store.close()
    infos = [formatEvent(e) for e in events
             if e.get("log_namespace") == "harmony.storage" and e.get("log_level").name == "info"]
    report = [t for t in infos if "start-up scan" in t]
    assert len(report) == 1 and "1 complete instance(s)" in report[0] and "2 incomplete" in report[0], infos
    for uid in (crashed.sop_uid, torn.sop_uid, garbage.sop_uid, crashed.study_uid):
        assert all(uid not in t for t in infos), infos  # no UIDs at info


@pytest_twisted.ensureDeferred
async def test_a_clean_shutdown_means_no_scan_and_an_unclean_one_scans_only_changed_series(tmp_path, corpus):
    root = tmp_path / "store"
    first = [i for i in corpus if i.series_uid == corpus[0].series_uid]
    later = [i for i in corpus if i.series_uid != corpus[0].series_uid][:2]
    store = InstanceStore(root, min_free_bytes=0)
    for inst in first:
        store.put_file_sync(inst.path)
    store.close()
    assert (root / CLEAN_MARKER).exists()

    store = InstanceStore(root, min_free_bytes=0)
    await store.run(store.open_sync)  # on a storage thread, as the first put would: the scan runs inline
    assert store.recovered.called
    assert store.recovery.reason == "clean" and store.recovery.series_scanned == 0
    assert not (root / CLEAN_MARKER).exists()  # until this run closes cleanly
    # Folders the crashed run did not touch are older than its start.
    old = store.instances_dir / first[0].study_uid / first[0].series_uid
    os.utime(old, (os.stat(old).st_atime, os.stat(old).st_mtime - 3600))
    for inst in later:
        store.put_file_sync(inst.path)
    store._stop_pool()  # a crash: no close, so no clean-shutdown marker
    store.db.close()

    again = InstanceStore(root, min_free_bytes=0)
    try:
        again.open_sync()
        found = await again.recovered
        assert found.reason == "unclean"
        changed = {(i.study_uid, i.series_uid) for i in later}
        assert found.series_scanned == len(changed), found  # not the untouched series
        assert (found.indexed, found.removed) == (0, 0)
    finally:
        again.close()


@pytest_twisted.ensureDeferred
async def test_a_store_without_markers_is_scanned_whole_once(tmp_path, corpus):
    root = tmp_path / "store"
    store = InstanceStore(root, min_free_bytes=0)
    store.put_file_sync(corpus[0].path)
    store.close()
    (root / CLEAN_MARKER).unlink()
    (root / "opened-at").unlink()  # as a store made before this scan existed
    extra = layout_path(store, corpus[2])
    extra.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(corpus[2].path, extra)
    again = InstanceStore(root, min_free_bytes=0)
    try:
        again.open_sync()
        found = await again.recovered
        assert (found.reason, found.indexed) == ("unknown", 1)
    finally:
        again.close()
