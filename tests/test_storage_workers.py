"""``[proxy] workers = N`` on the embedded sqlite store: each process of the
node clears only its own temp files and crash markers, and takes back only
its own queue leases, so a worker (re)starting never disturbs another
process's instance in flight or delivery in progress."""

from __future__ import annotations

from types import SimpleNamespace

from harmony.storage import queue as q
from harmony.storage.config import process_name
from harmony.storage.store import InstanceStore


def config(workers: int):
    return SimpleNamespace(proxy=SimpleNamespace(workers=workers))


def test_each_process_has_its_own_name_only_with_workers(monkeypatch):
    monkeypatch.delenv("HARMONY_WORKER", raising=False)
    assert process_name(config(1), "node-a") is None
    assert process_name(config(3), "node-a") == "node-a.w0"  # the main process
    monkeypatch.setenv("HARMONY_WORKER", "2")
    assert process_name(config(3), "node-a") == "node-a.w2"
    assert process_name(config(3), "").endswith(".w2")  # the host name by default


def test_a_starting_worker_keeps_the_other_processes_temp_files_and_leases(tmp_path):
    main = InstanceStore(tmp_path, min_free_bytes=0, node="h.w0", per_process=True)
    main.open_sync()
    in_flight = main.tmp_dir / ".instance.part"  # what TempFile names a file being received
    in_flight.write_bytes(b"half an instance")
    now = 1000.0
    main.write_sync(q.enqueue, "1.2.3.1", ["pacs"], now)
    main.write_sync(q.enqueue, "1.2.3.2", ["pacs"], now)
    claimed, _ = main.write_sync(q.claim, "pacs", "fifo", 1, now, node="h.w0", lease=300.0)
    assert len(claimed) == 1

    worker = InstanceStore(tmp_path, min_free_bytes=0, node="h.w1", per_process=True)
    try:
        worker.open_sync()
        assert worker.tmp_dir != main.tmp_dir
        assert in_flight.exists(), "a starting worker removed the main process's file in flight"
        # A restarted worker takes back its own interrupted deliveries only.
        assert worker.write_sync(q.recover, now, ["pacs"], worker.node) == 0
        assert main.read_sync(lambda c: c.execute("SELECT count(*) FROM queue WHERE state='delivering'")
                              .fetchone()[0]) == 1
    finally:
        worker.close()
        main.close()
    # Each closed cleanly under its own marker.
    assert (tmp_path / "clean-shutdown.h.w0").exists() and (tmp_path / "clean-shutdown.h.w1").exists()
