"""The journal of a plain folder of files (harmony.storage.journal, ``dicom_scp``'s ``storage_dir``).

A placed file is answered for once its bytes are flushed in the journal's log;
its own flushes finish behind.  Here a real process is killed (``os._exit(9)``)
right after placements returned - their files' data syncs and folder fsyncs not
awaited - and a new process opens the folder's journal: the dead process's
records are written again.  A power loss at that point can leave a file cut
short or its name missing, and the log's last write torn; no test can pull this
machine's power, so the test does that to the files itself before reopening
(the one fake here).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pytest_twisted

from harmony.storage.journal import FolderJournal, read_log

KILLED_AFTER_PLACING = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from harmony.storage.journal import FolderJournal
    folder, *steps = sys.argv[1:]
    journal = FolderJournal(Path(folder), max_bytes=int(os.environ.get("MAX_BYTES", 262144)))
    journal.open()
    if os.environ.get("STALLED_SYNCS"):  # a disk whose syncs do not finish before the crash
        import threading
        journal._sync = lambda batch: threading.Event().wait()
    for step in steps:
        if step == "synced":
            assert journal.wait_synced(60)
            continue
        src, rel = step.split("=")
        if src.startswith("held:"):      # handed over in memory (FolderJournal.store), answered
            import threading
            told = []
            answered = threading.Event()
            journal.store(f"{folder}/{rel}", Path(src[5:]).read_bytes(), lambda e: (told.append(e), answered.set()))
            assert answered.wait(60) and told == [None]
        elif src.startswith("withdraw:"):  # journaled while checked, then refused
            journal.begin(Path(src[9:]), Path(folder) / rel).withdraw()
        elif src.startswith("begin:"):   # journaled while checked, then placed
            journal.begin(Path(src[6:]), Path(folder) / rel).claim()
        else:
            journal.place(Path(src), Path(folder) / rel)
    os._exit(9)  # answered; the files' flushes may still be running, the log not removed
""")


def killed_after_placing(folder, *steps, max_bytes=262144, stalled_syncs=False):
    env = {**os.environ, "MAX_BYTES": str(max_bytes), "STALLED_SYNCS": "1" if stalled_syncs else ""}
    result = subprocess.run([sys.executable, "-c", KILLED_AFTER_PLACING, str(folder), *steps],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 9, result.stderr


def logs(folder):
    return sorted((folder / ".journal").glob("*.log"))


def test_a_placed_file_is_in_place_at_once_and_the_journal_goes_when_closed(tmp_path):
    folder = tmp_path / "out"
    src = tmp_path / "in.dcm"
    src.write_bytes(b"x" * 5000)
    journal = FolderJournal(folder)
    assert journal.open() == 0
    journal.place(src, folder / "1.2" / "3.4" / "5.6.dcm")
    assert (folder / "1.2" / "3.4" / "5.6.dcm").read_bytes() == b"x" * 5000  # readers find it at once
    assert not src.exists()
    assert journal.path.exists()
    assert journal.flushes == 1
    journal.close()
    assert not journal.path.exists()  # every file synced: nothing to replay


def test_a_file_too_large_for_the_journal_is_moved_the_classic_way(tmp_path):
    folder = tmp_path / "out"
    src = tmp_path / "big.dcm"
    src.write_bytes(b"y" * 3000)
    journal = FolderJournal(folder, max_bytes=1000)
    journal.open()
    journal.place(src, folder / "a.dcm")
    assert (folder / "a.dcm").read_bytes() == b"y" * 3000
    assert journal.flushes == 0 and not journal.path.exists()  # never journaled
    journal.close()


def test_an_existing_name_is_replaced(tmp_path):
    folder = tmp_path / "out"
    (folder / "s").mkdir(parents=True)
    (folder / "s" / "a.dcm").write_bytes(b"old")
    src = tmp_path / "new.dcm"
    src.write_bytes(b"new" * 100)
    journal = FolderJournal(folder)
    journal.open()
    journal.place(src, folder / "s" / "a.dcm")
    assert (folder / "s" / "a.dcm").read_bytes() == b"new" * 100
    journal.close()


def test_what_a_killed_process_journaled_is_written_again_after_a_power_loss(tmp_path):
    folder = tmp_path / "out"
    data = {name: os.urandom(9000 + i) for i, name in enumerate(("cut", "lost", "intact"))}
    steps = []
    for name, content in data.items():
        (tmp_path / f"{name}.dcm").write_bytes(content)
        steps.append(f"{tmp_path / name}.dcm=st/se/{name}.dcm")
    killed_after_placing(folder, *steps, stalled_syncs=True)
    assert len(logs(folder)) == 1  # the dead process's
    cut = folder / "st" / "se" / "cut.dcm"
    cut.write_bytes(cut.read_bytes()[:100])  # the fake power loss (see the module docstring)
    (folder / "st" / "se" / "lost.dcm").unlink()
    journal = FolderJournal(folder)
    assert journal.open() == 3
    for name, content in data.items():
        assert (folder / "st" / "se" / f"{name}.dcm").read_bytes() == content
    assert logs(folder) == []  # replayed once, then gone
    journal.close()


def test_a_torn_last_write_is_not_replayed_nor_anything_after_it(tmp_path):
    """A power loss during the log's write: that placement was never answered."""
    folder = tmp_path / "out"
    for name in ("a", "b"):
        (tmp_path / f"{name}.dcm").write_bytes(name.encode() * 3000)
    killed_after_placing(folder, f"{tmp_path / 'a'}.dcm=st/a.dcm", f"{tmp_path / 'b'}.dcm=st/b.dcm", stalled_syncs=True)
    [log] = logs(folder)
    content = log.read_bytes()
    assert read_log(content) == {"st/a.dcm": b"a" * 3000, "st/b.dcm": b"b" * 3000}
    end_of_a = content.index(b"st/b.dcm") - 19  # b's record: 19 bytes of header, its name, its data
    for cut_at in (end_of_a + 1, end_of_a + 19, end_of_a + 1000, end_of_a + 19 + 8 + 3000 - 1):
        assert read_log(content[:cut_at]) == {"st/a.dcm": b"a" * 3000}
    flipped = bytearray(content)
    flipped[end_of_a + 2000] ^= 0xFF
    assert read_log(bytes(flipped)) == {"st/a.dcm": b"a" * 3000}
    log.write_bytes(bytes(flipped))
    (folder / "st" / "a.dcm").unlink()
    (folder / "st" / "b.dcm").write_bytes(b"b" * 3000)  # answered or not, whatever is there stays
    assert FolderJournal(folder).open() == 1
    assert (folder / "st" / "a.dcm").read_bytes() == b"a" * 3000
    assert (folder / "st" / "b.dcm").read_bytes() == b"b" * 3000


def test_the_log_starts_again_once_its_files_are_synced(tmp_path):
    """Files a consumer took away after they were synced do not come back after a crash."""
    folder = tmp_path / "out"
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.dcm").write_bytes(name.encode() * 2000)
    killed_after_placing(folder, f"{tmp_path / 'a'}.dcm=s/a.dcm", "synced", f"{tmp_path / 'b'}.dcm=s/b.dcm",
                         "synced", f"{tmp_path / 'c'}.dcm=s/c.dcm")
    [log] = logs(folder)
    assert read_log(log.read_bytes()) == {"s/c.dcm": b"c" * 2000}  # a and b were written over
    (folder / "s" / "a.dcm").unlink()
    (folder / "s" / "b.dcm").unlink()
    assert FolderJournal(folder).open() == 1
    assert sorted(p.name for p in (folder / "s").iterdir()) == ["c.dcm"]


def test_a_large_file_over_a_journaled_name_is_not_undone_by_a_replay(tmp_path):
    folder = tmp_path / "out"
    (tmp_path / "small.dcm").write_bytes(b"s" * 500)
    (tmp_path / "large.dcm").write_bytes(b"L" * 5000)
    killed_after_placing(folder, f"{tmp_path / 'small'}.dcm=x/i.dcm", f"{tmp_path / 'large'}.dcm=x/i.dcm",
                         max_bytes=1000)
    [log] = logs(folder)
    assert read_log(log.read_bytes()) == {}  # the small copy recorded, then forgotten
    FolderJournal(folder).open()
    assert (folder / "x" / "i.dcm").read_bytes() == b"L" * 5000


def test_placements_at_once_share_one_flush(tmp_path, monkeypatch):
    """Group commit: while one flush runs, the placements that arrive wait for
    the next one, which carries them all."""
    import harmony.storage.journal as journal_module
    folder = tmp_path / "out"
    journal = FolderJournal(folder)
    journal.open()
    first_flush, release = threading.Event(), threading.Event()
    real_write = journal_module._write_durably

    def held_write(fd, blob, offset):
        if not first_flush.is_set():
            first_flush.set()
            assert release.wait(30)
        real_write(fd, blob, offset)
    monkeypatch.setattr(journal_module, "_write_durably", held_write)
    errors = []

    def place(i):
        src = tmp_path / f"{i}.dcm"
        src.write_bytes(bytes([i]) * 700)
        try:
            journal.place(src, folder / "s" / f"{i}.dcm")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=place, args=(0,))]
    threads[0].start()
    assert first_flush.wait(30)
    threads += [threading.Thread(target=place, args=(i,)) for i in range(1, 9)]
    for t in threads[1:]:
        t.start()
    deadline = time.monotonic() + 30
    while len(journal._batch.records) < 8:  # all eight queued behind the held flush
        assert time.monotonic() < deadline
        time.sleep(0.001)
    release.set()
    for t in threads:
        t.join(30)
    assert errors == []
    assert journal.flushes == 2
    for i in range(9):
        assert (folder / "s" / f"{i}.dcm").read_bytes() == bytes([i]) * 700
    journal.close()
    assert logs(folder) == []


def test_a_full_log_waits_for_the_syncs_and_starts_again(tmp_path):
    folder = tmp_path / "out"
    journal = FolderJournal(folder, max_bytes=1000, log_bytes=0)  # the smallest log: ~5 KiB
    journal.open()
    for i in range(60):
        src = tmp_path / f"{i}.dcm"
        src.write_bytes(bytes([i]) * 900)
        journal.place(src, folder / "s" / f"{i}.dcm")
    assert journal.flushes == 60
    assert all((folder / "s" / f"{i}.dcm").read_bytes() == bytes([i]) * 900 for i in range(60))
    assert os.path.getsize(journal.path) == journal.log_bytes  # never grown
    journal.close()
    assert logs(folder) == []


def test_the_flusher_syncs_and_settles_every_file(tmp_path):
    folder = tmp_path / "out"
    journal = FolderJournal(folder)
    journal.open()
    for i in range(20):
        src = tmp_path / f"{i}.dcm"
        src.write_bytes(bytes([i]) * 300)
        journal.place(src, folder / f"s{i % 3}" / f"{i}.dcm")
    assert journal.wait_synced(30)
    assert journal._written_unsynced == 0 and not journal.broken
    journal.close()
    assert logs(folder) == []


def test_a_journal_left_by_an_earlier_version_is_replayed(tmp_path):
    """Before the log, the journal was a sqlite file: one a crash left is still written again."""
    folder = tmp_path / "out"
    (folder / ".journal").mkdir(parents=True)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    old = folder / ".journal" / f"{int(gone.stdout)}.sqlite"
    conn = sqlite3.connect(old)
    conn.execute("CREATE TABLE pending (relpath TEXT PRIMARY KEY, data BLOB NOT NULL)")
    conn.execute("INSERT INTO pending VALUES ('a/b.dcm', ?)", (b"old format",))
    conn.commit()
    conn.close()
    assert FolderJournal(folder).open() == 1
    assert (folder / "a" / "b.dcm").read_bytes() == b"old format"
    assert not old.exists()


def test_a_damaged_name_is_never_written(tmp_path):
    folder = tmp_path / "out"
    (tmp_path / "a.dcm").write_bytes(b"a" * 100)
    killed_after_placing(folder, f"{tmp_path / 'a'}.dcm=s/a.dcm")
    [log] = logs(folder)
    log.write_bytes(log.read_bytes().replace(b"s/a.dcm", b"../x.dc"))
    assert read_log(log.read_bytes()) == {}  # the checksum covers the name too
    assert FolderJournal(folder).open() == 0
    assert not (tmp_path / "x.dc").exists()


def test_a_withdrawn_record_is_not_replayed_and_an_earlier_copy_is(tmp_path):
    """A file journaled while it was checked, then refused: a crash writes the
    copy placed before it, not the refused one."""
    folder = tmp_path / "out"
    (tmp_path / "first.dcm").write_bytes(b"1" * 800)
    (tmp_path / "refused.dcm").write_bytes(b"2" * 800)
    (tmp_path / "other.dcm").write_bytes(b"3" * 800)
    killed_after_placing(folder, f"begin:{tmp_path / 'first'}.dcm=s/a.dcm",
                         f"withdraw:{tmp_path / 'refused'}.dcm=s/a.dcm", f"withdraw:{tmp_path / 'other'}.dcm=s/b.dcm",
                         stalled_syncs=True)
    [log] = logs(folder)
    assert read_log(log.read_bytes()) == {"s/a.dcm": b"1" * 800}
    (folder / "s" / "a.dcm").unlink()  # the fake power loss
    assert FolderJournal(folder).open() == 1
    assert (folder / "s" / "a.dcm").read_bytes() == b"1" * 800
    assert not (folder / "s" / "b.dcm").exists()


def stored(journal, dest, data):
    """FolderJournal.store, waited for: the error its callback gave (None: stored)."""
    told, answered = [], threading.Event()
    journal.store(str(dest), data, lambda error: (told.append(error), answered.set()))
    assert answered.wait(30)
    return told[0]


def test_a_held_file_is_named_before_its_sender_is_told_and_its_syncs_follow(tmp_path):
    folder = tmp_path / "out"
    journal = FolderJournal(folder)
    journal.open()
    seen = []

    def done(error):
        seen.append((error, (folder / "st" / "se" / "i.dcm").read_bytes()))
    journal.store(f"{folder}/st/se/i.dcm", b"held" * 300, done)
    assert stored(journal, folder / "st" / "se" / "j.dcm", b"other") is None
    assert seen == [(None, b"held" * 300)]   # told after the flush, the file already in place
    assert journal.flushes >= 1
    assert journal.wait_synced(30) and not journal.broken
    assert stored(journal, folder / "st" / "se" / "i.dcm", b"again") is None   # an existing name is replaced
    assert (folder / "st" / "se" / "i.dcm").read_bytes() == b"again"
    journal.close()
    assert logs(folder) == [] and list((folder / ".journal").glob("*.part")) == []


def test_a_held_file_a_killed_process_was_answered_for_is_written_again_after_a_power_loss(tmp_path):
    folder = tmp_path / "out"
    (tmp_path / "a.dcm").write_bytes(b"A" * 4000)
    killed_after_placing(folder, f"held:{tmp_path / 'a'}.dcm=st/se/a.dcm", stalled_syncs=True)
    (folder / "st" / "se" / "a.dcm").unlink()   # the fake power loss: its name never reached the disk
    (folder / ".journal" / "99999999.7.part").write_bytes(b"half")   # a dead process's unnamed file
    journal = FolderJournal(folder)
    assert journal.open() == 1
    assert (folder / "st" / "se" / "a.dcm").read_bytes() == b"A" * 4000
    assert list((folder / ".journal").glob("*.part")) == []
    journal.close()


KILLED_AFTER_RING_WRITES = textwrap.dedent("""
    import os, sys, threading
    from pathlib import Path
    from twisted.internet import defer, reactor
    from twisted.python.threadable import isInIOThread
    from harmony.storage.journal import FolderJournal
    folder, count = Path(sys.argv[1]), int(sys.argv[2])
    journal = FolderJournal(folder)
    journal.open()
    journal._sync = lambda batch: threading.Event().wait()   # syncs behind never finish before the crash
    journal._spare_temps[:] = [(f"{journal.dir}/{os.getpid()}.s{i}.part",
                                os.open(f"{journal.dir}/{os.getpid()}.s{i}.part", os.O_WRONLY | os.O_CREAT))
                               for i in range(count)]   # as the flusher would have made them

    def store(i):
        told = defer.Deferred()

        def done(error):
            if isInIOThread():
                told.callback((error, True))
            else:
                reactor.callFromThread(told.callback, (error, False))
        journal.store(f"{folder}/st/se/{i}.dcm", bytes([i]) * (1000 + 7 * i), done)
        return told

    async def run():
        assert journal.use_ring(reactor)
        assert await store(0) == (None, False)   # makes the log and the folder: the writer's
        for i in range(1, count):
            assert await store(i) == (None, True)
        assert journal.ring_flushes == count - 1
        os._exit(9)   # answered for; nothing of it synced but the log

    def start():
        defer.ensureDeferred(run()).addErrback(lambda f: (print(f.getTraceback(), file=sys.stderr), os._exit(3)))
    reactor.callWhenRunning(start)
    reactor.run()
""")


def test_what_the_reactors_ring_wrote_is_written_again_after_a_kill_and_a_power_loss(tmp_path):
    """The ring's writes (harmony.compat.uring, the log around the page cache) are the
    same records a replay reads: a process killed after its senders were told, its
    files' names lost as a power loss could lose them, is made whole by the next start."""
    folder = tmp_path / "out"
    result = subprocess.run([sys.executable, "-c", KILLED_AFTER_RING_WRITES, str(folder), "12"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 9, result.stderr
    for i in range(12):
        (folder / "st" / "se" / f"{i}.dcm").unlink()
    journal = FolderJournal(folder)
    assert journal.open() == 12
    for i in range(12):
        assert (folder / "st" / "se" / f"{i}.dcm").read_bytes() == bytes([i]) * (1000 + 7 * i)
    journal.close()
    assert logs(folder) == []


def test_a_held_file_that_cannot_be_written_is_refused_with_nothing_to_replay(tmp_path):
    folder = tmp_path / "out"
    journal = FolderJournal(folder)
    journal.open()
    (folder / "st").write_text("a file where its folder should be")
    error = stored(journal, folder / "st" / "se" / "a.dcm", b"x" * 100)
    assert isinstance(error, OSError)
    assert stored(journal, folder / "ok" / "b.dcm", b"y" * 100) is None   # the writer goes on
    content = (journal.path).read_bytes()
    assert read_log(content) == {"ok/b.dcm": b"y" * 100}   # the refused one was forgotten
    journal.close()
    assert list((folder / ".journal").glob("*.part")) == []


def test_a_held_file_over_the_journals_size_or_after_close_is_refused_at_once(tmp_path):
    journal = FolderJournal(tmp_path / "out", max_bytes=1000)
    journal.open()
    import pytest
    with pytest.raises(ValueError):
        journal.store(f"{tmp_path}/out/a.dcm", b"x" * 1001, lambda error: None)
    with pytest.raises(ValueError):
        journal.store(f"{tmp_path}/elsewhere.dcm", b"x", lambda error: None)
    journal.close()
    with pytest.raises(OSError):
        journal.store(f"{tmp_path}/out/a.dcm", b"x", lambda error: None)


def test_a_batch_of_files_is_made_durable_with_one_syncfs(tmp_path, monkeypatch):
    """On Linux the flusher syncs a batch with one ``syncfs`` of the log's file system
    (each file's data, inode and folder entry in one pass, one disk cache flush)
    instead of a file ``fdatasync`` and a folder ``fsync`` each; the files settle."""
    import harmony.storage.journal as journal_module
    assert journal_module._syncfs is not None   # this machine is Linux: the path the bench measures
    calls = []
    real = journal_module._syncfs
    monkeypatch.setattr(journal_module, "_syncfs", lambda fd: (calls.append(fd), real(fd)))
    synced_files = []
    real_fdatasync = os.fdatasync
    folder = tmp_path / "out"
    journal = FolderJournal(folder)
    journal.open()
    assert stored(journal, folder / "st" / "se" / "first.dcm", b"x" * 100) is None
    monkeypatch.setattr(journal_module.os, "fdatasync",
                        lambda fd: (synced_files.append(os.readlink(f"/proc/self/fd/{fd}")), real_fdatasync(fd)))
    for i in range(10):
        assert stored(journal, folder / "st" / f"se{i % 2}" / f"{i}.dcm", bytes([i]) * 300) is None
    assert journal.wait_synced(30) and not journal.broken
    assert 1 <= len(calls) < 11   # whole batches gathered over SYNC_INTERVAL, not a sync a file
    assert [f for f in synced_files if not f.endswith(".log")] == []   # only the log's own flushes
    journal.close()
    assert logs(folder) == []


def test_without_syncfs_each_file_and_folder_is_synced(tmp_path, monkeypatch):
    import harmony.storage.journal as journal_module
    monkeypatch.setattr(journal_module, "_syncfs", None)
    synced = []
    real_fdatasync, real_fsync = os.fdatasync, os.fsync
    monkeypatch.setattr(journal_module.os, "fdatasync",
                        lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fdatasync(fd)))
    monkeypatch.setattr(journal_module.os, "fsync",
                        lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    folder = tmp_path / "out"
    journal = FolderJournal(folder)
    journal.open()
    for i in range(4):
        assert stored(journal, folder / "st" / "se" / f"{i}.dcm", bytes([i]) * 300) is None
    assert journal.wait_synced(30) and not journal.broken
    assert {f"{folder}/st/se/{i}.dcm" for i in range(4)} | {f"{folder}/st/se"} <= set(synced)
    journal.close()


def test_spare_files_are_made_by_the_flusher_not_between_instances(tmp_path, monkeypatch):
    """The temp files held instances are written into are created ahead on the flusher
    thread after its sync round (creating one here can take a millisecond): the writer,
    between two instances, creates none while the flusher has not made any."""
    import harmony.storage.journal as journal_module
    folder = tmp_path / "out"
    journal = FolderJournal(folder)
    journal.open()
    stall, stalled = threading.Event(), threading.Event()
    real_sync = journal._sync

    def stalled_sync(batch):
        stalled.set()
        assert stall.wait(30)
        return real_sync(batch)
    journal._sync = stalled_sync
    assert stored(journal, folder / "st" / "se" / "a.dcm", b"a" * 100) is None
    assert stored(journal, folder / "st" / "se" / "b.dcm", b"b" * 100) is None
    assert stalled.wait(30)
    assert list((folder / ".journal").glob("*.part")) == []   # the idle writer made none
    stall.set()
    assert journal.wait_synced(30)
    deadline = time.monotonic() + 30
    while len(journal._spare_temps) < journal_module.SPARE_TEMPS:   # the flusher's top-up after its round
        assert time.monotonic() < deadline
        time.sleep(0.001)
    spares = {temp for temp, _fd in journal._spare_temps}
    assert stored(journal, folder / "st" / "se" / "c.dcm", b"c" * 100) is None
    assert (folder / "st" / "se" / "c.dcm").read_bytes() == b"c" * 100
    assert len(spares - {temp for temp, _fd in journal._spare_temps}) == 1   # it took one of them
    journal.close()
    assert list((folder / ".journal").glob("*.part")) == []


def test_the_log_is_written_and_synced_in_one_call_where_the_kernel_takes_it(tmp_path, monkeypatch):
    """``pwritev2(RWF_DSYNC)``: the log's write and its data sync in one system call
    (one GIL release on the answer's path); ``pwrite`` + ``fdatasync`` where refused."""
    import errno

    import harmony.storage.journal as journal_module
    assert journal_module._dsync_writes   # Linux, Python 3.7+
    monkeypatch.setattr(journal_module, "_dsync_writes", True)   # put back after the fallback below
    calls = []
    real_pwritev, real_fdatasync = os.pwritev, os.fdatasync
    monkeypatch.setattr(journal_module.os, "pwritev", lambda *a: (calls.append("pwritev"), real_pwritev(*a))[1])
    monkeypatch.setattr(journal_module.os, "fdatasync", lambda fd: (calls.append("fdatasync"), real_fdatasync(fd)))
    folder = tmp_path / "out"
    journal = FolderJournal(folder)
    journal.open()
    assert stored(journal, folder / "st" / "se" / "a.dcm", b"a" * 100) is None
    assert calls == ["pwritev"]

    def refused(*_args):
        raise OSError(errno.EOPNOTSUPP, "not here")
    monkeypatch.setattr(journal_module.os, "pwritev", refused)
    calls.clear()
    assert stored(journal, folder / "st" / "se" / "b.dcm", b"b" * 100) is None
    assert calls == ["fdatasync"] and not journal_module._dsync_writes
    assert read_log(journal.path.read_bytes()) == {"st/se/a.dcm": b"a" * 100, "st/se/b.dcm": b"b" * 100}
    journal.close()


def test_a_file_not_on_the_logs_file_system_is_synced_on_its_own(tmp_path, monkeypatch):
    """``syncfs`` of the log covers its file system only: a placed file found on another
    device (a folder mounted inside ``storage_dir``) gets its own fdatasync and folder fsync."""
    import harmony.storage.journal as journal_module
    synced = []
    real_fdatasync = os.fdatasync
    monkeypatch.setattr(journal_module.os, "fdatasync",
                        lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fdatasync(fd)))
    folder = tmp_path / "out"
    journal = FolderJournal(folder)
    journal.open()
    src = tmp_path / "a.dcm"
    src.write_bytes(b"a" * 500)
    journal.place(src, folder / "st" / "a.dcm")   # makes the log, whose device the flusher compares
    assert journal.wait_synced(30)
    assert synced == [] and journal._log_dev == os.stat(folder).st_dev
    journal._log_dev = -1   # as if the folder were another file system
    src.write_bytes(b"b" * 500)
    journal.place(src, folder / "st" / "b.dcm")
    assert journal.wait_synced(30) and not journal.broken
    assert f"{folder}/st/b.dcm" in synced
    journal.close()


def test_a_full_log_cuts_the_flushers_gathering_short(tmp_path, monkeypatch):
    """The flusher gathers files for SYNC_INTERVAL before a sync round; a commit that
    finds the log full must not wait that out (here a minute): it hurries the flusher."""
    import harmony.storage.journal as journal_module
    monkeypatch.setattr(journal_module, "SYNC_INTERVAL", 60.0)
    folder = tmp_path / "out"
    journal = FolderJournal(folder, max_bytes=1000, log_bytes=0)  # the smallest log: ~5 KiB
    journal.open()
    done = threading.Event()

    def place_many():
        for i in range(20):
            src = tmp_path / f"{i}.dcm"
            src.write_bytes(bytes([i]) * 900)
            journal.place(src, folder / "s" / f"{i}.dcm")
        done.set()
    threading.Thread(target=place_many, daemon=True).start()
    assert done.wait(30)   # ~4 files fill the log: without the hurry, a minute per fill
    assert all((folder / "s" / f"{i}.dcm").read_bytes() == bytes([i]) * 900 for i in range(20))
    journal.close()
    assert logs(folder) == []


def test_the_journal_holds_the_reactors_spin_off_while_it_works(tmp_path):
    """harmony.compat.spin: the writer and the commit threads report back through the
    GIL a spinning reactor would hold, so the journal counts as working while a
    placement is on its way; not while only the flusher syncs (nothing waits for it),
    and never once closed."""
    folder = tmp_path / "out"
    journal = FolderJournal(folder)
    journal.open()
    assert not journal.working
    writing, write = threading.Event(), threading.Event()
    syncing, sync = threading.Event(), threading.Event()
    real_serve, real_sync = journal._serve, journal._sync

    def held_serve(batch):
        writing.set()
        write.wait(10)
        return real_serve(batch)

    def held_sync(batch):
        syncing.set()
        sync.wait(10)
        return real_sync(batch)
    journal._serve, journal._sync = held_serve, held_sync
    src = tmp_path / "in.dcm"
    src.write_bytes(b"x" * 5000)
    placement = journal.begin(src, folder / "1.dcm")
    assert placement is not None
    assert journal.working              # being journaled, then written
    assert writing.wait(10)
    assert journal.working
    write.set()
    placement.claim()
    assert syncing.wait(10)
    assert not journal.working          # only its sync is left, behind the answer
    sync.set()
    assert journal.wait_synced(10)
    journal.close()
    assert not journal.working


def test_the_log_is_written_around_the_page_cache_in_whole_blocks(tmp_path, monkeypatch):
    """``O_DIRECT`` (bench/dimse "storage_dir, sixth pass"): each write starts at the
    block the log's end is in and covers whole blocks - that block's records written
    again, unchanged - and the log never grows; a replay reads every record."""
    import harmony.storage.journal as journal_module
    writes = []
    real_pwritev = os.pwritev
    monkeypatch.setattr(journal_module.os, "pwritev",
                        lambda fd, buffers, offset, *flags: (writes.append((offset, sum(map(len, buffers)))),
                                                             real_pwritev(fd, buffers, offset, *flags))[1])
    folder = tmp_path / "out"
    journal = FolderJournal(folder)
    journal.open()
    sizes = [1000, 3000, 5000, 10, 4096, 777]
    for i, size in enumerate(sizes):
        assert stored(journal, folder / "st" / f"{i}.dcm", bytes([i]) * size) is None
    assert journal._direct is not None   # this file system takes direct writes
    assert len(writes) == len(sizes)
    assert all(offset % 4096 == 0 and length % 4096 == 0 for offset, length in writes)
    assert [offset for offset, _ in writes] == sorted(offset for offset, _ in writes)   # appended
    assert os.path.getsize(journal.path) == journal.log_bytes
    assert read_log(journal.path.read_bytes()) == {f"st/{i}.dcm": bytes([i]) * size for i, size in enumerate(sizes)}
    journal.close()


def test_a_file_system_without_direct_writes_gets_the_page_cache_ones(tmp_path, monkeypatch):
    import harmony.storage.journal as journal_module
    monkeypatch.setattr(journal_module._DirectLog, "open", classmethod(lambda cls, path: None))
    folder = tmp_path / "out"
    journal = FolderJournal(folder)
    journal.open()
    for i in range(3):
        assert stored(journal, folder / "st" / f"{i}.dcm", bytes([i]) * 999) is None
    assert journal._direct is None
    assert read_log(journal.path.read_bytes()) == {f"st/{i}.dcm": bytes([i]) * 999 for i in range(3)}
    journal.close()


def _stored_on_reactor(journal, dest, data):
    """FolderJournal.store from the reactor: a Deferred of (the error, the thread that was told)."""
    from twisted.internet import defer, reactor
    from twisted.python.threadable import isInIOThread
    told: defer.Deferred = defer.Deferred()

    def done(error):
        on_reactor = isInIOThread()
        if on_reactor:
            told.callback((error, True))
        else:
            reactor.callFromThread(told.callback, (error, False))
    journal.store(str(dest), data, done)
    return told


async def _spares(journal):
    """The flusher's spare temporary files, once its first round has made them."""
    from twisted.internet import reactor, task
    for _ in range(1000):
        if len(journal._spare_temps) >= 8:
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("the flusher made no spare files")


@pytest_twisted.ensureDeferred
async def test_held_files_stored_from_the_reactor_are_journaled_by_its_ring(tmp_path):
    """harmony.compat.uring: no writer thread between the reactor and the disk once the
    log, the folder and spare files exist; the sender told on the reactor itself."""
    from twisted.internet import reactor, task, threads
    folder = tmp_path / "out"
    journal = FolderJournal(folder)
    journal.open()
    assert journal.use_ring(reactor)
    # The first file needs the log made, its folder made and a file created: the writer's.
    assert await _stored_on_reactor(journal, folder / "st" / "se" / "0.dcm", b"0" * 3000) == (None, False)
    assert journal.ring_flushes == 0
    await _spares(journal)
    for i in range(1, 4):
        assert await _stored_on_reactor(journal, folder / "st" / "se" / f"{i}.dcm", bytes([i]) * 3000) == (None, True)
    assert journal.ring_flushes == 3
    # Handed over together (after the last answer's callbacks have returned): the first goes
    # at once, the others wait for it and share the next write.
    await task.deferLater(reactor, 0, lambda: None)
    together = [_stored_on_reactor(journal, folder / "st" / "se" / f"{i}.dcm", bytes([i]) * 2000)
                for i in range(4, 8)]
    for told in together:
        assert await told == (None, True)
    assert journal.ring_flushes == 5
    # A new folder: the writer again.
    assert await _stored_on_reactor(journal, folder / "st" / "other" / "8.dcm", b"8" * 100) == (None, False)
    assert "st/other/8.dcm" in read_log(journal.path.read_bytes())   # after the ring's writes, readable
    # Closed from a thread while a ring write is in flight: that write finishes first.
    last = _stored_on_reactor(journal, folder / "st" / "se" / "9.dcm", b"9" * 100)
    await threads.deferToThread(journal.close)
    assert (await last)[0] is None
    assert (folder / "st" / "se" / "9.dcm").read_bytes() == b"9" * 100
    assert all((folder / "st" / "se" / f"{i}.dcm").read_bytes()[:1] == bytes([i])
               for i in range(1, 8))
    assert logs(folder) == []   # every file synced: nothing left to replay


@pytest_twisted.ensureDeferred
async def test_a_close_during_a_ring_write_keeps_the_flusher_for_its_files(tmp_path):
    """The ring's last write names its files on the reactor after the close began: the
    flusher, told of the close first, must stay for them.  It used to stop at once when
    it found nothing queued, and the file left unsynced kept the log for a replay
    (found by CI under load: the test above, whose timing usually hid it)."""
    from twisted.internet import reactor, threads
    folder = tmp_path / "out"
    journal = FolderJournal(folder)
    journal.open()
    waiting_closed = threading.Event()

    class Watched(threading.Condition):
        def wait(self, timeout=None):
            if journal.closed:
                waiting_closed.set()
            return super().wait(timeout)
    journal._wake_flusher = Watched(journal._cond._lock)   # before the flusher starts
    assert journal.use_ring(reactor)
    assert await _stored_on_reactor(journal, folder / "st" / "0.dcm", b"0" * 100) == (None, False)
    await _spares(journal)
    flusher = journal._flusher
    last = _stored_on_reactor(journal, folder / "st" / "1.dcm", b"1" * 100)
    assert journal._ring_writing      # in flight; the reactor (this thread) reaps it only once we yield
    closing = threads.deferToThread(journal.close)
    while flusher.is_alive() and not waiting_closed.wait(0.01):
        pass                           # the flusher has seen the close: it waits, or it is gone
    assert flusher.is_alive(), "the flusher stopped while a ring write was in flight"
    await closing
    assert await last == (None, True)
    assert (folder / "st" / "1.dcm").read_bytes() == b"1" * 100
    assert not flusher.is_alive()
    assert logs(folder) == []          # both files synced: nothing to replay


@pytest_twisted.ensureDeferred
async def test_a_close_that_outwaits_a_ring_write_returns_and_keeps_the_log(tmp_path, monkeypatch):
    """A ring write the reactor does not reap within RING_CLOSE_WAIT (here the reactor is
    this thread, kept busy): the close gives up on it and returns, the log kept for the
    next start.  The writer used to wait for that write for ever, and the close with it."""
    import harmony.storage.journal as journal_module
    from twisted.internet import reactor
    monkeypatch.setattr(journal_module, "RING_CLOSE_WAIT", 0.2)
    folder = tmp_path / "out"
    journal = FolderJournal(folder)
    journal.open()
    assert journal.use_ring(reactor)
    assert await _stored_on_reactor(journal, folder / "st" / "0.dcm", b"0" * 100) == (None, False)
    await _spares(journal)
    last = _stored_on_reactor(journal, folder / "st" / "1.dcm", b"1" * 100)
    assert journal._ring_writing
    closer = threading.Thread(target=journal.close)
    closer.start()
    closer.join(20)
    assert not closer.is_alive(), "the close waited for the ring's write for ever"
    assert logs(folder) != []          # kept: the next start replays what the write held
    assert not last.called or last.result[0] is None   # told only if the write was reaped before the ring went


@pytest_twisted.ensureDeferred
async def test_a_write_the_ring_refuses_is_made_by_a_thread_and_a_failed_one_refuses(tmp_path):
    import errno

    from twisted.internet import reactor
    folder = tmp_path / "out"
    journal = FolderJournal(folder)
    journal.open()
    assert journal.use_ring(reactor)
    assert (await _stored_on_reactor(journal, folder / "st" / "0.dcm", b"0" * 100))[0] is None
    await _spares(journal)
    ring = journal._ring
    real_write = ring.write

    def busy(*_args):
        raise OSError(errno.EBUSY, "the io_uring is full")
    ring.write = busy
    assert await _stored_on_reactor(journal, folder / "st" / "1.dcm", b"1" * 100) == (None, True)
    assert journal.ring_flushes == 1 and (folder / "st" / "1.dcm").read_bytes() == b"1" * 100

    def failing(fd, data, at, flags, done):
        real_write(-1, data, at, flags, done)   # the kernel's answer: EBADF
    ring.write = failing
    error, on_reactor = await _stored_on_reactor(journal, folder / "st" / "2.dcm", b"2" * 100)
    assert isinstance(error, OSError) and on_reactor
    assert not (folder / "st" / "2.dcm").exists()
    # The log's state is unknown after a failed write: every later file is refused.
    assert isinstance((await _stored_on_reactor(journal, folder / "st" / "3.dcm", b"3" * 100))[0], OSError)
    journal.close()
    assert logs(folder)   # kept for the next start
