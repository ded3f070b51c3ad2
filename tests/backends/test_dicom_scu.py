"""harmony.backends.dicom_scu in memory: the backend's associations to a PACS, on a MemoryReactorClock.

The "PACS" is Harmony's own DICOM acceptor (harmony.dicom.ul) with a small handler answering C-ECHO
and C-FIND; the TCP connection between them is Twisted's in-memory one (twisted.test.iosim), so every
PDU goes through both state machines and nothing listens on a port.  The real-peer tier keeps the
tests against Orthanc and DCMTK (tests/backends/test_dicom_scu_peers.py); these pin the backend's own logic.
"""

from __future__ import annotations

import json
import types

import pytest
from pydicom.dataset import Dataset
from pynetdicom import build_context
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from harmony.backends.dicom_scu import DicomScuBackend, Job, Slots
from harmony.config.errors import OptionError
from harmony.dicom import status as dimse
from harmony.dicom.results import C_GET, DicomInstance
from harmony.dicom.ul import commands, datasets
from harmony.dicom.ul.acceptor import AcceptorFactory, AcceptorLimits, AcceptorSettings
from harmony.dicom.ul.datasets import MemorySink
from harmony.errors import BadRequest, HarmonyError
from tests.memory import Wires, build, failure_of, request, result_of

PACS_PORT = 11112


class FakePacsHandler:
    """Answers C-ECHO with success and C-FIND with ``matches`` (pending) then ``final``."""

    def __init__(self, matches=(), final=0x0000):
        self.matches = list(matches)
        self.final = final
        self.queries = []
        self.associations = 0

    def association_established(self, assoc):
        self.associations += 1

    def association_closed(self, assoc):
        pass

    def dataset_sink(self, assoc, context_id, command):
        return MemorySink(1 << 20)

    def on_request(self, assoc, message):
        reply = {"AffectedSOPClassUID": message.command["AffectedSOPClassUID"],
                 "MessageIDBeingRespondedTo": message.message_id}
        if message.field == commands.C_ECHO_RQ:
            assoc.send(message.context_id, dict(reply, CommandField=commands.C_ECHO_RSP, Status=0))
        elif message.field == commands.C_FIND_RQ:
            syntax = str(assoc.contexts[message.context_id].transfer_syntax[0])
            self.queries.append(datasets.decode(message.dataset, syntax))
            for match in self.matches:
                assoc.send(message.context_id, dict(reply, CommandField=commands.C_FIND_RSP, Status=0xFF00),
                           datasets.encode(match, syntax))
            final = dict(reply, CommandField=commands.C_FIND_RSP, Status=self.final)
            if self.final not in (0x0000, 0xFF00):
                final["ErrorComment"] = "synthetic failure"
            assoc.send(message.context_id, final)


class Rig:
    """A dicom_scu backend and a fake PACS listening on one MemoryReactorClock."""

    def __init__(self, tmp_path, handler, **options):
        self.reactor = MemoryReactorClock()
        self.handler = handler
        contexts = [build_context(Verification), build_context(StudyRootQueryRetrieveInformationModelFind)]
        settings = AcceptorSettings("PACS", contexts, AcceptorLimits())
        self.reactor.listenTCP(PACS_PORT, AcceptorFactory(settings, handler, self.reactor), interface="127.0.0.1")
        ctx = types.SimpleNamespace(reactor=self.reactor, storage_path=tmp_path, targets=lambda: [],
                                    config=types.SimpleNamespace(targets={}))
        self.backend = build(DicomScuBackend, {"aet": "PACS", "host": "127.0.0.1", "port": PACS_PORT, **options},
                             name="pacs", ctx=ctx)
        self.wires = Wires(self.reactor)

    def run(self, d):
        """Complete the connections the backend opened and move bytes until *d* fires."""
        return self.wires.run(d)


def _match(patient_id):
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientID = patient_id
    ds.StudyInstanceUID = f"1.2.826.0.1.3680043.10.543.{patient_id[-1]}"
    return ds


def _find(**identifier):
    return request("POST", metadata={"dimse_op": "C-FIND", "query_level": "STUDY"},
                   normalized={"00100020": {"vr": "LO", "Value": [identifier.get("PatientID", "*")]},
                               "0020000D": {"vr": "UI"}})


def test_c_echo_over_a_pooled_association(tmp_path):
    rig = Rig(tmp_path, FakePacsHandler())
    response = result_of(rig.run(rig.backend.send(request(metadata={"dimse_op": "C-ECHO"}))))
    assert response.status == 200 and response.metadata["dimse_status"] == "0x0000"
    again = result_of(rig.run(rig.backend.send(request(metadata={"dimse_op": "C-ECHO"}))))
    assert again.metadata["dimse_status"] == "0x0000"
    assert rig.handler.associations == 1  # the idle association was reused


def test_c_find_streams_each_match_as_it_arrives(tmp_path):
    rig = Rig(tmp_path, FakePacsHandler([_match("SYN-1"), _match("SYN-2")]))
    response = result_of(rig.run(rig.backend.send(_find(PatientID="SYN-*"))))
    assert response.status == 200
    assert response.header("content-type") == "application/dicom+json"
    found = result_of(response.state.dicom_results.collect())
    assert [ds.PatientID for ds in found] == ["SYN-1", "SYN-2"]
    assert response.state.dicom_results.status == 0x0000
    sent = rig.handler.queries[0]
    assert sent.PatientID == "SYN-*" and sent.QueryRetrieveLevel == "STUDY"


def test_a_failed_c_find_without_matches_is_an_http_error_with_the_status(tmp_path):
    rig = Rig(tmp_path, FakePacsHandler(final=0xA700))
    response = result_of(rig.run(rig.backend.send(_find())))
    doc = json.loads(response.body)
    assert response.status >= 500 and doc["dimse_status"] == 0xA700 and doc["error_comment"] == "synthetic failure"
    assert response.metadata["dimse_status"] == "0xA700"


def test_an_unknown_called_aet_is_a_rejected_association(tmp_path):
    rig = Rig(tmp_path, FakePacsHandler())
    rig.backend.target_pool.targets[0].aet = "NOT_PACS"
    error = failure_of(rig.run(rig.backend.send(request(metadata={"dimse_op": "C-ECHO"}))), HarmonyError)
    assert error.status in (502, 503)


def test_parse_takes_metadata_or_a_json_body(tmp_path):
    rig = Rig(tmp_path, FakePacsHandler())
    body = request(normalized={"dimse_op": "C-FIND", "query_level": "patient",
                               "identifier": {"00100020": {"vr": "LO", "Value": ["Ωμέγα*"]}}})
    op, identifier, level, model = rig.backend.parse(body)
    assert (op, level, model) == ("C-FIND", "PATIENT", "study")
    assert identifier.SpecificCharacterSet == "ISO_IR 192"  # non-ASCII text declares UTF-8


@pytest.mark.parametrize("metadata, message", [
    ({}, "dimse_op must be one of"),
    ({"dimse_op": "C-FIND", "query_model": "worklist"}, "query_model"),
    ({"dimse_op": "C-FIND", "query_level": "FRAME"}, "query level"),
])
def test_a_request_the_backend_cannot_send_is_a_bad_request(tmp_path, metadata, message):
    rig = Rig(tmp_path, FakePacsHandler())
    error = failure_of(rig.backend.send(request(metadata=dict(metadata), normalized={})), BadRequest)
    assert message in str(error)
    assert rig.reactor.tcpClients == []  # refused before any association


@pytest.mark.parametrize("options, key", [
    ({"dimse_retrieve_mode": "move"}, "incoming_store_port"),
    ({"max_pdu_size": -1}, "max_pdu_size"),
    ({"local_aet": "WAY_TOO_LONG_FOR_AN_AE_TITLE"}, "local_aet"),
])
def test_option_errors_name_their_key(tmp_path, options, key):
    with pytest.raises(OptionError) as e:
        Rig(tmp_path, FakePacsHandler(), **options)
    assert e.value.key == key


def test_no_pacs_at_all_is_refused_naming_aet(tmp_path):
    ctx = types.SimpleNamespace(reactor=MemoryReactorClock(), storage_path=tmp_path, targets=lambda: [],
                                config=types.SimpleNamespace(targets={}))
    with pytest.raises(OptionError) as e:
        build(DicomScuBackend, {}, ctx=ctx)
    assert e.value.key == "aet"


def test_an_early_listener_has_every_match_before_the_pipeline_answers(tmp_path):
    rig = Rig(tmp_path, FakePacsHandler([_match("SYN-1"), _match("SYN-2")]))
    events = []
    req = _find(PatientID="SYN-*")

    def listener(stream):
        stream.listen(lambda item: events.append(item.PatientID)).addCallback(lambda _: events.append("end"))
    req.state.dicom.results_listener = listener
    d = rig.backend.send(req)
    d.addCallback(lambda response: events.append(("answer", response.status)))
    rig.run(d)
    # The verdict (and so the pipeline's answer) follows the matches and the end it was sent with.
    assert events == ["SYN-1", "SYN-2", "end", ("answer", 200)]


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])
def test_an_early_listener_in_the_pacs_syntax_has_each_match_as_the_bytes_the_pacs_sent(tmp_path, syntax):
    """A listener that relays in the syntax the C-FIND ran in takes each match as the PACS's
    bytes (no Dataset made); the pipeline's answer then carries no body (nobody reads one)."""
    rig = Rig(tmp_path, FakePacsHandler([_match("SYN-1"), _match("SYN-2")]))
    req = _find(PatientID="SYN-*")
    req.metadata["dimse_transfer_syntax"] = syntax
    encoded, items = [], []
    req.state.dicom.results_listener = lambda stream: stream.listen(items.append, (syntax, encoded.append))
    response = result_of(rig.run(rig.backend.send(req)))
    assert items == []
    assert [datasets.decode(data, syntax).PatientID for data in encoded] == ["SYN-1", "SYN-2"]
    assert all(type(data) is bytes for data in encoded)
    assert response.status == 200 and response.body == b"" and response.state.dicom_results.status == 0x0000


def test_a_failure_without_matches_is_still_the_pipelines_error_with_an_early_listener(tmp_path):
    rig = Rig(tmp_path, FakePacsHandler([], final=0xA700))
    req = _find()
    req.state.dicom.results_listener = lambda stream: stream.listen(lambda item: None)
    response = result_of(rig.run(rig.backend.send(req)))
    assert response.status != 200 and json.loads(response.body)["dimse_status"] == 0xA700


class AbortingPacsHandler(FakePacsHandler):
    """Aborts an association at its C-FIND number *abort_from* (1: every C-FIND; 2: one reused)."""

    def __init__(self, matches=(), abort_from=2):
        super().__init__(matches)
        self.abort_from = abort_from
        self.finds: dict = {}

    def on_request(self, assoc, message):
        if message.field == commands.C_FIND_RQ:
            self.finds[id(assoc)] = self.finds.get(id(assoc), 0) + 1
            if self.finds[id(assoc)] >= self.abort_from:
                assoc.abort()
                return
        super().on_request(assoc, message)


def test_a_pooled_association_the_pacs_dropped_is_replaced_once_by_a_fresh_one(tmp_path):
    rig = Rig(tmp_path, AbortingPacsHandler([_match("SYN-1")], abort_from=2))
    first = result_of(rig.run(rig.backend.send(_find())))
    assert [ds.PatientID for ds in result_of(first.state.dicom_results.collect())] == ["SYN-1"]
    # The idle association is taken (plain callbacks), the PACS aborts it: a fresh one answers.
    again = result_of(rig.run(rig.backend.send(_find())))
    assert [ds.PatientID for ds in result_of(again.state.dicom_results.collect())] == ["SYN-1"]
    assert rig.handler.associations == 2 and rig.backend.pool.limit.free == rig.backend.pool.limit.limit


def test_a_fresh_association_that_fails_too_is_the_pipelines_error_and_frees_its_slot(tmp_path):
    rig = Rig(tmp_path, AbortingPacsHandler([_match("SYN-1")], abort_from=1))
    failure_of(rig.run(rig.backend.send(_find())), HarmonyError)    # a fresh one: no second try
    assert rig.handler.associations == 1
    rig.handler.abort_from = 2
    result_of(rig.run(rig.backend.send(_find())))                   # pooled for the next one
    rig.handler.abort_from = 1
    failure_of(rig.run(rig.backend.send(_find())), HarmonyError)    # reused, then fresh: both aborted
    assert rig.handler.associations == 3 and rig.backend.pool.limit.free == rig.backend.pool.limit.limit


def test_a_retrieve_given_up_before_its_answer_releases_what_still_arrives(tmp_path):
    """The pipeline is cancelled before the first instance (its client left): C-CANCEL is
    asked for, and an instance the PACS sends after it is released, not queued in a
    stream no one will read (it was: in memory or staging for good)."""
    job = Job(C_GET, request("GET", metadata={"dimse_op": C_GET}))
    job.ready.cancel()
    failure_of(job.ready, defer.CancelledError)
    assert job.cancel_requested.called and job.stream.cancelled
    late = tmp_path / "late.dcm"
    late.write_bytes(b"DICM")
    job.put(DicomInstance(late, owned=True, size=4))
    job.finish(dimse.CANCEL)
    assert not late.exists() and not job.stream._items and job.stream.queued_bytes == 0


def test_slots_are_taken_without_a_deferred_and_passed_on_in_order():
    slots = Slots(2)
    assert slots.take() and slots.take() and not slots.take()
    first, second = slots.wait(), slots.wait()
    second.cancel()                       # a caller that gave up leaves the line
    second.addErrback(lambda f: None)
    slots.release()
    assert first.called and not slots.take()   # the freed slot went to the one waiting
    slots.release()
    slots.release()
    assert slots.free == 2


def test_gathering_file_writes_big_fragments_as_they_are_and_gathers_small_ones(tmp_path, monkeypatch):
    """Staged instances are written with writev of the received fragments: one write per
    GATHER_BYTES held (small PDUs gathered), a short write carried on, the bytes in order."""
    import os

    from harmony.backends import dicom_scu
    real, writes = os.writev, []

    def counted(fd, buffers):
        writes.append(sum(memoryview(b).nbytes for b in buffers))
        return real(fd, buffers)

    monkeypatch.setattr(os, "writev", counted)
    path = tmp_path / "i.dcm"
    f = dicom_scu.GatheringFile(path)
    small = [bytes([n % 256]) * 1000 for n in range(300)]     # 300 KB in 1 KB fragments
    big = os.urandom(300_000)
    for frag in small:
        f.write(memoryview(frag))
    f.write(big)
    f.close()
    assert path.read_bytes() == b"".join(small) + big
    assert writes == [263_000, 37_000 + 300_000]              # 263 KB >= GATHER_BYTES, then the rest with big

    def short(fd, buffers):                                   # the kernel takes half of the first buffer
        first = memoryview(buffers[0])
        return real(fd, [first[:max(1, first.nbytes // 2)]])

    monkeypatch.setattr(os, "writev", short)
    f = dicom_scu.GatheringFile(path)
    f.write(big)
    f.write(memoryview(b"tail"))
    f.close()
    assert path.read_bytes() == big + b"tail"


def test_memory_file_holds_fragments_and_spills_past_its_cap(tmp_path):
    from harmony.backends.dicom_scu import MemoryFile
    data = bytes(range(256)) * 40
    held = MemoryFile(tmp_path / "a.dcm", spill_at=len(data) * 3)
    for _ in range(3):
        held.write(memoryview(data))
    held.close()
    assert held.in_memory and held.size == 3 * len(data) and b"".join(held.buffers) == data * 3
    assert not (tmp_path / "a.dcm").exists()
    spilt = MemoryFile(tmp_path / "b.dcm", spill_at=len(data) * 2)
    for _ in range(4):
        spilt.write(memoryview(data))
    spilt.close()
    assert not spilt.in_memory and spilt.buffers is None
    assert (tmp_path / "b.dcm").read_bytes() == data * 4
