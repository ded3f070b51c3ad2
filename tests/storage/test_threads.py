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


def test_a_job_for_a_busy_thread_wakes_nobody(monkeypatch):
    """Only a thread asleep is woken (an eventfd write, the GIL let go): a job queued
    while the one thread is busy is found by it when it is done, with no write."""
    from harmony.storage import threads as threads_module
    writes = []
    real = threads_module.os.eventfd_write
    monkeypatch.setattr(threads_module.os, "eventfd_write", lambda fd, n: (writes.append(n), real(fd, n)))
    threads = WokenThreads(1, "test-busy")
    gate, asleep_again, done = threading.Event(), threading.Event(), []
    threads.call(gate.wait)   # the thread is started asleep: this one wakes it
    for n in range(20):
        threads.call(done.append, n)   # it is busy: no wake-ups
    assert len(writes) <= 1
    gate.set()
    threads.call(asleep_again.set)
    assert asleep_again.wait(10)
    threads.stop()
    assert done == list(range(20)) and len(writes) <= 4   # (a wake-up for a job it then found asleep, the stop)


def test_many_producers_and_sleepy_threads_lose_no_job():
    """Jobs from several threads at once, to threads that keep falling asleep between
    them: each runs exactly once, and a stop ends threads asleep and busy alike."""
    import time
    threads = WokenThreads(3, "test-sleepy")
    done, lock = [], threading.Lock()

    def job(n):
        with lock:
            done.append(n)

    def produce(base):
        for n in range(base, base + 200):
            threads.call(job, n)
            if n % 50 == 0:
                time.sleep(0.001)   # (not synchronisation: lets the threads run dry and sleep)

    producers = [threading.Thread(target=produce, args=(k * 1000,)) for k in range(4)]
    for p in producers:
        p.start()
    for p in producers:
        p.join()
    threads.stop()
    assert sorted(done) == sorted(n for k in range(4) for n in range(k * 1000, k * 1000 + 200))
    assert not threads.started
