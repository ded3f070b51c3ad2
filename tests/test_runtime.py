"""harmony.runtime: a configuration built into components, pipelines and routes (built, not
started: nothing listens), every problem reported at once."""

from __future__ import annotations

import pytest

from harmony.config.errors import ConfigErrors
from harmony.runtime import load_runtime, normalise_prefix, route_table
from tests.harness import MINIMAL_MAIN, echo_pipeline, write_config
from tests.memory import ECHO_PIPELINE, built_runtime

DIMSE = """
[pipelines.dimse]
endpoints = ["scp"]
backends = ["pacs_echo"]
[endpoints.scp]
service = "dicom_scp"
[endpoints.scp.options]
local_aet = "HARMONY"
port = 0
[backends.pacs_echo]
service = "echo"
"""


def test_components_pipelines_and_routes(tmp_path):
    runtime = built_runtime(tmp_path, pipelines=ECHO_PIPELINE + echo_pipeline("deep", "/api/deep", "deep", "b2"))
    assert set(runtime.endpoints) == {"api", "deep"} and set(runtime.backends) == {"be", "b2"}
    pipeline = runtime.pipelines["main"]
    assert [b.name for b in pipeline.backends] == ["be"]
    prefixes = [r.prefix for r in runtime.routes["default"]]
    assert prefixes.index("/api/deep") < prefixes.index("/api")  # longest prefix first
    assert runtime.endpoint_pipeline("deep").name == "deep" and runtime.endpoint_pipeline("nope") is None


def test_self_listening_endpoints_are_listeners_with_their_pipeline(tmp_path):
    runtime = built_runtime(tmp_path, pipelines=ECHO_PIPELINE + DIMSE)
    assert [(ep.name, p.name) for ep, p in runtime.listeners()] == [("scp", "dimse")]
    rows = {r["endpoint"]: r for r in route_table(runtime)}
    assert rows["api"]["prefix"] == "/api" and rows["scp"]["service"] == "dicom_scp"


def test_every_problem_is_reported_at_once(tmp_path):
    broken = ECHO_PIPELINE.replace('service = "echo"', 'service = "carrier_pigeon"') + """
[pipelines.second]
networks = ["default"]
endpoints = ["api"]
backends = ["missing"]
"""
    path = write_config(tmp_path, MINIMAL_MAIN, {"main": broken})
    with pytest.raises(ConfigErrors) as e:
        load_runtime(path)
    text = e.value.render()
    assert "carrier_pigeon" in text and "missing" in text
    assert len(e.value.problems) >= 2


def test_normalise_prefix():
    assert normalise_prefix("//a//b/") == "/a/b" and normalise_prefix("/") == "/"
