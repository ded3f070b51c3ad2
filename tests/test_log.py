"""harmony.log: Harmony's own level filter, PHI-quoting pydicom warnings hidden below debug, and
JSON-lines files."""

from __future__ import annotations

import json
import warnings

import pytest

from harmony import log


@pytest.fixture(autouse=True)
def _restore_level():
    saved = list(warnings.filters)
    yield
    log.set_level("info")
    warnings.filters[:] = saved


def test_the_level_filter():
    log.set_level("warn")
    assert log.enabled("harmony.x", "error") and not log.enabled("harmony.x", "info")
    log.set_level("debug")
    assert log.enabled("harmony.x", "debug")
    log.set_level("nonsense")  # an unknown level is info
    assert log.enabled("harmony.x", "info") and not log.enabled("harmony.x", "debug")


def test_value_quoting_pydicom_warnings_are_dropped_unless_debug():
    log.set_level("info")
    assert any(log._is_value_filter(f) for f in warnings.filters)
    log.set_level("debug")
    assert not any(log._is_value_filter(f) for f in warnings.filters)


def test_a_json_file_observer_writes_one_object_a_line(tmp_path):
    path = tmp_path / "harmony.log"
    observer, stream = log.file_observer(str(path), "json")
    try:
        observer({"log_format": "request {request_id}", "request_id": "r1", "log_namespace": "harmony.t",
                  "log_time": 0.0})
        observer({"log_format": "second", "log_namespace": "harmony.t", "log_time": 1.0})
    finally:
        stream.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line)["log_format"] for line in lines] == ["request {request_id}", "second"]
