"""Access log, [logging] file/JSON-lines output, and no PHI at info level."""

import json

import pytest
import pytest_twisted
import treq
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from harmony.config import ConfigErrors, load_config
from tests.harness import (MINIMAL_MAIN, RecordingUpstream, echo_pipeline, listen, proxy_pipeline, start_harmony,
                           write_config)



def pipes(upstream):
    return proxy_pipeline(upstream, prefix="/api") + echo_pipeline(endpoint="echo", backend="echo")


PHI = "DOE^JOHN"
LOGGING = """
[logging]
log_to_file = true
log_file_path = "logs/harmony.{ext}"
format = "{fmt}"
"""


class Captured(list):
    def __call__(self, event):
        self.append(event)


@pytest.fixture
def events():
    captured = Captured()
    globalLogPublisher.addObserver(captured)
    yield captured
    globalLogPublisher.removeObserver(captured)


def access_events(events):
    return [e for e in events if e.get("log_namespace") == "harmony.access"]


@pytest.fixture
def quiet_upstream():
    """The recording upstream without twisted.web's own access log: its lines
    (query strings and all) would be the upstream's PHI, not Harmony's."""
    resource = RecordingUpstream()
    port = listen(resource)
    port.factory.log = lambda request: None
    resource.url = f"http://127.0.0.1:{port.getHost().port}"
    yield resource
    pytest_twisted.blockon(port.stopListening())


@pytest_twisted.ensureDeferred
async def test_access_line_has_fields_and_no_phi_at_info(tmp_path, quiet_upstream, events):
    upstream = quiet_upstream
    path = write_config(tmp_path, MINIMAL_MAIN, {"p": pipes(upstream.url)})
    running = await start_harmony(path)
    try:
        headers = {"X-Patient": PHI, "Content-Type": "application/json", "X-Request-ID": "req-1"}
        body = json.dumps({"PatientName": PHI}).encode()
        for url in (f"/api/Patient?name={PHI}&birthdate=1970", f"/echo/x?PatientName={PHI}",
                    f"/nowhere?PatientName={PHI}"):
            resp = await treq.post(running.url(url), body, headers=headers)
            await resp.content()
    finally:
        await running.stop()
    lines = access_events(events)
    assert [(e["method"], e["path"], e["status"]) for e in lines] == [
        ("POST", "/api/Patient", 200), ("POST", "/echo/x", 200), ("POST", "/nowhere", 404)]
    first = lines[0]
    assert first["request_id"] == "req-1" and first["bytes"] > 0 and first["duration_ms"] >= 0
    assert formatEvent(first).startswith("POST /api/Patient 200 ")
    info = [e for e in events if e.get("log_level", LogLevel.info) >= LogLevel.info]
    assert info, "no events captured"
    for e in info:
        text = formatEvent(e) + json.dumps({k: str(v) for k, v in e.items()})
        assert "DOE" not in text, text


@pytest.mark.parametrize("fmt", ["json", "text"])
@pytest_twisted.ensureDeferred
async def test_log_to_file(tmp_path, fmt):
    (tmp_path / "logs").mkdir()
    ext = "jsonl" if fmt == "json" else "log"
    main = MINIMAL_MAIN.replace('log_level = "debug"', 'log_level = "info"') + LOGGING.format(ext=ext, fmt=fmt)
    path = write_config(tmp_path, main, {"p": pipes("http://127.0.0.1:9")})
    running = await start_harmony(path)
    try:
        resp = await treq.get(running.url("/echo/file?q=1"), headers={"X-Request-ID": "file-1"})
        await resp.content()
    finally:
        await running.stop()
    text = (tmp_path / "logs" / f"harmony.{ext}").read_text()
    if fmt == "json":
        records = [json.loads(line) for line in text.splitlines()]  # every line is one JSON object
        [access] = [r for r in records if r.get("log_namespace") == "harmony.access"]
        assert (access["method"], access["path"], access["status"], access["request_id"]) == (
            "GET", "/echo/file", 200, "file-1")
        assert access["bytes"] > 0 and "duration_ms" in access
        assert any(r.get("log_namespace") == "harmony.service" for r in records)
    else:
        assert "GET /echo/file 200 " in text and "id=file-1" in text
        assert "q=1" not in text


@pytest_twisted.ensureDeferred
async def test_debug_events_dropped_at_info_level(tmp_path, events):
    main = MINIMAL_MAIN.replace('log_level = "debug"', 'log_level = "info"')
    path = write_config(tmp_path, main, {"p": pipes("http://127.0.0.1:9")})
    running = await start_harmony(path)
    try:
        resp = await treq.get(running.url("/nowhere"))
        await resp.content()
        resp = await treq.get(running.url("/echo"))
        await resp.content()
    finally:
        await running.stop()
    harmony_events = [e for e in events if e.get("log_namespace", "").startswith("harmony")]
    assert access_events(events)
    assert all(e["log_level"] >= LogLevel.info for e in harmony_events)


@pytest.mark.parametrize("table, message", [
    ('log_to_file = "yes"', "[logging.log_to_file]: must be true or false"),
    ('format = "xml"', "[logging.format]: must be one of text, json"),
    ("log_to_file = true", "[logging.log_file_path]: is required when log_to_file = true"),
    ('log_to_file = true\nlog_file_path = "nodir/x.log"', "[logging.log_file_path]: folder"),
])
def test_logging_table_errors_name_the_key(tmp_path, table, message):
    path = write_config(tmp_path, MINIMAL_MAIN + f"\n[logging]\n{table}\n")
    with pytest.raises(ConfigErrors) as info:
        load_config(path)
    assert any(message in str(p) and str(path) in str(p) for p in info.value.problems), info.value.render()


def test_pydicom_value_warnings_are_withheld_above_debug():
    """pydicom quotes invalid values in its warnings ("Invalid value for VR DA:
    '<birth date>'"), and twistd logs warnings at warn: at info they must not
    appear; at debug they may."""
    import warnings

    from pydicom.dataelem import DataElement

    from harmony import log as hlog

    def shown(level):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hlog.set_level(level)
            DataElement(0x00100030, "DA", "SECRETDOB1")  # PatientBirthDate
            DataElement(0x00101010, "AS", "SECRETAGE")  # PatientAge
        return " ".join(str(w.message) for w in caught)

    try:
        assert "SECRET" not in shown("info")
        assert "SECRETDOB1" in shown("debug")
    finally:
        hlog.set_level("info")
