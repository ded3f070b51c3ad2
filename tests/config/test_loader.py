"""Configuration loading and validation: every problem named by file and key."""

import pytest

from harmony.config import ConfigErrors, load_config
from harmony.runtime import build_runtime
from tests.harness import MINIMAL_MAIN, write_config

ECHO = """
[pipelines.echo]
networks = ["default"]
endpoints = ["e"]
backends = ["b"]

[endpoints.e]
service = "http"
[endpoints.e.options]
path_prefix = "/echo"

[backends.b]
service = "echo"
"""


def problems_of(path):
    with pytest.raises(ConfigErrors) as info:
        build_runtime(load_config(path))
    return [str(p) for p in info.value.problems]


def test_loads_main_and_pipeline_folder(tmp_path):
    path = write_config(tmp_path, MINIMAL_MAIN, {"echo": ECHO})
    runtime = build_runtime(load_config(path))
    assert list(runtime.pipelines) == ["echo"]
    [route] = runtime.routes["default"]
    assert (route.prefix, route.endpoint.name, route.pipeline.name) == ("/echo", "e", "echo")
    assert runtime.config.networks["default"].listen == "tcp:0:interface=127.0.0.1"


def test_harmony_style_config_loads_unchanged(tmp_path):
    """Shapes from Harmony's own examples: `type` instead of `service`, inline
    options, 'middleware.x' references, registration tables, top-level paths."""
    main = """
pipelines_path = "pipelines"

[proxy]
id = "harmony-test"
log_level = "debug"

[network.default]
enable_wireguard = false
interface = "wg0"

[network.default.http]
bind_address = "127.0.0.1"
bind_port = 0

[services.http]
module = ""
[middleware_types.passthru]
module = ""
"""
    pipe = """
[pipelines.default]
description = "Basic passthru test"
networks = ["default"]
endpoints = ["basic_test"]
middleware = ['middleware.passthru']
backends = ["test_backend"]

[middleware.passthru]

[endpoints.basic_test]
type = "http"
options = { path_prefix = "/test" }

[backends.test_backend]
type = "http"
targets = ["test_target"]

[targets.test_target]
type = "http"
url = "http://localhost:8081/test"
"""
    path = write_config(tmp_path, main, {"default": pipe})
    runtime = build_runtime(load_config(path))
    assert runtime.pipelines["default"].middleware[0].name == "passthru"
    assert runtime.backends["test_backend"].base_urls == ["http://localhost:8081/test"]


def test_invalid_toml_names_file(tmp_path):
    path = write_config(tmp_path, "[proxy\nid = 1\n")
    with pytest.raises(ConfigErrors) as info:
        load_config(path)
    assert str(path) in str(info.value) and "invalid TOML" in str(info.value)


def test_bad_pipeline_file_refuses_start_not_silently_dropped(tmp_path):
    path = write_config(tmp_path, MINIMAL_MAIN, {"echo": ECHO, "broken": "[pipelines.x\n"})
    with pytest.raises(ConfigErrors) as info:
        load_config(path)
    assert "broken.toml" in str(info.value)


def test_all_problems_reported_each_with_file_and_key(tmp_path):
    bad = """
[pipelines.p]
networks = ["nonet"]
endpoints = ["e", "missing_ep"]
middleware = ["nomw"]
backends = ["b", "nobackend"]

[endpoints.e]
service = "nosuchservice"

[backends.b]
service = "http"
[backends.b.options]
base_url = "ftp://x"
"""
    main = MINIMAL_MAIN.replace("bind_port = 0", "bind_port = 70000")
    path = write_config(tmp_path, main, {"bad": bad})
    with pytest.raises(ConfigErrors) as info:
        load_config(path)
    msgs = [str(p) for p in info.value.problems]
    assert any("[network.default.http.bind_port]" in m and "70000" in m for m in msgs), msgs

    path = write_config(tmp_path, MINIMAL_MAIN, {"bad": bad})
    msgs = problems_of(path)
    expected = [
        "[endpoints.e.service]: unknown endpoint type 'nosuchservice'",
        "[backends.b.options.base_url]: must be an absolute http(s) URL",
        "[pipelines.p.middleware]: names unknown middleware 'nomw'",
        "[pipelines.p.backends]: names unknown backend 'nobackend'",
        "[pipelines.p.networks]: names unknown network 'nonet'",
        "[pipelines.p.endpoints]: names unknown endpoint 'missing_ep'",
    ]
    for e in expected:
        assert any(e in m for m in msgs), (e, msgs)
    assert all("bad.toml" in m for m in msgs), msgs


def test_duplicate_names_across_files(tmp_path):
    path = write_config(tmp_path, MINIMAL_MAIN, {"a": ECHO, "b": "[backends.b]\nservice = \"echo\"\n"})
    with pytest.raises(ConfigErrors) as info:
        load_config(path)
    [msg] = [str(p) for p in info.value.problems]
    assert "b.toml: [backends.b]: is defined twice" in msg and "a.toml" in msg


def test_route_conflict_names_both_pipelines(tmp_path):
    other = ECHO.replace("pipelines.echo", "pipelines.echo2").replace('"e"', '"e2"').replace(
        "endpoints.e]", "endpoints.e2]").replace("endpoints.e.options", "endpoints.e2.options").replace(
        '"b"', '"b"').replace("[backends.b]\nservice = \"echo\"\n", "")
    path = write_config(tmp_path, MINIMAL_MAIN, {"a": ECHO, "b": other})
    msgs = problems_of(path)
    assert any("route conflict" in m and "'echo'" in m and "'echo2'" in m and "/echo" in m for m in msgs), msgs


def test_prefix_must_be_absolute(tmp_path):
    path = write_config(tmp_path, MINIMAL_MAIN, {"a": ECHO.replace('"/echo"', '"echo"')})
    msgs = problems_of(path)
    assert any("[endpoints.e.options.path_prefix]: must start with '/'" in m for m in msgs), msgs


def test_listen_description_accepted(tmp_path):
    main = MINIMAL_MAIN.replace("[network.default.http]\nbind_address = \"127.0.0.1\"\nbind_port = 0",
                                '[network.default]\nlisten = "tcp:0:interface=127.0.0.1"')
    path = write_config(tmp_path, main, {"a": ECHO})
    runtime = build_runtime(load_config(path))
    assert runtime.config.networks["default"].listen == "tcp:0:interface=127.0.0.1"


def test_custom_middleware_module(tmp_path):
    main = MINIMAL_MAIN + '\n[middleware_types.stamp]\nmodule = "tests.custom_types:Stamp"\n'
    pipe = ECHO.replace('backends = ["b"]', 'middleware = ["stamp"]\nbackends = ["b"]')
    path = write_config(tmp_path, main, {"a": pipe})
    runtime = build_runtime(load_config(path))
    assert type(runtime.middleware["stamp"]).__name__ == "Stamp"


def test_custom_module_that_cannot_load(tmp_path):
    main = MINIMAL_MAIN + '\n[middleware_types.stamp]\nmodule = "tests.nope:Nope"\n'
    path = write_config(tmp_path, main, {"a": ECHO})
    msgs = problems_of(path)
    assert any("[middleware_types.stamp.module]: cannot load 'tests.nope:Nope'" in m for m in msgs), msgs


@pytest.mark.parametrize("network, key, message", [
    ('[network.default]\nlisten = "tcpp:8080"', "[network.default.listen]", "Unknown endpoint type: 'tcpp'"),
    ('[network.default]\nlisten = "tcp:notaport"', "[network.default.listen]", "is not a usable Twisted endpoint"),
    ('[network.default]\nlisten = "ssl:0:certKey=/nonexistent.pem:privateKey=/nonexistent.key"',
     "[network.default.listen]", "nonexistent"),
    ('[network.default.http]\nbind_port = 0\n[network.default.http.tls]\ncert = "missing.pem"',
     "[network.default.http.tls]", "missing.pem"),
])
def test_bad_listen_description_reported_before_listening(tmp_path, network, key, message):
    main = MINIMAL_MAIN.split("[network.default.http]")[0] + network + "\n"
    path = write_config(tmp_path, main)
    with pytest.raises(ConfigErrors) as info:
        load_config(path)
    [problem] = [str(p) for p in info.value.problems]
    assert str(path) in problem and key in problem and message in problem, problem


def test_systemd_listen_accepted_without_systemd(tmp_path):
    main = MINIMAL_MAIN.split("[network.default.http]")[0] + '[network.default]\nlisten = "systemd:domain=INET:index=0"\n'
    assert load_config(write_config(tmp_path, main)).networks["default"].listen.startswith("systemd:")


@pytest.mark.parametrize("table, message", [
    ('[storage]\nbackend = "nfs"', "[storage.backend]: 'nfs' is not supported by this version of Harmony"),
    ("[storage]\n[storage.options]\npath = 5", "[storage.options.path]: must be a folder path string"),
])
def test_storage_table_errors_name_the_key(tmp_path, table, message):
    path = write_config(tmp_path, MINIMAL_MAIN + "\n" + table + "\n")
    with pytest.raises(ConfigErrors) as info:
        load_config(path)
    assert any(message in str(p) for p in info.value.problems), info.value.render()


def test_storage_path_relative_to_config_file(tmp_path):
    path = write_config(tmp_path, MINIMAL_MAIN + '\n[storage]\nbackend = "filesystem"\n[storage.options]\npath = "data"\n')
    assert load_config(path).storage_path == tmp_path / "data"


def all_problems(path):
    """Every problem, whether loading or building finds it."""
    try:
        build_runtime(load_config(path))
    except ConfigErrors as e:
        return [str(p) for p in e.problems]
    return []


BACKEND = '[backends.b]\nservice = "echo"\n'
# (extra for the main file, pipeline file text, expected "[key]: message" fragment)
MESSAGES = [
    ('log_level = "loud"', "", "[proxy.log_level]: must be one of trace, debug, info"),
    ("pipelines_path = 5", "", "[proxy.pipelines_path]: must be a path string"),
    ('[network.x]\nlisten = 5', "", "[network.x.listen]: must be a Twisted endpoint description"),
    ("[network.x.http]\nbind_address = 5", "", "[network.x.http.bind_address]: must be an IP address string"),
    ("[network.x]\nhttp = 5", "", "[network.x.http]: must be a table"),
    ("", "[endpoints]\ne = 5", "[endpoints.e]: must be a table"),
    ("", "[endpoints.e]\npath_prefix = '/e'", "[endpoints.e]: needs a 'service' (or 'type') naming its type"),
    ("", "[endpoints.e]\nservice = 5", "[endpoints.e.service]: must be a string"),
    ("", '[endpoints.e]\nservice = "http"\noptions = 5', "[endpoints.e.options]: must be a table"),
    ("", '[backends.b]\nservice = "http"\ntargets = "t"', "[backends.b.targets]: must be a list of target names"),
    ("", '[backends.b]\nservice = "http"\ntargets = ["nope"]',
     "[backends.b.options.targets]: names unknown target 'nope'"),
    ("", '[backends.b]\nservice = "http"', "[backends.b.options.base_url]: is required"),
    ("", '[backends.b]\nservice = "http"\nbase_url = "http://x"\ntimeout_secs = 0',
     "[backends.b.options.timeout_secs]: must be at least 0.001"),
    ('[backend_types.stamp]\nmodule = "tests.custom_types:Stamp"', '[backends.b]\nservice = "stamp"',
     "[backends.b]: type 'stamp' is not a backend"),
    ('[services.x]\nmodule = "tests.harness:MINIMAL_MAIN"', "",
     "[services.x.module]: 'tests.harness:MINIMAL_MAIN' implements none of IEndpoint, IBackend, IMiddleware"),
    ("[services.x]\nmodule = 5", "", "[services.x.module]: must be a string"),
    ("", '[pipelines.p]\nendpoints = "e"', "[pipelines.p.endpoints]: must be a list of names"),
    ("", "[pipelines.p]\nmiddleware = [1]", "[pipelines.p.middleware]: must be a list of names"),
    ("", '[pipelines]\np = "x"', "[pipelines.p]: must be a table"),
    ("", "pipelines = 5", "[pipelines]: must be a table of named entries"),
    ("[network.grouping]\n", '[pipelines.p]\nnetworks = ["grouping"]\nendpoints = ["e"]\nbackends = ["b"]\n'
     '[endpoints.e]\nservice = "http"\n' + BACKEND, "[pipelines.p.networks]: network 'grouping' has no HTTP listener"),
]


@pytest.mark.parametrize("main_extra, pipeline, message", MESSAGES, ids=[m[2].split("]")[0][1:] for m in MESSAGES])
def test_each_config_error_message(tmp_path, main_extra, pipeline, message):
    if main_extra.startswith("pipelines_path"):
        main = main_extra + "\n" + MINIMAL_MAIN
    elif main_extra.startswith("log_level"):
        main = MINIMAL_MAIN.replace('log_level = "debug"', main_extra)
    else:
        main = MINIMAL_MAIN + "\n" + main_extra + "\n"
    path = write_config(tmp_path, main, {"p": pipeline} if pipeline else None)
    problems = all_problems(path)
    assert any(message in p for p in problems), problems
    assert all(p.startswith(str(tmp_path)) for p in problems), problems  # each names its file


def test_http_endpoint_without_any_network(tmp_path):
    main = '[proxy]\nid = "x"\n'
    path = write_config(tmp_path, main, {"p": '[pipelines.p]\nendpoints = ["e"]\nbackends = ["b"]\n'
                                              '[endpoints.e]\nservice = "http"\n' + BACKEND})
    assert any("[pipelines.p.networks]: HTTP endpoint 'e' needs a network with [network.NAME.http] or 'listen'" in p
               for p in all_problems(path))


def test_unreadable_and_non_utf8_pipeline_files(tmp_path):
    path = write_config(tmp_path, MINIMAL_MAIN, {"ok": ECHO})
    (tmp_path / "pipelines" / "folder.toml").mkdir()
    (tmp_path / "pipelines" / "latin1.toml").write_bytes(b"# caf\xe9\n")
    problems = all_problems(path)
    assert any("folder.toml: cannot read" in p for p in problems), problems
    assert any("latin1.toml: is not UTF-8 text" in p for p in problems), problems


def test_unknown_options_are_warnings_not_errors(tmp_path):
    path = write_config(tmp_path, MINIMAL_MAIN, {"p": ECHO.replace('path_prefix = "/echo"',
                                                                  'path_prefix = "/echo"\npath_prefx = "/oops"')})
    runtime = build_runtime(load_config(path))
    assert any("[endpoints.e.options.path_prefx]: unknown key, ignored (did you mean 'path_prefix'?)" in str(w)
               for w in runtime.warnings), runtime.warnings


def test_poll_spin_defaults_on_and_is_checked(tmp_path):
    """``[proxy] poll_spin_us``: 300 unless said (harmony.compat.spin), 0 turns it off,
    anything but an integer 0-5000 is named with its file and key."""
    path = write_config(tmp_path, MINIMAL_MAIN, {"echo": ECHO})
    assert load_config(path).proxy.poll_spin_us == 300
    path = write_config(tmp_path, MINIMAL_MAIN.replace("[proxy]", "[proxy]\npoll_spin_us = 0"), {"echo": ECHO})
    assert load_config(path).proxy.poll_spin_us == 0
    for bad in ("-1", "5001", "true", '"300"', "0.3"):
        path = write_config(tmp_path, MINIMAL_MAIN.replace("[proxy]", f"[proxy]\npoll_spin_us = {bad}"),
                            {"echo": ECHO})
        with pytest.raises(ConfigErrors) as info:
            load_config(path)
        assert "harmony.toml: [proxy.poll_spin_us]: must be an integer 0-5000 (microseconds), got " in str(info.value)
