"""harmony.storage.threads: the eventfd-woken job threads of the store's ingest and queries."""

from __future__ import annotations

import threading

from harmony.storage.threads import WokenThreads


def test_one_thread_runs_every_job_in_the_order_given_and_stop_finishes_the_queue():
    threads = WokenThreads(1, "test-readers")
    done: list[int] = []
    gate = threading.Event()
    threads.call(gate.wait)              # holds the thread while the rest queue up
    for n in range(50):
        threads.call(done.append, n)
    gate.set()
    threads.stop()                       # what was queued before the stop is run first
    assert done == list(range(50)) and not threads.started


def test_many_threads_share_the_jobs_and_a_failing_job_does_not_end_a_thread():
    threads = WokenThreads(3, "test-readers")
    seen: set[str] = set()
    done = []
    lock = threading.Lock()

    def job(n):
        with lock:
            seen.add(threading.current_thread().name)
            done.append(n)

    def boom():
        raise RuntimeError("a job's own error")

    threads.call(boom)
    for n in range(300):
        threads.call(job, n)
    threads.stop()
    assert sorted(done) == list(range(300))
    assert seen and all(name.startswith("test-readers-") for name in seen)


def test_stop_of_threads_never_started_is_harmless_and_a_call_starts_them():
    threads = WokenThreads(2, "test-readers")
    threads.stop()
    done = threading.Event()
    threads.call(done.set)
    assert done.wait(10) and threads.started
    threads.stop()
    assert not threads.started


def test_an_idle_thread_is_told_how_many_jobs_came_since():
    """The idle hook runs after a job only when none waits, and gets the pending count."""
    seen: list[int] = []
    idled = threading.Event()

    def idle(pending):
        seen.append(pending())
        idled.set()

    threads = WokenThreads(1, "test-idle", idle=idle)
    gate = threading.Event()
    threads.call(gate.wait)
    threads.call(seen.append, -1)            # waits behind the gate: no idle call after the first job
    gate.set()
    assert idled.wait(10)
    threads.stop()
    assert seen == [-1, 0, 0]   # after the last job, and as the thread stops


def test_a_stopping_thread_runs_the_idle_hook_last():
    """(What a job held for the one after it is committed when that one is the stop.)"""
    seen: list[str] = []
    threads = WokenThreads(2, "test-stop-idle", idle=lambda pending: seen.append("idle"))
    threads.start()
    threads.stop()
    assert seen == ["idle", "idle"]
