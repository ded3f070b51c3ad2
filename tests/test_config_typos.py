"""A misspelt key in a fixed table ([proxy], [logging], [network.N.http], its
tls table, or a top-level table name) is not silently dropped: it is a warning
naming file and key, printed by `harmony check` and logged when the service
starts.  A tls table without a certificate is an error, never plain HTTP."""

import pytest
import pytest_twisted
from twisted.logger import globalLogPublisher

from harmony.cli import main as harmony_main
from harmony.config import ConfigErrors, load_config
from harmony.runtime import build_runtime
from tests.harness import echo_pipeline, start_harmony, write_config

TYPOS = """
[proxy]
id = "t"
log_levl = "debug"

[netwrok.public.http]
bind_port = 0

[network.default.http]
bind_address = "127.0.0.1"
bind_port = 0
bind_adress = "0.0.0.0"

[logging]
log_to_fiel = true
"""


def test_typos_are_warnings_naming_file_and_key(tmp_path):
    path = write_config(tmp_path, TYPOS, {"echo": echo_pipeline() + "\n[pipelnes.x]\n"})
    runtime = build_runtime(load_config(path))
    warnings = [str(w) for w in runtime.warnings]
    main, pipes = str(path), str(tmp_path / "pipelines" / "echo.toml")
    assert f"{main}: [proxy.log_levl]: unknown key, ignored (did you mean 'log_level'?)" in warnings
    assert f"{main}: [netwrok]: unknown top-level key, ignored" in warnings
    assert (f"{main}: [network.default.http.bind_adress]: unknown key, ignored (did you mean 'bind_address'?)"
            in warnings)
    assert f"{main}: [logging.log_to_fiel]: unknown key, ignored (did you mean 'log_to_file'?)" in warnings
    assert f"{pipes}: [pipelnes]: unknown top-level key, ignored (in a pipeline file)" in warnings


def test_known_keys_give_no_warning(tmp_path):
    path = write_config(tmp_path, """
[proxy]
id = "t"
log_level = "info"
workers = 1
transforms_path = "."

[network.default.http]
bind_address = "127.0.0.1"
bind_port = 0

[storage]
backend = "filesystem"

[logging]
log_to_file = false
format = "text"
""", {"echo": echo_pipeline()})
    assert load_config(path).warnings == []


def test_check_prints_the_warnings(tmp_path, capsys):
    path = write_config(tmp_path, TYPOS, {"echo": echo_pipeline()})
    assert harmony_main(["check", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"warning: {path}: [proxy.log_levl]: unknown key, ignored (did you mean 'log_level'?)" in out


@pytest.mark.parametrize("tls", ['[network.default.http.tls]\ncertificate = "tls.pem"\n',
                                 "[network.default.http.tls]\n", 'tls = true\n'])
def test_tls_table_without_cert_is_an_error_not_plain_http(tmp_path, tls):
    main = '[proxy]\nid = "t"\n[network.default.http]\nbind_address = "127.0.0.1"\nbind_port = 0\n'
    main += tls
    path = write_config(tmp_path, main, {"echo": echo_pipeline()})
    with pytest.raises(ConfigErrors) as info:
        load_config(path)
    assert [str(p) for p in info.value.problems] == [
        f"{path}: [network.default.http.tls.cert]: is required (a PEM certificate path) when a tls table is given"]


@pytest_twisted.ensureDeferred
async def test_service_logs_the_warnings_at_start(tmp_path):
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        running = await start_harmony(write_config(tmp_path, TYPOS, {"echo": echo_pipeline()}))
        await running.stop()
    finally:
        globalLogPublisher.removeObserver(events.append)
    logged = [e.get("warning", "") for e in events if e.get("log_namespace") == "harmony.service"]
    assert any("[proxy.log_levl]: unknown key, ignored (did you mean 'log_level'?)" in w for w in logged), logged
