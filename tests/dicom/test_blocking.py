"""harmony.dicom.blocking: DICOM's one thread boundary runs work off the reactor, on its own bounded
pool, and hands the result (or the exception) back on the reactor thread."""

from __future__ import annotations

import threading

import pytest
import pytest_twisted
from twisted.internet import reactor

from harmony.dicom import blocking


@pytest_twisted.ensureDeferred
async def test_work_runs_on_the_dicom_pool_and_comes_back():
    def where(x, *, y):
        return threading.current_thread().name, x + y

    name, total = await blocking.run(reactor, where, 2, y=3)
    assert total == 5 and "harmony-dicom" in name and name != threading.current_thread().name
    assert blocking._pool.max == blocking.POOL_SIZE


@pytest_twisted.ensureDeferred
async def test_an_exception_comes_back_as_a_failure():
    def broken():
        raise ValueError("bad pixel data")

    with pytest.raises(ValueError, match="bad pixel data"):
        await blocking.run(reactor, broken)
