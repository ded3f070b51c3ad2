"""Typed request state (harmony.state): the rule that keeps it typed, and what it guarantees.

The rule (docs/architecture.md, "Request state"): Harmony's own code hands facts to
other components through ``envelope.state``; ``envelope.context`` is free-form and
belongs to user middleware only.  The scan below fails on any read or write of
``.context`` as a dict anywhere under src/harmony, so a well-known key cannot creep
back into the string-keyed dict.  The synthetic snippets prove the scan sees each form.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import pytest_twisted

from harmony import errors
from harmony.dicom import status as dimse
from harmony.envelope import RequestEnvelope, ResponseEnvelope
from harmony.pipeline import Pipeline
from harmony.state import RequestState, ResponseState

SRC = Path(__file__).resolve().parents[1] / "src" / "harmony"

#: Dict methods: ``x.context.get(...)`` and friends are dict use; a DICOM presentation
#: context's attributes (``op.context.abstract_syntax``) are not.
_DICT_METHODS = {"get", "pop", "setdefault", "update", "items", "keys", "values", "clear", "copy", "popitem"}
_ENVELOPES = {"RequestEnvelope", "ResponseEnvelope"}


def _is_context(node) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "context"


def context_uses(source: str, filename: str = "<src>") -> list[str]:
    """Every place *source* uses an envelope's ``context`` as a dict."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Subscript) and _is_context(node.value):
            found.append(f"{where}: .context[...]")
        elif (isinstance(node, ast.Attribute) and node.attr in _DICT_METHODS and _is_context(node.value)):
            found.append(f"{where}: .context.{node.attr}")
        elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops) \
                and any(_is_context(c) for c in node.comparators):
            found.append(f"{where}: ... in .context")
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            # ``self.context = context``: an object keeping its own (a DIMSE operation's presentation context).
            if any(_is_context(t) and not (isinstance(t.value, ast.Name) and t.value.id == "self") for t in targets):
                found.append(f"{where}: .context = ...")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            if (name in _ENVELOPES or owner in _ENVELOPES) and any(k.arg == "context" for k in node.keywords):
                found.append(f"{where}: {owner or name}(context=...)")
    return found


def test_product_code_never_uses_the_free_form_context():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        found += context_uses(path.read_text(), str(path.relative_to(SRC.parent)))
    assert found == [], ("Harmony's own code must put well-known facts in envelope.state "
                         "(harmony.state), not the user middleware's context dict:\n" + "\n".join(found))


@pytest.mark.parametrize("snippet", [
    'request.context["dicom_results"] = stream',
    'x = response.context["dimse_status"]',
    'x = request.context.get("pipeline")',
    'request.context.setdefault("pipeline", self)',
    'request.context.pop("dicomweb", None)',
    'if "dicomweb" in request.context: pass',
    'if "dicomweb" not in request.context: pass',
    'request.context = {}',
    'ResponseEnvelope(200, context={"dicom_results": s})',
    'RequestEnvelope(method="POST", context={"instance": i})',
    'ResponseEnvelope.json(200, {}, context={})',
])
def test_the_scan_sees_every_form_of_dict_use(snippet):
    assert len(context_uses(snippet)) == 1


@pytest.mark.parametrize("snippet", [
    "uid = op.context.abstract_syntax",          # a DIMSE presentation context
    "syntax = self.context.transfer_syntax[0]",
    "context.scu_role = True",
    "self.context = context",
    "spec.apply(document, context)",             # JOLT's own context argument
    "request.state.dicom.instance = instance",
])
def test_the_scan_leaves_other_contexts_alone(snippet):
    assert context_uses(snippet) == []


def test_state_names_are_fixed_a_typo_is_an_error():
    request, response = RequestEnvelope(), ResponseEnvelope()
    with pytest.raises(AttributeError):
        request.state.dicom_result = object()  # sic: the response's field, misspelt, on the request
    with pytest.raises(AttributeError):
        response.state.dimse_staus = 0
    with pytest.raises(AttributeError):
        request.state.dicom.instanse = object()


def test_each_envelope_has_its_own_state():
    a, b = RequestEnvelope(), RequestEnvelope()
    a.state.dicom.instance = "mine"
    a.state.dicomweb.warnings = ["w"]
    assert b.state.dicom.instance is None and b.state.dicomweb.warnings == ()
    assert ResponseEnvelope().state is not ResponseEnvelope().state


class _Stream:
    def __init__(self, status, error_comment=None):
        self.status, self.error_comment = status, error_comment


def test_the_dimse_status_is_one_typed_field_with_a_metadata_view():
    response = dimse.record(ResponseEnvelope(), dimse.STORE_OUT_OF_RESOURCES, "disk full")
    assert response.state.dimse_status == 0xA700 and response.state.error_comment == "disk full"
    assert response.metadata[dimse.METADATA_KEY] == "0xA700"  # the view user rules read
    assert dimse.of_response(response) == 0xA700
    # A result stream's status is the answer's, once it has one.
    streamed = ResponseEnvelope(state=ResponseState(dicom_results=_Stream(dimse.PENDING)))
    assert dimse.of_response(streamed) == dimse.PENDING
    streamed.state.dicom_results.status = None
    assert dimse.of_response(streamed) is None
    assert dimse.label(None) == "" and dimse.label(0) == "0x0000"


def test_a_client_hang_up_is_recorded_in_the_state():
    request = RequestEnvelope()
    assert not errors.client_gone(request)
    errors.mark_client_gone(request)
    assert errors.client_gone(request) and request.state.client_gone and request.context == {}


class _UserMiddleware:
    """A middleware written outside Harmony: its keys in context reach its own on_response."""

    name = "mine"

    def on_request(self, request):
        request.context["my.started"] = "yes"
        return request

    def on_response(self, request, response):
        response.headers.setRawHeaders("x-seen", [request.context["my.started"]])
        response.context["my.answered"] = True
        return response


class _Backend:
    name = "b"

    def send(self, request):
        return ResponseEnvelope(200, body=b"ok")


class _Endpoint:
    name = "e"

    def pre_process(self, request):
        return request

    def post_process(self, request, response):
        return response

    def error_response(self, error, request):
        return ResponseEnvelope(error.status)


@pytest_twisted.ensureDeferred
async def test_user_middleware_keeps_the_free_form_dict_and_the_pipeline_is_in_the_state():
    pipeline = Pipeline("p", [_UserMiddleware()], [_Backend()])
    request = RequestEnvelope(state=RequestState())
    response = await pipeline.handle(request, _Endpoint())
    assert response.status == 200 and response.header("x-seen") == "yes"
    assert request.context == {"my.started": "yes"} and response.context == {"my.answered": True}
    assert request.state.pipeline is pipeline
