"""harmony.storage.database: the embedded sqlite database's connections.

Every write transaction runs on one connection, whatever storage thread commits
(a commit from another connection would make sqlite drop this one's page cache:
each ingest read its pages again); reads keep a connection per thread.
"""

from __future__ import annotations

import threading


def test_writes_from_every_thread_run_on_one_connection(sqlite_index):
    used, readers = [], []

    def write(n):
        used.append(sqlite_index.transaction(True, lambda conn: conn))
        readers.append(sqlite_index.read(lambda conn: conn, ()))
    threads = [threading.Thread(target=write, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(c) for c in used}) == 1
    assert len({id(c) for c in readers}) == 3 and used[0] not in readers   # reads keep a connection per thread


def test_a_write_after_close_opens_a_new_writer(sqlite_index):
    first = sqlite_index.transaction(True, lambda conn: conn)
    sqlite_index.close()
    again = sqlite_index.transaction(True, lambda conn: conn.execute("SELECT count(*) FROM instances").fetchone()[0])
    assert again == 0 and sqlite_index._writer is not first
