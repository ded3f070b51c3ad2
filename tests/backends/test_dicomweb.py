"""harmony.backends.dicomweb in memory: DICOMweb requests forwarded to an upstream (a twisted.web
resource on the same MemoryReactorClock), its RetrieveURLs rewritten to the proxy's, its credential
used instead of the client's, and answers it cannot vouch for refused as 502."""

from __future__ import annotations

import gzip
import json

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.web.resource import Resource

from harmony.backends.dicomweb import DicomWebBackend
from harmony.config.errors import OptionError
from harmony.errors import BackendUnavailable
from tests.memory import Wires, build, failure_of, plugin_context, request, result_of, upstream_site

PORT = 8042
UPSTREAM = f"http://127.0.0.1:{PORT}/dicom-web"
STUDY = "1.2.826.0.1.3680043.10.543.1"


class Pacs(Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.seen = []
        self.body = json.dumps([{"0020000D": {"vr": "UI", "Value": [STUDY]},
                                 "00081190": {"vr": "UR", "Value": [f"{UPSTREAM}/studies/{STUDY}"]}}]).encode()
        self.gzip = False

    def render(self, req):
        self.seen.append(req)
        req.setHeader(b"content-type", b"application/dicom+json")
        if self.gzip:
            req.setHeader(b"content-encoding", b"gzip")
            return gzip.compress(self.body)
        return self.body


def _rig(tmp_path, **options):
    reactor = MemoryReactorClock()
    pacs = Pacs()
    upstream_site(reactor, pacs, PORT)
    backend = build(DicomWebBackend, {"base_url": UPSTREAM, **options}, name="pacs",
                    ctx=plugin_context(reactor, storage_path=tmp_path))
    return backend, pacs, Wires(reactor)


def _qido(**headers):
    return request("GET", "/studies", path="/dicomweb/studies", raw_query=b"PatientID=SYN*",
                   headers=headers, host="harmony.test", scheme="https")


def test_a_qido_answer_comes_back_with_urls_pointing_at_the_proxy(tmp_path):
    backend, pacs, wires = _rig(tmp_path)
    response = result_of(wires.run(backend.send(_qido())))
    doc = json.loads(response.body)
    assert doc[0]["00081190"]["Value"] == [f"https://harmony.test/dicomweb/studies/{STUDY}"]
    assert response.normalized == doc
    sent = pacs.seen[0]
    assert sent.uri == b"/dicom-web/studies?PatientID=SYN*"
    assert sent.requestHeaders.getRawHeaders(b"accept-encoding") == [b"identity"]


def test_the_backends_credential_replaces_the_clients(tmp_path):
    backend, pacs, wires = _rig(tmp_path, username="svc", password="pw")
    result_of(wires.run(backend.send(_qido(Authorization="Bearer the-clients-own"))))
    assert pacs.seen[0].requestHeaders.getRawHeaders(b"authorization") == [b"Basic c3ZjOnB3"]


def test_a_compressed_answer_is_decoded_before_rewriting(tmp_path):
    backend, pacs, wires = _rig(tmp_path)
    pacs.gzip = True
    response = result_of(wires.run(backend.send(_qido())))
    assert json.loads(response.body)[0]["00081190"]["Value"][0].startswith("https://harmony.test/")
    assert not response.headers.hasHeader(b"content-encoding")


@pytest.mark.parametrize("body, message", [(b"{not json", "malformed DICOM JSON"),
                                           (b"[" + b" " * 5000 + b"]", "exceeds")])
def test_answers_it_cannot_vouch_for_are_502(tmp_path, body, message):
    backend, pacs, wires = _rig(tmp_path, max_json_bytes=1024)
    pacs.body = body
    assert message in str(failure_of(wires.run(backend.send(_qido())), BackendUnavailable))


def test_a_base_url_is_required(tmp_path):
    with pytest.raises(OptionError) as e:
        build(DicomWebBackend, {}, ctx=plugin_context(MemoryReactorClock(), storage_path=tmp_path))
    assert e.value.key == "base_url"
