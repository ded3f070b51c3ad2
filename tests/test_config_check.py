"""`harmony check` reports every problem of every section at once, and every
table names the keys it does not know, with the closest known key.

Issue 12, defect 10: a bad port in [network] used to hide an unknown
middleware, a missing backend and a route conflict; and `[storage] index =
"postgresql"` started a node on sqlite without a word (now PostgreSQL is
implemented and an index outside STORAGE_INDEXES is what is refused).
"""

import pytest

from harmony.cli import main as harmony_main
from harmony.config import ConfigErrors, load_config
from harmony.runtime import build_runtime, load_runtime
from tests.harness import MINIMAL_MAIN, echo_pipeline, write_config

FOUR_PROBLEMS_MAIN = """
[proxy]
id = "t"

[network.default.http]
bind_address = "127.0.0.1"
bind_port = 70000
"""

FOUR_PROBLEMS_PIPES = """
[endpoints.a]
service = "http"
path_prefix = "/same"

[endpoints.b]
service = "http"
path_prefix = "/same"

[backends.echo]
service = "echo"

[pipelines.first]
networks = ["default"]
endpoints = ["a"]
middleware = ["no_such_middleware"]
backends = ["echo"]

[pipelines.second]
networks = ["default"]
endpoints = ["b"]
backends = ["missing_backend"]
"""


def test_check_reports_all_four_problems_each_naming_file_and_key(tmp_path, capsys):
    path = write_config(tmp_path, FOUR_PROBLEMS_MAIN, {"p": FOUR_PROBLEMS_PIPES})
    pipes = tmp_path / "pipelines" / "p.toml"
    assert harmony_main(["check", "-c", str(path)]) == 1
    out = capsys.readouterr().out
    assert "4 configuration problem(s)" in out, out
    assert f"{path}: [network.default.http.bind_port]: must be a port number 0-65535, got 70000" in out
    assert f"{pipes}: [pipelines.first.middleware]: names unknown middleware 'no_such_middleware'" in out
    assert f"{pipes}: [pipelines.second.backends]: names unknown backend 'missing_backend'" in out
    assert f"{pipes}: [pipelines.second.endpoints]: route conflict on network 'default': prefix '/same'" in out


def test_check_prints_the_warnings_with_the_errors(tmp_path, capsys):
    main = FOUR_PROBLEMS_MAIN.replace("bind_port = 70000", "bind_port = 70000\nbind_prot = 8080")
    path = write_config(tmp_path, main, {"p": FOUR_PROBLEMS_PIPES})
    assert harmony_main(["check", "-c", str(path)]) == 1
    out = capsys.readouterr().out
    assert (f"warning: {path}: [network.default.http.bind_prot]: unknown key, ignored (did you mean 'bind_port'?)"
            in out), out


def test_starting_reports_them_all_too(tmp_path):
    path = write_config(tmp_path, FOUR_PROBLEMS_MAIN, {"p": FOUR_PROBLEMS_PIPES})
    with pytest.raises(ConfigErrors) as info:
        load_runtime(path)
    assert len(info.value.problems) == 4, info.value.render()


def test_a_broken_component_is_not_reported_again_as_unknown(tmp_path):
    pipes = echo_pipeline().replace('service = "echo"', 'service = 5')
    path = write_config(tmp_path, MINIMAL_MAIN, {"p": pipes})
    problems = []
    config = load_config(path, problems=problems)
    build_runtime(config, problems=problems)
    assert [p.key for p in problems] == ["backends.b.service"], problems


def test_storage_index_outside_the_list_is_refused_not_silently_sqlite(tmp_path, capsys):
    path = write_config(tmp_path, MINIMAL_MAIN + '\n[storage]\nbackend = "filesystem"\nindex = "mysql"\n',
                        {"echo": echo_pipeline()})
    assert harmony_main(["check", "-c", str(path)]) == 1
    out = capsys.readouterr().out
    assert (f"{path}: [storage.index]: 'mysql' is not supported by this version of Harmony "
            "(supported: 'sqlite', 'postgresql')") in out, out
    ok = write_config(tmp_path / "ok", MINIMAL_MAIN + '\n[storage]\nindex = "sqlite"\n', {"echo": echo_pipeline()})
    assert load_config(ok).storage["index"] == "sqlite"


def test_storage_index_postgresql_needs_a_dsn(tmp_path, capsys):
    path = write_config(tmp_path, MINIMAL_MAIN + '\n[storage]\nindex = "postgresql"\n', {"echo": echo_pipeline()})
    assert harmony_main(["check", "-c", str(path)]) == 1
    assert f"{path}: [storage.options.dsn]: index = \"postgresql\" needs a dsn" in capsys.readouterr().out
    stray = write_config(tmp_path / "stray", MINIMAL_MAIN + '\n[storage.options]\ndsn = "host=db"\n',
                         {"echo": echo_pipeline()})
    assert harmony_main(["check", "-c", str(stray)]) == 1
    assert "[storage.options.dsn]: only used with index = \"postgresql\"" in capsys.readouterr().out
    ok = write_config(tmp_path / "ok", MINIMAL_MAIN + '\n[storage]\nindex = "postgresql"\n[storage.options]\n'
                      'dsn = "host=db.example dbname=harmony"\n', {"echo": echo_pipeline()})
    assert load_config(ok).storage["index"] == "postgresql"


@pytest.mark.parametrize("table, key, suggestion", [
    ('[storage]\nbackedn = "filesystem"', "storage.backedn", "backend"),
    ('[storage.options]\npth = "/data"', "storage.options.pth", "path"),
    ('[management]\nenabeld = true', "management.enabeld", "enabled"),
])
def test_unknown_keys_where_ignoring_them_changes_behaviour_are_errors(tmp_path, capsys, table, key, suggestion):
    path = write_config(tmp_path, MINIMAL_MAIN + "\n" + table + "\n", {"echo": echo_pipeline()})
    assert harmony_main(["check", "-c", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}: [{key}]: unknown key (did you mean {suggestion!r}?)" in out, out


EVERY_TABLE_MAIN = """
[proxy]
id = "t"
log_levle = "info"

[logging]
formt = "text"

[network.default]
lisen = "tcp:0"

[network.default.http]
bind_address = "127.0.0.1"
bind_port = 0
bind_prot = 1

[network.tlsnet.http]
bind_address = "127.0.0.1"
bind_port = 0

[network.tlsnet.http.tls]
cert = "pki/server.crt"
key = "pki/server.key"
keyy = "pki/other.key"
"""

EVERY_TABLE_PIPES = """
[targets.up]
url = "http://127.0.0.1:1/"
wieght = 2

[endpoints.e]
service = "http"
path_prefix = "/echo"
path_prefx = "/x"

[backends.b]
service = "http"
targets = ["up"]
retires = 3

[backends.c]
service = "http"
targets = ["up"]

[backends.c.circuit]
failurs = 2

[middleware.m]
type = "path_filter"
rules = ["/"]
ruels = ["/x"]

[pipelines.echo]
networks = ["default"]
endpoints = ["e"]
middleware = ["m"]
backends = ["b", "c"]
middelware = ["m"]
"""


def test_routing_rule_conditions_are_refused_with_a_did_you_mean(tmp_path):
    pipes = EVERY_TABLE_PIPES + '\n[[backends.b.rules]]\nheaderz = { "x-site" = "north" }\ntargets = ["up"]\n'
    path = write_config(tmp_path, MINIMAL_MAIN, {"p": pipes})
    problems = []
    build_runtime(load_config(path, problems=problems), problems=problems)
    bad = [p for p in problems if p.key == "backends.b.options.rules[0].headerz"]
    assert bad and "(did you mean 'header'?)" in bad[0].message, problems


def test_every_table_names_its_unknown_keys_with_a_did_you_mean(tmp_path):
    from tests.tls_certs import make_pki

    path = write_config(tmp_path, EVERY_TABLE_MAIN, {"p": EVERY_TABLE_PIPES})
    make_pki(tmp_path / "pki")
    problems = []
    config = load_config(path, problems=problems)
    runtime = build_runtime(config, problems=problems)
    messages = {p.key: p.message for p in problems + runtime.warnings}
    expected = {
        "proxy.log_levle": "log_level",
        "logging.formt": "format",
        "network.default.lisen": "listen",
        "network.default.http.bind_prot": "bind_port",
        "network.tlsnet.http.tls.keyy": "key",
        "targets.up.wieght": "weight",
        "endpoints.e.options.path_prefx": "path_prefix",
        "backends.b.options.retires": "retries",
        "backends.c.options.circuit.failurs": "failures",
        "middleware.m.options.ruels": "rules",
        "pipelines.echo.middelware": "middleware",
    }
    for key, suggestion in expected.items():
        assert key in messages, (key, sorted(messages))
        assert f"(did you mean {suggestion!r}?)" in messages[key], (key, messages[key])


def test_storage_backend_s3_needs_endpoint_and_bucket(tmp_path, capsys):
    path = write_config(tmp_path, MINIMAL_MAIN + '\n[storage]\nbackend = "s3"\n', {"echo": echo_pipeline()})
    assert harmony_main(["check", "-c", str(path)]) == 1
    out = capsys.readouterr().out
    assert f'{path}: [storage.options.s3_endpoint]: backend = "s3" needs it' in out
    assert f'{path}: [storage.options.s3_bucket]: backend = "s3" needs it' in out
    stray = write_config(tmp_path / "stray", MINIMAL_MAIN + '\n[storage.options]\ns3_bucket = "b"\n',
                         {"echo": echo_pipeline()})
    assert harmony_main(["check", "-c", str(stray)]) == 1
    assert '[storage.options.s3_bucket]: only used with backend = "s3"' in capsys.readouterr().out
