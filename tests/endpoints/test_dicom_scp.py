"""harmony.endpoints.dicom_scp in memory: the DIMSE listener on a MemoryReactorClock, a client
association made with Harmony's own requestor (harmony.dicom.ul.requestor) and joined to it by
tests.memory.Wires, and the pipeline run for real.  C-ECHO, a C-FIND whose matches stream back as
pending responses, failures as DIMSE statuses, refusals of what is not enabled or not allowed.
C-STORE data sets held in memory or spilled to a staging file (``SpoolingSink``).  (C-STORE writes
through the DICOM thread pool: that is the real-peer tier's, tests/endpoints/test_dicom_scp_peers.py.)"""

from __future__ import annotations

import gc
import types

import pytest
from pydicom.dataset import Dataset
from pynetdicom import build_context
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from harmony.backends.dicom_scu import QUERY, DicomScuBackend
from harmony.config.errors import OptionError
from harmony.dicom import status as dimse
from harmony.dicom.results import ResultStream
from harmony.dicom.ul import commands, datasets
from harmony.dicom.ul.acceptor import AcceptorFactory, AcceptorLimits, AcceptorSettings
from harmony.dicom.ul.association import AssociationRejected
from harmony.dicom.ul.requestor import RequestorSettings, associate
from harmony.endpoints.dicom_scp import Deadlines, DicomScpEndpoint
from harmony.envelope import ResponseEnvelope
from harmony.errors import BackendUnavailable
from harmony.middleware.base import Middleware
from harmony.pipeline import Pipeline
from harmony.state import ResponseState
from tests.backends.test_dicom_scu import FakePacsHandler
from tests.memory import Answering, Wires, build, failure_of, result_of

PORT = 11112
FIND = StudyRootQueryRetrieveInformationModelFind


def _match(patient_id):
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientID = patient_id
    return ds


def _answer_with(matches, final=dimse.SUCCESS):
    def respond(request):
        stream = ResultStream()
        for m in matches:
            stream.put(m)
        stream.finish(final, None if final == dimse.SUCCESS else "synthetic")
        return ResponseEnvelope(status=200, state=ResponseState(dicom_results=stream))
    return respond


class Rig:
    def __init__(self, respond=None, **options):
        self.reactor = MemoryReactorClock()
        ctx = types.SimpleNamespace(reactor=self.reactor, storage_path=None)
        self.endpoint = build(DicomScpEndpoint, {"local_aet": "HARMONY", "port": PORT, "bind_addr": "127.0.0.1",
                                                 "enable_find": True, **options}, name="scp", ctx=ctx)
        self.backend = Answering(respond or _answer_with([]))
        self.endpoint.pipeline = Pipeline("dimse", [], [self.backend])
        self.endpoint.startService()
        self.wires = Wires(self.reactor)

    def associate(self, calling="MODALITY", called="HARMONY", contexts=(Verification, FIND)):
        d = defer.ensureDeferred(associate(self.reactor, "127.0.0.1", PORT, RequestorSettings(local_aet=calling),
                                           called, [build_context(c) for c in contexts]))
        return self.wires.run(d)

    def request(self, assoc, sop_class, command, dataset=None):
        cid = next(i for i, cx in assoc.contexts.items() if str(cx.abstract_syntax) == str(sop_class))
        pending = []
        syntax = str(assoc.contexts[cid].transfer_syntax[0])  # the syntax negotiated for this context
        d = assoc.request(cid, dict(command, AffectedSOPClassUID=str(sop_class)),
                          dataset if dataset is None else datasets.encode(dataset, syntax),
                          on_pending=pending.append)
        final = result_of(self.wires.run(d))
        return final, pending


def test_c_echo():
    rig = Rig()
    assoc = result_of(rig.associate())
    final, _ = rig.request(assoc, Verification, {"CommandField": commands.C_ECHO_RQ})
    assert final.command["Status"] == dimse.SUCCESS
    assert rig.backend.requests == []  # an echo is the listener's own answer


def test_c_find_matches_stream_back_as_pending_responses():
    rig = Rig(_answer_with([_match("SYN-1"), _match("SYN-2")]))
    assoc = result_of(rig.associate())
    query = _match("SYN-*")
    final, pending = rig.request(assoc, FIND, {"CommandField": commands.C_FIND_RQ, "Priority": 0}, query)
    assert final.command["Status"] == dimse.SUCCESS
    assert [p.command["Status"] for p in pending] == [dimse.PENDING, dimse.PENDING]
    syntax = str(next(iter(assoc.contexts.values())).transfer_syntax[0])
    assert [datasets.decode(p.dataset, syntax).PatientID for p in pending] == ["SYN-1", "SYN-2"]
    request = rig.backend.requests[0]
    assert request.metadata["dimse_op"] == "C-FIND" and request.metadata["calling_aet"] == "MODALITY"
    assert request.metadata["query_level"] == "STUDY" and request.normalized["00100020"]["Value"] == ["SYN-*"]


def test_without_middleware_the_identifiers_json_is_made_only_when_read():
    seen = []

    def respond(request):
        seen.append((request.normalized_read(), request.metadata))
        return _answer_with([])(request)
    rig = Rig(respond)
    assoc = result_of(rig.associate())
    for patient_id in ("SYN-1", "SYN-2"):
        final, _ = rig.request(assoc, FIND, {"CommandField": commands.C_FIND_RQ, "Priority": 0}, _match(patient_id))
        assert final.command["Status"] == dimse.SUCCESS
    (read_first, first), (read_second, second) = seen
    assert not read_first and not read_second    # nothing read it on the way to the backend
    # The association's fixed metadata is shared, each request's own copy of it is not.
    assert first is not second and first["request_id"] != second["request_id"]
    assert first["query_level"] == second["query_level"] == "STUDY" and second["calling_aet"] == "MODALITY"
    assert rig.backend.requests[1].normalized["00100020"]["Value"] == ["SYN-2"]    # made once read

    rig.endpoint.pipeline = Pipeline("dimse", [Middleware("mw")], [rig.backend])   # middleware reads it
    final, _ = rig.request(assoc, FIND, {"CommandField": commands.C_FIND_RQ, "Priority": 0}, _match("SYN-3"))
    assert final.command["Status"] == dimse.SUCCESS and seen[-1][0] is True


@pytest.mark.filterwarnings("ignore::UserWarning")   # pydicom's, about the value
def test_an_identifier_that_cannot_be_decoded_is_refused_before_the_pipeline():
    rig = Rig(_answer_with([_match("SYN-1")]))
    assoc = result_of(rig.associate())
    cid = next(i for i, cx in assoc.contexts.items() if str(cx.abstract_syntax) == str(FIND))
    not_a_number = b"\x20\x00\x13\x00\x03\x00\x00\x00abc"   # Instance Number (IS) "abc"
    d = assoc.request(cid, {"CommandField": commands.C_FIND_RQ, "Priority": 0, "AffectedSOPClassUID": str(FIND)},
                      not_a_number)
    final = result_of(rig.wires.run(d))
    assert final.command["Status"] == dimse.IDENTIFIER_MISMATCH and rig.backend.requests == []


PACS_PORT = 11113


def _proxied(tmp_path, middleware=()):
    """A Rig whose pipeline is a real dicom_scu backend before a PACS (Harmony's own acceptor with
    tests/backends/test_dicom_scu.py's handler), on the same MemoryReactorClock."""
    rig = Rig()
    contexts = [build_context(Verification), build_context(FIND)]
    rig.reactor.listenTCP(PACS_PORT, AcceptorFactory(AcceptorSettings("PACS", contexts, AcceptorLimits()),
                                                     FakePacsHandler([_match("SYN-1"), _match("SYN-2")]),
                                                     rig.reactor), interface="127.0.0.1")
    ctx = types.SimpleNamespace(reactor=rig.reactor, storage_path=tmp_path, targets=lambda: [],
                                config=types.SimpleNamespace(targets={}))
    backend = build(DicomScuBackend, {"aet": "PACS", "host": "127.0.0.1", "port": PACS_PORT}, name="pacs", ctx=ctx)
    rig.endpoint.pipeline = Pipeline("dimse", list(middleware), [backend])
    return rig


@pytest.mark.parametrize("middleware", [(), (Middleware("mw"),)], ids=["early-relay", "middleware"])
def test_a_proxied_c_find_leaves_no_cyclic_garbage(tmp_path, middleware):
    """What a proxied C-FIND makes (its operation, envelope, dicom_scu job, stream, Deferreds ...) is
    freed by reference counting when it ends: kept in cycles, it was left to the garbage collector,
    whose young collections then stopped the reactor ~19-25 ms every ~400 C-FINDs (bench/dimse)."""
    rig = _proxied(tmp_path, middleware)
    assoc = result_of(rig.associate())

    def find():
        final, pending = rig.request(assoc, FIND, {"CommandField": commands.C_FIND_RQ, "Priority": 0},
                                     _match("SYN-*"))
        return final.command["Status"], len(pending)

    assert find() == (dimse.SUCCESS, 2)   # the PACS association, caches and templates made
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            assert find() == (dimse.SUCCESS, 2)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = sorted({type(o).__qualname__ for o in gc.garbage if type(o).__module__.startswith("harmony")})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if enabled:
            gc.enable()
    assert left == []


def _pacs_factory(rig):
    return next(factory for port, factory, *_ in rig.reactor.tcpServers if port == PACS_PORT)


def _pooled(backend):
    """The dicom_scu backend's idle query associations."""
    return [assoc for (_target, kind), idle in backend.pool.idle.items() if kind == QUERY for assoc, _since in idle]


@pytest.mark.parametrize("middleware", [(), (Middleware("mw"),)], ids=["ahead", "middleware"])
def test_a_proxied_c_find_goes_to_the_pacs_before_the_pipeline_runs(tmp_path, middleware):
    """With no middleware and one dicom_scu backend, a C-FIND on a pooled association is sent
    before the envelope, pipeline and target pool run (dicom_scu.FindAhead: that work then
    overlaps the PACS's; bench/dimse, "C-FIND, eighth pass"); the pipeline's attempt takes
    the request over -- the target counted and judged, matches and statuses as before.
    With middleware the pipeline decides first, as before."""
    rig = _proxied(tmp_path, middleware)
    backend = rig.endpoint.pipeline.backends[0]
    pacs = _pacs_factory(rig).handler
    assoc = result_of(rig.associate())
    query = {"CommandField": commands.C_FIND_RQ, "Priority": 0}
    final, pending = rig.request(assoc, FIND, query, _match("SYN-*"))   # the first connects: the usual way
    assert final.command["Status"] == dimse.SUCCESS and len(pending) == 2
    (pooled,) = _pooled(backend)
    at_handle = []
    handle = rig.endpoint.pipeline.handle

    def handled(env, endpoint):
        at_handle.append((len(pooled._pending), _pooled(backend) == [], backend.pool.limit.free))
        return handle(env, endpoint)
    rig.endpoint.pipeline.handle = handled
    target = backend.target_pool.targets[0]
    requests = target.requests_total
    syntax = str(next(iter(assoc.contexts.values())).transfer_syntax[0])
    for patient_id in ("SYN-1", "SYN-2"):
        final, pending = rig.request(assoc, FIND, query, _match(patient_id))
        assert final.command["Status"] == dimse.SUCCESS
        assert [datasets.decode(p.dataset, syntax).PatientID for p in pending] == ["SYN-1", "SYN-2"]
    limit = backend.pool.limit.limit
    if middleware:
        assert at_handle == [(0, False, limit)] * 2
    else:
        assert at_handle == [(1, True, limit - 1)] * 2   # out already, on the pooled association, its slot held
    assert [q.PatientID for q in pacs.queries] == ["SYN-*", "SYN-1", "SYN-2"]
    assert _pooled(backend) == [pooled] and backend.pool.limit.free == limit   # given back after each
    assert target.requests_total == requests + 2 and target.in_flight == 0   # counted, then judged


class _CancelSeen(FakePacsHandler):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.cancels = []

    def on_request(self, assoc, message):
        if message.field == commands.C_CANCEL_RQ:
            self.cancels.append(message.command["MessageIDBeingRespondedTo"])
            return None   # answered in full already
        return super().on_request(assoc, message)


def test_a_c_find_sent_ahead_that_the_pipeline_does_not_take_over_is_cancelled(tmp_path, monkeypatch):
    """The pipeline failed (or went elsewhere) before its attempt took the C-FIND sent ahead
    over: the PACS is sent a C-CANCEL, what it still answers is dropped, the association and
    its slot go back to the pool, and the client gets the pipeline's failure as before."""
    rig = _proxied(tmp_path)
    backend = rig.endpoint.pipeline.backends[0]
    _pacs_factory(rig).handler = pacs = _CancelSeen([_match("SYN-1")])
    assoc = result_of(rig.associate())
    query = {"CommandField": commands.C_FIND_RQ, "Priority": 0}
    assert rig.request(assoc, FIND, query, _match("SYN-*"))[0].command["Status"] == dimse.SUCCESS
    (pooled,) = _pooled(backend)
    monkeypatch.setattr(backend, "send", lambda request: defer.fail(BackendUnavailable("went elsewhere")))
    final, pending = rig.request(assoc, FIND, query, _match("SYN-2"))
    assert dimse.is_failure(final.command["Status"]) and pending == []
    assert [q.PatientID for q in pacs.queries] == ["SYN-*", "SYN-2"] and len(pacs.cancels) == 1
    assert _pooled(backend) == [pooled] and backend.pool.limit.free == backend.pool.limit.limit
    monkeypatch.undo()
    final, pending = rig.request(assoc, FIND, query, _match("SYN-3"))   # the association serves on
    assert final.command["Status"] == dimse.SUCCESS and len(pending) == 1 and _pooled(backend) == [pooled]


class _OpenStream:
    """A backend whose C-FIND stream stays open: the test puts, finishes or leaves it silent."""

    def __init__(self, first=()):
        self.stream = None
        self.cancelled = []
        self.first = first

    def __call__(self, request):
        self.stream = ResultStream(on_cancel=lambda: self.cancelled.append(True))
        for m in self.first:
            self.stream.put(m)
        return ResponseEnvelope(status=200, state=ResponseState(dicom_results=self.stream))


def _find(rig, assoc, query):
    cid = next(i for i, cx in assoc.contexts.items() if str(cx.abstract_syntax) == str(FIND))
    pending = []
    d = assoc.request(cid, {"CommandField": commands.C_FIND_RQ, "Priority": 0, "AffectedSOPClassUID": str(FIND)},
                      datasets.encode(query, str(assoc.contexts[cid].transfer_syntax[0])), on_pending=pending.append)
    rig.wires.run(d)
    return cid, d, pending


def test_matches_put_after_the_answer_are_relayed_as_they_come():
    backend = _OpenStream([_match("SYN-1")])
    rig = Rig(backend)
    assoc = result_of(rig.associate())
    _cid, d, pending = _find(rig, assoc, _match("SYN-*"))
    assert len(pending) == 1 and not d.called
    backend.stream.put(_match("SYN-2"))
    backend.stream.put({"00100020": {"vr": "LO", "Value": ["SYN-3"]}})   # a backend answering in DICOM JSON
    backend.stream.finish(dimse.SUCCESS)
    final = result_of(rig.wires.run(d))
    assert final.command["Status"] == dimse.SUCCESS
    syntax = str(next(iter(assoc.contexts.values())).transfer_syntax[0])
    assert [datasets.decode(p.dataset, syntax).PatientID for p in pending] == ["SYN-1", "SYN-2", "SYN-3"]


def test_a_backend_silent_mid_stream_ends_the_c_find_with_a_timeout_status():
    backend = _OpenStream([_match("SYN-1")])
    rig = Rig(backend, request_timeout_secs=5)
    assoc = result_of(rig.associate())
    _cid, d, pending = _find(rig, assoc, _match("SYN-*"))
    rig.reactor.advance(4)
    backend.stream.put(_match("SYN-2"))   # a match restarts the clock
    rig.reactor.advance(4)
    assert not rig.wires.run(d).called and len(pending) == 2
    rig.reactor.advance(2)
    final = result_of(rig.wires.run(d))
    assert final.command["Status"] == dimse.UNABLE_TO_PROCESS_TIMEOUT and backend.cancelled == [True]


def test_c_cancel_mid_stream_stops_the_relay_and_the_backend():
    backend = _OpenStream([_match("SYN-1")])
    rig = Rig(backend)
    assoc = result_of(rig.associate())
    cid, d, pending = _find(rig, assoc, _match("SYN-*"))
    assoc.send(cid, {"CommandField": commands.C_CANCEL_RQ, "MessageIDBeingRespondedTo": 1})
    final = result_of(rig.wires.run(d))
    assert final.command["Status"] == dimse.CANCEL and backend.cancelled == [True]
    backend.stream.put(_match("SYN-2"))   # too late: nobody relays it
    assert len(pending) == 1
    assert not [c for c in rig.reactor.getDelayedCalls() if getattr(c.func, "__name__", "") == "silent"]


@pytest.mark.parametrize("how", ["the client left", "C-CANCEL"])
def test_a_relay_that_gives_up_says_first_whether_its_client_left(how):
    """The target pool decides on a client abort when the stream is abandoned (the relay
    gave up and the backend ended): the relay must have marked the request client-gone
    BEFORE it cancels the stream, whichever noticed the association's end first -- the
    race that made a real getscu killed mid-study count 0 instead of 1.  A C-CANCEL is
    the client's choice, not an abort."""
    from harmony.errors import client_gone

    backend = _OpenStream([_match("SYN-1")])
    rig = Rig(backend)
    assoc = result_of(rig.associate())
    cid, d, pending = _find(rig, assoc, _match("SYN-*"))
    request = rig.backend.requests[0]
    gone_when_cancelled = []
    backend.stream.on_cancel = lambda: gone_when_cancelled.append(client_gone(request))
    decided = []
    backend.stream.when_abandoned().addCallback(lambda _: decided.append(client_gone(request)))
    if how == "C-CANCEL":
        assoc.send(cid, {"CommandField": commands.C_CANCEL_RQ, "MessageIDBeingRespondedTo": 1})
        rig.wires.run(d)
    else:
        assoc.abort()                       # fails the client's C-FIND at once: the wires run until
        rig.wires.run(defer.Deferred())     # quiet, for the listener to read the A-ABORT
    left = how == "the client left"
    assert len(pending) == 1 and gone_when_cancelled == [left] and decided == []
    backend.stream.finish(dimse.CANCEL)   # the PACS's answer to C-CANCEL: only now is it decided
    assert decided == [left]


def test_a_failing_backend_is_a_dimse_failure_status():
    rig = Rig(lambda request: BackendUnavailable("the PACS is down"))
    assoc = result_of(rig.associate())
    final, pending = rig.request(assoc, FIND, {"CommandField": commands.C_FIND_RQ, "Priority": 0}, _match("X"))
    assert pending == [] and dimse.is_failure(final.command["Status"])
    failed = Rig(_answer_with([], final=0xA700))
    assoc = result_of(failed.associate())
    final, _ = failed.request(assoc, FIND, {"CommandField": commands.C_FIND_RQ, "Priority": 0}, _match("X"))
    assert final.command["Status"] == 0xA700


def test_what_is_not_enabled_is_refused():
    rig = Rig(enable_find=False)
    assoc = result_of(rig.associate(contexts=(Verification, FIND)))
    accepted = {str(cx.abstract_syntax) for cx in assoc.contexts.values()}
    assert str(Verification) in accepted and str(FIND) not in accepted  # C-FIND is not even negotiated
    assert rig.backend.requests == []


def test_a_calling_aet_not_allowed_is_rejected():
    rig = Rig(allowed_calling_aets=["CT_ONE"])
    failure_of(rig.associate(calling="INTRUDER"), AssociationRejected)
    assert result_of(rig.associate(calling="CT_ONE")).calling_aet == "CT_ONE"
    failure_of(rig.associate(called="SOMEONE_ELSE"), AssociationRejected)


@pytest.mark.parametrize("options, key", [
    ({"local_aet": "WAY_TOO_LONG_FOR_AN_AE"}, "local_aet"),
    ({"max_associations": 0}, "max_associations"),
    ({"move_destinations": {"ORTHANC": "not-a-host-port"}}, "move_destinations"),
])
def test_option_errors_name_their_key(options, key):
    with pytest.raises(OptionError) as e:
        build(DicomScpEndpoint, {"local_aet": "HARMONY", **options},
              ctx=types.SimpleNamespace(reactor=MemoryReactorClock(), storage_path=None))
    assert e.value.key.startswith(key)


def test_a_pipeline_that_never_answers_ends_the_c_find_on_the_listeners_one_timer():
    rig = Rig(lambda request: defer.Deferred(), request_timeout_secs=5)
    assoc = result_of(rig.associate())
    idle = len(rig.reactor.getDelayedCalls())
    _cid, d, pending = _find(rig, assoc, _match("SYN-*"))
    _cid, d2, _ = _find(rig, assoc, _match("SYN-*"))   # a second one waits behind the first
    # The listener's deadlines share one timer, the client's requests theirs: no callLater per operation.
    assert len(rig.reactor.getDelayedCalls()) == idle + 2
    rig.reactor.advance(4.9)
    assert not rig.wires.run(d).called
    rig.reactor.advance(0.2)
    final = result_of(rig.wires.run(d))
    assert final.command["Status"] == dimse.UNABLE_TO_PROCESS_TIMEOUT and pending == []
    rig.reactor.advance(5)
    assert result_of(rig.wires.run(d2)).command["Status"] == dimse.UNABLE_TO_PROCESS_TIMEOUT
    assert len(rig.endpoint.deadlines) == 0


def test_many_answered_c_finds_leave_no_timer_behind():
    rig = Rig(_answer_with([_match("SYN-1")]))
    assoc = result_of(rig.associate())
    _find(rig, assoc, _match("SYN-*"))
    after_one = len(rig.reactor.getDelayedCalls())
    for _ in range(20):
        _cid, d, pending = _find(rig, assoc, _match("SYN-*"))
        assert result_of(d).command["Status"] == dimse.SUCCESS and len(pending) == 1
    assert len(rig.reactor.getDelayedCalls()) == after_one and len(rig.endpoint.deadlines) == 0


class _EarlyStream:
    """A backend like dicom_scu: it hands its stream to ``state.dicom.results_listener`` once the
    request is out, and answers the pipeline only when the test says (after the first match)."""

    def __init__(self):
        self.stream = ResultStream()
        self.answer: defer.Deferred = defer.Deferred()
        self.listened = []

    def __call__(self, request):
        listener = request.state.dicom.results_listener
        self.listened.append(listener is not None)
        if listener is not None:
            listener(self.stream)
        return self.answer

    def respond(self):
        self.answer.callback(ResponseEnvelope(status=200, state=ResponseState(dicom_results=self.stream)))


def test_without_middleware_matches_and_the_final_response_do_not_wait_for_the_pipelines_answer():
    backend = _EarlyStream()
    rig = Rig(backend)
    assoc = result_of(rig.associate())
    _cid, d, pending = _find(rig, assoc, _match("SYN-*"))
    backend.stream.put(_match("SYN-1"))
    backend.stream.put(_match("SYN-2"))
    backend.stream.finish(dimse.SUCCESS)
    final = result_of(rig.wires.run(d))   # the pipeline has not answered yet
    assert final.command["Status"] == dimse.SUCCESS and len(pending) == 2 and backend.listened == [True]
    backend.respond()   # the answer that follows changes nothing: one final response, no error
    rig.wires.run(defer.succeed(None))
    assert not rig.endpoint.services.running and len(pending) == 2


def test_an_early_stream_the_pipeline_answers_otherwise_is_dropped():
    backend = _EarlyStream()
    rig = Rig(backend)
    assoc = result_of(rig.associate())
    _cid, d, pending = _find(rig, assoc, _match("SYN-*"))
    backend.answer.callback(ResponseEnvelope(status=502))   # e.g. the target pool gave up: no stream
    final = result_of(rig.wires.run(d))
    assert dimse.is_failure(final.command["Status"]) and pending == []
    backend.stream.put(_match("SYN-1"))   # nobody relays it any more
    assert pending == [] and len(rig.endpoint.deadlines) == 0


def test_middleware_sees_the_results_first_so_nothing_is_relayed_early():
    backend = _EarlyStream()
    rig = Rig(backend)
    rig.endpoint.pipeline = Pipeline("dimse", [Middleware("mw")], [rig.backend])
    assoc = result_of(rig.associate())
    _cid, d, pending = _find(rig, assoc, _match("SYN-*"))
    backend.stream.put(_match("SYN-1"))
    assert pending == [] and backend.listened == [False]
    backend.stream.finish(dimse.SUCCESS)
    backend.respond()
    final = result_of(rig.wires.run(d))
    assert final.command["Status"] == dimse.SUCCESS and len(pending) == 1


def test_deadlines_share_one_timer_and_expire_what_was_not_moved_on():
    clock = Clock()
    deadlines = Deadlines(clock)
    expired = []
    for key in range(50):
        deadlines.set(key, 10, lambda key=key: expired.append(key))
    assert len(clock.getDelayedCalls()) == 1
    for key in range(1, 50):
        deadlines.drop(key)
    clock.advance(5)
    deadlines.set("late", 10, lambda: expired.append("late"))
    deadlines.move(0, 10)          # activity at t=5: now due at 15
    clock.advance(5)
    assert expired == [] and len(clock.getDelayedCalls()) == 1
    clock.advance(5)
    assert expired == [0, "late"] and not clock.getDelayedCalls() and len(deadlines) == 0
    deadlines.set("short", 1, lambda: expired.append("short"))
    deadlines.set("shorter", 0.5, lambda: expired.append("shorter"))
    clock.advance(0.5)
    assert expired[-1] == "shorter"
    clock.advance(1)
    # Moved on with the timeout it was set with, a deadline only moves later (the timer is not
    # looked at); moved with a shorter one, the timer is brought forward.
    deadlines.set("a", 10, lambda: expired.append("a"))
    clock.advance(1)
    deadlines.move("a", 2)          # sooner than the timer is set for
    clock.advance(2)
    assert expired[-1] == "a"
    deadlines.set("b", 10, lambda: expired.append("b"))
    clock.advance(5)
    deadlines.move("b", 10)
    clock.advance(9)
    assert expired[-1] == "a"
    clock.advance(1)
    assert expired[-1] == "b" and len(deadlines) == 0 and not clock.getDelayedCalls()


# ---------------------------------------------------------------------- C-STORE data sets held in memory


class _Staging:
    """What a SpoolingSink asks of its ScpServices: a staging file when it spills
    (real files in *folder*), and the endpoint's name for its log line."""

    def __init__(self, folder, fail=False):
        self.folder = folder
        self.fail = fail
        self.made: list = []
        self.endpoint = types.SimpleNamespace(name="scp")

    def _staged_file(self):
        if self.fail:
            raise OSError(28, "No space left on device")
        path = self.folder / f"{len(self.made)}.dcm"
        self.made.append(path)
        return path, open(path, "wb")


def _store_command(sop="1.2.826.0.1.3680043.10.1442.71.1.1"):
    return {"AffectedSOPClassUID": "1.2.840.10008.5.1.4.1.1.7", "AffectedSOPInstanceUID": sop}


def _data_set(size: int) -> bytes:
    """A little-endian explicit VR data set: Study and Series Instance UIDs, then *size* bytes of OB."""
    ds = Dataset()
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.1442.71.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.1442.71.1.1"
    ds.add_new(0x00091010, "OB", b"\1" * size)   # private: stands in for pixel data
    return datasets.encode(ds, "1.2.840.10008.1.2.1")


def _part_ten_file(tmp_path, data: bytes, fragment: int):
    """The file a PartTenSink writes for *data*: what held in memory must equal."""
    path = tmp_path / "reference.dcm"
    sink = datasets.PartTenSink(path, _store_command(), "1.2.840.10008.1.2.1", 1 << 30, source_aet="SCU")
    for i in range(0, len(data), fragment):
        sink.write(data[i:i + fragment])
    sink.close()
    return path.read_bytes(), sink.described


def test_a_small_c_store_data_set_is_held_in_memory_as_the_file_it_would_have_been(tmp_path):
    from harmony.endpoints.dicom_scp import InMemory, SpoolingSink
    data = _data_set(9000)
    staging = _Staging(tmp_path)
    sink = SpoolingSink(staging, _store_command(), "1.2.840.10008.1.2.1", 1 << 30, "SCU")
    for i in range(0, len(data), 4000):
        sink.write(data[i:i + 4000])
    held = sink.close()
    assert isinstance(held, InMemory) and staging.made == []   # nothing staged
    expected, described = _part_ten_file(tmp_path, data, 4000)
    assert b"".join(held.data) == expected
    assert sink.described == described == ("1.2.826.0.1.3680043.10.1442.71.1", "1.2.826.0.1.3680043.10.1442.71.1.1")
    assert sink.meta_length + sink.received == len(expected)


def test_a_c_store_data_set_over_the_memory_size_goes_on_in_a_staging_file(tmp_path):
    from harmony.endpoints.dicom_scp import IN_MEMORY_BYTES, SpoolingSink
    data = _data_set(IN_MEMORY_BYTES + 50_000)
    staging = _Staging(tmp_path)
    sink = SpoolingSink(staging, _store_command(), "1.2.840.10008.1.2.1", 1 << 30, "SCU")
    for i in range(0, len(data), 16_000):
        sink.write(data[i:i + 16_000])
    path = sink.close()
    assert staging.made == [path]
    expected, described = _part_ten_file(tmp_path, data, 16_000)
    assert path.read_bytes() == expected
    assert sink.described == described and sink.received == len(data)


def test_a_c_store_data_set_over_the_limit_is_refused_in_memory_too(tmp_path):
    from harmony.dicom.ul.pdu import PDUError
    from harmony.endpoints.dicom_scp import SpoolingSink
    sink = SpoolingSink(_Staging(tmp_path), _store_command(), "1.2.840.10008.1.2.1", 5000, "SCU")
    sink.write(b"\0" * 4000)
    with pytest.raises(PDUError):
        sink.write(b"\0" * 2000)


def test_a_spill_that_cannot_be_staged_reads_the_rest_and_is_refused(tmp_path):
    from harmony.endpoints.dicom_scp import IN_MEMORY_BYTES, SpoolingSink
    sink = SpoolingSink(_Staging(tmp_path, fail=True), _store_command(), "1.2.840.10008.1.2.1", 1 << 30, "SCU")
    for _ in range(IN_MEMORY_BYTES // 16_000 + 3):
        sink.write(b"\0" * 16_000)
    assert sink.close() is None   # on_store answers 0xA700 "cannot write to storage"
    assert list(tmp_path.iterdir()) == []
