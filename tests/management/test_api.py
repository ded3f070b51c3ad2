"""harmony.management.api in memory: the admin API's Klein routes on treq's StubTreq, in front of a
HarmonyService built (not started) from a config on a MemoryReactorClock.  Authentication by bearer
token or console session (with CSRF), problem+json for every error, and what the main routes say."""

from __future__ import annotations

import json

import pytest
from treq.testing import StubTreq
from twisted.internet.testing import MemoryReactorClock

from harmony.config import load_config
from harmony.management.api import AdminApi, AdminResource
from harmony.runtime import build_runtime
from harmony.service import HarmonyService
from tests.harness import write_config
from tests.memory import ECHO_PIPELINE, result_of

TOKEN = "management-token-0123456789"
MAIN = f"""
[proxy]
id = "memory"
log_level = "info"

[network.default.http]
bind_address = "127.0.0.1"
bind_port = 0

[management]
enabled = true
token = "{TOKEN}"
bind_port = 0

[backends.pacs]
service = "http"
base_url = "https://svc:hunter2@pacs.test/dicom-web"
"""


@pytest.fixture
def admin(tmp_path):
    path = write_config(tmp_path, MAIN, {"main": ECHO_PIPELINE})
    service = HarmonyService(build_runtime(load_config(path)), MemoryReactorClock())
    return Admin(StubTreq(AdminResource(AdminApi(service))), service)


class Admin:
    def __init__(self, treq, service):
        self.treq = treq
        self.service = service

    def call(self, method, path, *, token=TOKEN, body=None, headers=None):
        headers = dict(headers or {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        d = self.treq.request(method, "http://127.0.0.1:9901/admin" + path, headers=headers, data=body)
        self.treq.flush()
        answer = result_of(d)
        content = self.treq.content(answer)
        self.treq.flush()
        return answer, result_of(content)


def _json(body):
    return json.loads(body)


def test_every_call_needs_the_token(admin):
    answer, body = admin.call("GET", "/info", token=None)
    assert answer.code == 401 and _json(body)["status"] == 401
    assert answer.headers.getRawHeaders("www-authenticate") == ['Bearer realm="harmony-management"']
    assert admin.call("GET", "/info", token="wrong-token-0123456789")[0].code == 401
    assert answer.headers.getRawHeaders("x-content-type-options") == ["nosniff"]  # security headers on refusals too


def test_info_pipelines_routes(admin):
    info = _json(admin.call("GET", "/info")[1])
    assert info["proxy_id"] == "memory" and info["name"] == "harmony"
    pipelines = _json(admin.call("GET", "/pipelines/")[1])["pipelines"]  # a trailing slash is the same call
    assert [(p["name"], p["endpoints"], p["backends"]) for p in pipelines] == [("main", ["api"], ["be"])]
    routes = _json(admin.call("GET", "/routes")[1])
    assert "/api" in json.dumps(routes)


def test_metrics_are_prometheus_text(admin):
    answer, body = admin.call("GET", "/metrics")
    assert answer.code == 200 and b"harmony_info{" in body
    assert answer.headers.getRawHeaders("content-type")[0].startswith("text/plain")


def test_routing_errors_are_problem_json(admin):
    missing, body = admin.call("GET", "/nothing-here")
    assert missing.code == 404 and _json(body)["status"] == 404
    wrong, body = admin.call("DELETE", "/info")
    assert wrong.code == 405 and "GET" in wrong.headers.getRawHeaders("allow")[0]


def test_the_config_is_shown_redacted(admin):
    files = _json(admin.call("GET", "/config")[1])["files"]
    text = "".join(f["text"] for f in files)
    assert TOKEN not in text and "hunter2" not in text and "<redacted>" in text


def test_a_console_session_needs_its_csrf_token_to_change_anything(admin):
    answer, body = admin.call("POST", "/session", token=None, body=json.dumps({"token": TOKEN, "operator": "ann"}),
                              headers={"Content-Type": "application/json"})
    assert answer.code == 200
    session = _json(body)
    cookie = answer.headers.getRawHeaders("set-cookie")[0].split(";")[0]
    assert "HttpOnly" in answer.headers.getRawHeaders("set-cookie")[0]
    who = _json(admin.call("GET", "/session", token=None, headers={"Cookie": cookie})[1])
    assert who["csrf"] == session["csrf"]
    refused, body = admin.call("POST", "/reload", token=None, headers={"Cookie": cookie})
    assert refused.code == 403 and "CSRF" in _json(body)["detail"]
    entries = _json(admin.call("GET", "/audit")[1])["entries"]
    assert [(e["action"], e["ok"]) for e in entries if e["action"] == "session.login"] == [("session.login", True)]


def test_a_wrong_console_login_is_401_and_audited(admin):
    answer, _body = admin.call("POST", "/session", token=None, body=json.dumps({"token": "guess"}))
    assert answer.code == 401
    entries = _json(admin.call("GET", "/audit")[1])["entries"]
    assert [(e["action"], e["status"]) for e in entries] == [("session.login", 401)]
