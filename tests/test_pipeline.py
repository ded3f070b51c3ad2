"""The pipeline executor over real HTTP: order, short-circuit, and error mapping.

Middleware types come from tests/pipeline_types.py, registered the way an
operator registers a custom type (``[middleware_types.X] module = ...``).
"""

import json

import pytest
import pytest_twisted
import treq

from tests.harness import MINIMAL_MAIN, start_harmony, write_config

TYPES = "".join(
    f'\n[middleware_types.{name}]\nmodule = "tests.pipeline_types:{cls}"\n'
    for name, cls in [("trace", "Trace"), ("slowtrace", "SlowTrace"), ("answer", "Answer"), ("deny", "Deny"),
                      ("missing", "Missing"), ("boom", "Boom"), ("boom_out", "BoomOnResponse")]
) + '\n[services.crashing]\nmodule = "tests.pipeline_types:CrashingBackend"\n'

PIPES = """
[middleware.a]
type = "trace"
[middleware.b]
type = "slowtrace"
[middleware.c]
type = "trace"
[middleware.stop]
type = "answer"

[backends.echo]
service = "echo"
[backends.crash]
service = "crashing"

{pipelines}
"""


def pipeline(name, middleware, backends=("echo",)):
    return f"""
[pipelines.{name}]
networks = ["default"]
endpoints = ["{name}_ep"]
middleware = {json.dumps(list(middleware))}
backends = {json.dumps(list(backends))}
[endpoints.{name}_ep]
service = "http"
[endpoints.{name}_ep.options]
path_prefix = "/{name}"
"""


CASES = {
    "order": (["a", "b", "c"],),
    "short": (["a", "stop", "c"],),
    "deny": (["a", "deny"],),
    "missing": (["missing"],),
    "boom": (["boom"],),
    "boomout": (["a", "boom_out"],),
    "crash": ([], ["crash"]),
    "nobackend": (["a"], []),
}


@pytest.fixture(scope="module")
def harmony(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    pipes = PIPES.format(pipelines="".join(pipeline(n, *args) for n, args in CASES.items()))
    path = write_config(folder, MINIMAL_MAIN + TYPES, {"p": pipes})
    running = pytest_twisted.blockon(start_harmony(path))
    yield running
    pytest_twisted.blockon(running.stop())


async def problem(resp, status):
    assert resp.code == status
    assert resp.headers.getRawHeaders("content-type") == ["application/problem+json"]
    doc = json.loads(await resp.content())
    assert doc["status"] == status
    assert doc["request_id"] == resp.headers.getRawHeaders("x-request-id")[0]
    assert len(doc["request_id"]) == 32
    return doc


@pytest_twisted.ensureDeferred
async def test_middleware_runs_left_in_order_and_right_in_reverse(harmony):
    resp = await treq.get(harmony.url("/order/x"))
    doc = json.loads(await resp.content())
    assert resp.code == 200
    assert doc["metadata"]["trace"] == "a>b>c"
    assert resp.headers.getRawHeaders("x-trace-out") == ["c", "b", "a"]


@pytest_twisted.ensureDeferred
async def test_short_circuit_reaches_client_unchanged(harmony):
    resp = await treq.post(harmony.url("/short/x"), b"ignored")
    assert resp.code == 418
    assert resp.headers.getRawHeaders("content-type") == ["application/x-teapot"]
    assert resp.headers.getRawHeaders("x-answered-by") == ["stop"]
    assert await resp.content() == b"\x00short-circuit\xff"
    # Only middleware to the left of the answering one sees the response; the
    # backend (echo, which would answer JSON) and "c" never ran.
    assert resp.headers.getRawHeaders("x-trace-out") == ["a"]


@pytest_twisted.ensureDeferred
async def test_auth_failures_are_401_and_403(harmony):
    doc = await problem(await treq.get(harmony.url("/deny")), 401)
    assert doc["title"] == "Unauthorized" and doc["detail"] == "credentials required"
    resp = await treq.get(harmony.url("/deny"))
    assert resp.headers.getRawHeaders("www-authenticate") == ['Bearer realm="t"']
    await resp.content()
    doc = await problem(await treq.get(harmony.url("/deny"), headers={"Authorization": "Bearer x"}), 403)
    assert doc["title"] == "Forbidden"


@pytest_twisted.ensureDeferred
async def test_not_found_is_404(harmony):
    doc = await problem(await treq.get(harmony.url("/missing/thing")), 404)
    assert doc["detail"] == "no such resource" and doc["instance"] == "/missing/thing"


@pytest_twisted.ensureDeferred
async def test_middleware_failure_is_500_without_internals(harmony):
    doc = await problem(await treq.get(harmony.url("/boom")), 500)
    assert doc["title"] == "Middleware Failure"
    assert "DOE" not in json.dumps(doc)  # the exception text stays in the log
    doc = await problem(await treq.get(harmony.url("/boomout")), 500)
    assert doc["title"] == "Middleware Failure" and "boom_out" in doc["detail"]


@pytest_twisted.ensureDeferred
async def test_backend_bug_is_502(harmony):
    doc = await problem(await treq.get(harmony.url("/crash")), 502)
    assert doc["title"] == "Bad Gateway"


@pytest_twisted.ensureDeferred
async def test_configuration_error_is_500(harmony):
    doc = await problem(await treq.get(harmony.url("/nobackend")), 500)
    assert doc["title"] == "Configuration Error" and "nobackend" in doc["detail"]


@pytest_twisted.ensureDeferred
async def test_caller_request_id_is_in_problem_body(harmony):
    resp = await treq.get(harmony.url("/missing"), headers={"X-Request-ID": "trace-42"})
    doc = json.loads(await resp.content())
    assert doc["request_id"] == "trace-42"


@pytest_twisted.ensureDeferred
async def test_malformed_request_id_is_replaced(harmony):
    resp = await treq.get(harmony.url("/order"), headers={"X-Request-ID": "bad id\twith spaces"})
    doc = json.loads(await resp.content())
    assert doc["metadata"]["request_id"] != "bad id\twith spaces" and len(doc["metadata"]["request_id"]) == 32


def test_observers_see_every_request_even_errors():
    """Pipeline.observers (metrics/audit hooks) run for answered and failed requests."""
    from harmony.endpoints.http import HttpEndpoint
    from harmony.envelope import RequestEnvelope
    from harmony.pipeline import Pipeline
    from tests.pipeline_types import Missing

    seen = []
    p = Pipeline("p", [Missing("m")], [])
    p.observers.append(lambda req, resp, secs: seen.append((req.metadata["pipeline"], resp.status, secs >= 0)))
    p.observers.append(lambda *a: 1 / 0)  # a broken observer must not break the request
    d = p.handle(RequestEnvelope(metadata={"request_id": "r1"}), HttpEndpoint("e"))
    response = d.result
    assert response.status == 404 and seen == [("p", 404, True)]


def test_send_batch_after_is_one_backend_call_unless_a_middleware_must_see_each_request():
    """A fanning middleware's batch (a STOW-RS upload's C-STOREs) reaches a backend that
    files batches in one call; with a middleware right of the fanning one, each request
    passes alone through it, and each outcome (a failure too) comes back in order."""
    from twisted.python.failure import Failure
    from zope.interface import implementer

    from harmony.backends.base import Backend
    from harmony.envelope import RequestEnvelope, ResponseEnvelope
    from harmony.errors import BadRequest
    from harmony.interfaces import IBatchBackend
    from harmony.middleware.base import Middleware
    from harmony.pipeline import Pipeline

    @implementer(IBatchBackend)
    class Batches(Backend):
        def __init__(self, name):
            super().__init__(name)
            self.calls = []

        def send(self, request):
            self.calls.append("one")
            if request.metadata["n"] == 1:
                raise BadRequest("refused")
            return ResponseEnvelope(200, body=str(request.metadata["n"]).encode())

        def send_batch(self, requests):
            self.calls.append(len(requests))
            return [ResponseEnvelope(200, body=str(r.metadata["n"]).encode()) if r.metadata["n"] != 1
                    else Failure(BadRequest("refused")) for r in requests]

    class Seen(Middleware):
        def __init__(self, name):
            super().__init__(name)
            self.seen = []

        def on_request(self, request):
            self.seen.append(request.metadata["n"])
            return request

    def requests():
        return [RequestEnvelope(metadata={"n": n}) for n in range(3)]

    fan, seen, backend = Seen("fan"), Seen("seen"), Batches("b")
    alone = Pipeline("p", [fan], [backend]).send_batch_after(fan, requests()).result
    assert backend.calls == [3]
    assert [a.body if isinstance(a, ResponseEnvelope) else a.check(BadRequest) for a in alone] == [
        b"0", BadRequest, b"2"]
    backend.calls.clear()
    each = Pipeline("p", [fan, seen], [backend]).send_batch_after(fan, requests(), concurrency=2).result
    assert backend.calls == ["one"] * 3 and seen.seen == [0, 1, 2]
    assert [a.body if isinstance(a, ResponseEnvelope) else a.check(BadRequest) for a in each] == [
        b"0", BadRequest, b"2"]
