"""Middleware errors reach the client with their real status through every
endpoint type (issue 3): authentication -> 401, path filter -> 404,
transform/internal failure -> 500, each in the endpoint's own dialect:

- ``http``, ``dicomweb``, ``jmix``: RFC 9457 ``application/problem+json``
- ``fhir``: an OperationOutcome (``login``, ``not-found``, ``exception``)
- ``dicom_scp``: DIMSE failure statuses on an association that stays usable
  (a C-STORE refused for authentication is 0x0124, "not authorised")

One Harmony runs a pipeline per (endpoint type, failing middleware), all with
the ``echo`` backend, which the failures must never reach; a request that
passes its middleware does reach it (200), so each case can fail.
"""

import base64
import json

import jwt
import pytest
import pytest_twisted
import treq
from fhir.resources.R4B.operationoutcome import OperationOutcome
from pydicom.dataset import Dataset
from pynetdicom import build_context
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelFind, Verification

from harmony.dicom import status as dimse
from tests.dicom_data import make_instance
from tests.harness import MINIMAL_MAIN, start_harmony, write_config
from tests.peers import free_port

SECRET = "a-test-secret-of-at-least-32-bytes-long!"
UUID = "0b7a4c57-0d1e-4d0e-9a59-4b1b7f6f9a11"
FAILS = json.dumps([{"operation": "shift", "spec": {"*": "x[&(5,0)]"}}])

MIDDLEWARE = {
    "basic": 'type = "basic_auth"\nusername = "u"\npassword = "p"',
    "jwt": f'type = "jwt_auth"\nuse_hs256 = true\nhs256_secret = "{SECRET}"\naudience = "harmony-tests"',
    "transform": 'type = "transform"\nspec_path = "fails.json"\napply = "left"',
    "meta": 'type = "metadata_transform"\nspec_path = "fails.json"\napply = "left"',
}
#: endpoint type -> the path_filter rules that let its "passing" request through
PATH_RULES = {"http": ["/ok/{*rest}"], "fhir": ["/Patient/{id}"], "dicomweb": ["/studies"],
              "jmix": ["/api/jmix/{id}"], "dicom_scp": ["/never"]}
HTTP_TYPES = {"http": "h", "fhir": "f", "dicomweb": "w", "jmix": "j"}
CASES = {"http": ("basic", "jwt", "path", "transform", "meta"),
         "fhir": ("basic", "jwt", "path", "transform", "meta"),
         "dicomweb": ("basic", "jwt", "path", "meta"),
         "jmix": ("basic", "jwt", "path", "meta"),
         "dicom_scp": ("basic", "jwt", "path", "transform", "meta")}


def build_config(tmp_path):
    transforms = tmp_path / "transforms"
    transforms.mkdir()
    (transforms / "fails.json").write_text(FAILS)
    parts = ['[backends.be]\nservice = "echo"\n']
    scp_ports = {}
    for etype, cases in CASES.items():
        for case in cases:
            name = f"{etype}_{case}"
            mw = f"mw_{name}"
            if case == "path":
                body = f'type = "path_filter"\nrules = {json.dumps(PATH_RULES[etype])}'
            else:
                body = MIDDLEWARE[case]
            parts.append(f"[middleware.{mw}]\n{body}\n")
            parts.append(f'[pipelines.{name}]\nnetworks = ["default"]\nendpoints = ["{name}"]\n'
                         f'middleware = ["{mw}"]\nbackends = ["be"]\n')
            if etype == "dicom_scp":
                scp_ports[case] = port = free_port()
                parts.append(f'[endpoints.{name}]\nservice = "dicom_scp"\n[endpoints.{name}.options]\n'
                             f'local_aet = "HARMONY"\nbind_addr = "127.0.0.1"\nport = {port}\n'
                             f'enable_find = true\nenable_store = true\n')
            else:
                parts.append(f'[endpoints.{name}]\nservice = "{etype}"\n[endpoints.{name}.options]\n'
                             f'path_prefix = "/{HTTP_TYPES[etype]}-{case}"\n')
    main = MINIMAL_MAIN.replace("[proxy]", f'[proxy]\ntransforms_path = "{transforms}"', 1)
    main += '\n[storage.options]\npath = "var"\n'
    return write_config(tmp_path, main, {"all": "\n".join(parts)}), scp_ports


@pytest.fixture(scope="module")
def harmony(tmp_path_factory):
    path, scp_ports = build_config(tmp_path_factory.mktemp("mwerrors"))
    running = pytest_twisted.blockon(start_harmony(path))
    running.scp_ports = scp_ports
    yield running
    pytest_twisted.blockon(running.stop())


def good_token() -> str:
    import time
    return jwt.encode({"sub": "tester", "aud": "harmony-tests", "exp": int(time.time()) + 600}, SECRET,
                      algorithm="HS256")


def credentials(case: str, good: bool) -> dict:
    if case == "basic":
        return {"Authorization": ["Basic " + base64.b64encode(b"u:p" if good else b"u:wrong").decode()]}
    if case == "jwt":
        return {"Authorization": [f"Bearer {good_token() if good else 'not.a.token'}"]}
    return {}


#: (endpoint type, case) -> (method, passing path, failing path, body, content type)
def request_for(etype, case):
    prefix = f"/{HTTP_TYPES[etype]}-{case}"
    if etype == "http":
        return "POST", prefix + "/ok/x", prefix + "/nope", b'{"a": 1}', "application/json"
    if etype == "fhir":
        if case == "transform":
            return "POST", None, prefix + "/Patient", b'{"resourceType": "Patient"}', "application/fhir+json"
        return "GET", prefix + "/Patient/p1", prefix + "/Observation/o1", None, None
    if etype == "dicomweb":
        return "GET", prefix + "/studies", prefix + "/series", None, None
    return "GET", prefix + f"/api/jmix/{UUID}", prefix + f"/api/jmix/{UUID}/manifest", None, None


async def call(harmony, method, path, body, ctype, headers):
    headers = dict(headers)
    if ctype:
        headers["Content-Type"] = [ctype]
    resp = await treq.request(method, harmony.url(path), data=body, headers=headers)
    return resp, await resp.content()


def check_dialect(etype, resp, content, status, fhir_code):
    ctype = resp.headers.getRawHeaders("content-type")[0]
    doc = json.loads(content)
    if etype == "fhir":
        assert ctype.startswith("application/fhir+json"), ctype
        OperationOutcome.model_validate(doc)
        assert doc["issue"][0]["code"] == fhir_code, doc
    else:
        assert ctype.startswith("application/problem+json"), ctype
        assert doc["status"] == status, doc
    return doc


HTTP_CASES = [(e, c) for e in HTTP_TYPES for c in CASES[e]]


@pytest.mark.parametrize("etype, case", HTTP_CASES)
@pytest_twisted.ensureDeferred
async def test_middleware_error_status_reaches_http_clients(harmony, etype, case):
    method, passing, failing, body, ctype = request_for(etype, case)
    if case in ("basic", "jwt"):
        resp, content = await call(harmony, method, passing, body, ctype, credentials(case, good=False))
        assert resp.code == 401, content
        challenge = resp.headers.getRawHeaders("www-authenticate")[0]
        assert challenge.startswith("Basic realm=" if case == "basic" else "Bearer"), challenge
        check_dialect(etype, resp, content, 401, "login")
    elif case == "path":
        resp, content = await call(harmony, method, failing, body, ctype, {})
        assert resp.code == 404, content
        doc = check_dialect(etype, resp, content, 404, "not-found")
        # The path filter's own 404, not the endpoint's or the backend's.
        detail = doc["issue"][0]["diagnostics"] if etype == "fhir" else doc["detail"]
        assert detail.startswith("no route for"), detail
    else:
        target = failing if passing is None else passing
        resp, content = await call(harmony, method, target, body, ctype, {})
        assert resp.code == 500, content
        doc = check_dialect(etype, resp, content, 500, "exception")
        detail = doc["issue"][0]["diagnostics"] if etype == "fhir" else doc["detail"]
        assert f"'mw_{etype}_{case}'" in detail, detail


@pytest.mark.parametrize("etype, case", [(e, c) for e, c in HTTP_CASES if c in ("basic", "jwt", "path")])
@pytest_twisted.ensureDeferred
async def test_passing_requests_reach_the_backend(harmony, etype, case):
    """The control: the same middleware lets a good request through (so the
    failures above are the middleware's, not the endpoint's)."""
    method, passing, _, body, ctype = request_for(etype, case)
    resp, content = await call(harmony, method, passing, body, ctype, credentials(case, good=True))
    if etype == "jmix":
        # Past the middleware the store answers: that envelope id is unknown.
        assert resp.code == 404 and b"envelope" in content.lower(), content
    else:
        assert resp.code == 200, content
        assert json.loads(content)["metadata"]["endpoint"] == f"{etype}_{case}"


# ---------------------------------------------------------------- DIMSE

async def dimse_exchange(port: int):
    """C-FIND, C-STORE, then C-ECHO on one association.

    The client is Harmony's own requestor: pynetdicom's client raced on a loaded
    machine ("Received unexpected C-STORE service message", then a DIMSE timeout)."""
    from twisted.internet import reactor

    from harmony.dicom.ul import commands, datasets
    from harmony.dicom.ul.requestor import RequestorSettings, associate

    contexts = [build_context(StudyRootQueryRetrieveInformationModelFind), build_context(CTImageStorage),
                build_context(Verification)]
    assoc = await associate(reactor, "127.0.0.1", port, RequestorSettings(local_aet="CLIENT"), "HARMONY", contexts)
    try:
        cid = {str(cx.abstract_syntax): c for c, cx in assoc.contexts.items()}
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        find_cx = cid[str(StudyRootQueryRetrieveInformationModelFind)]
        finds = []
        final = await assoc.request(find_cx, {"AffectedSOPClassUID": str(StudyRootQueryRetrieveInformationModelFind),
                                              "CommandField": commands.C_FIND_RQ, "Priority": 0},
                                    datasets.encode(query, str(assoc.contexts[find_cx].transfer_syntax[0])),
                                    on_pending=lambda m: finds.append((m.command["Status"], None)))
        finds.append((final.command["Status"], final.command.get("ErrorComment")))
        ds = make_instance(patient_id="P", patient_name="T^T", study_uid="1.2.3.4", series_uid="1.2.3.4.1",
                           sop_uid="1.2.3.4.1.1", modality="CT", series_number=1, instance_number=1,
                           study_date="20240101", series_description="S", accession="A", seed=1)
        store_cx = cid[str(CTImageStorage)]
        store = await assoc.request(store_cx, {"AffectedSOPClassUID": str(CTImageStorage),
                                               "CommandField": commands.C_STORE_RQ, "Priority": 0,
                                               "AffectedSOPInstanceUID": "1.2.3.4.1.1"},
                                    datasets.encode(ds, str(assoc.contexts[store_cx].transfer_syntax[0])))
        echo = await assoc.request(cid[str(Verification)], {"AffectedSOPClassUID": str(Verification),
                                                             "CommandField": commands.C_ECHO_RQ})
        return finds, store.command["Status"], echo.command["Status"], assoc.state == "established"
    finally:
        await assoc.release()


@pytest.mark.parametrize("case, find_status, store_status, words", [
    ("basic", dimse.UNABLE_TO_PROCESS, dimse.REFUSED_NOT_AUTHORISED, "credentials are required"),
    ("jwt", dimse.UNABLE_TO_PROCESS, dimse.REFUSED_NOT_AUTHORISED, "Bearer token is required"),
    ("path", dimse.UNABLE_TO_PROCESS, dimse.PROCESSING_FAILURE, "no route for"),
    ("transform", dimse.UNABLE_TO_PROCESS, dimse.PROCESSING_FAILURE, "'mw_dicom_scp_transform' failed"),
    ("meta", dimse.UNABLE_TO_PROCESS, dimse.PROCESSING_FAILURE, "'mw_dicom_scp_meta' failed"),
])
@pytest_twisted.ensureDeferred
async def test_middleware_errors_are_dimse_failure_statuses(harmony, case, find_status, store_status, words):
    finds, store, echo, alive = await dimse_exchange(harmony.scp_ports[case])
    assert len(finds) == 1, finds  # no pending matches: the failure is the only answer
    status, comment = finds[0]
    assert status == find_status, hex(status)
    assert words in (comment or ""), comment
    assert store == store_status, hex(store)
    # A failed request does not cost the association: C-ECHO still works on it.
    assert echo == 0x0000 and alive
