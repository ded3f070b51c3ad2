"""``deidentify`` middleware: DICOM PS3.15 de-identification on every DICOM path of a pipeline.

Why a middleware working on the DICOM result contract rather than on each
protocol: placed right of the ``dicomweb_bridge`` / ``jmix_builder`` and left of
a DICOM backend, it sees

- C-STORE requests (from ``dicom_scp``, or STOW-RS parts turned into C-STOREs by
  the bridge): the instance is de-identified before the backend gets it, so a
  ``store_forward`` backend stores and forwards only the de-identified copy, and
  a ``dicom_scu`` backend sends only it;
- C-FIND answers (``ResultStream`` of datasets): the identifiers are replaced
  with exactly the values the instances get, so QIDO-RS answers built from them
  match what WADO-RS returns;
- C-GET / C-MOVE answers (``ResultStream`` of Part-10 files): each instance is
  de-identified off the reactor as it arrives, so WADO-RS multipart answers,
  metadata, frames and JMIX envelopes are all built from de-identified files.
  The next one is taken from the backend only while the de-identified copies
  waiting for the client stay under the backend's staging limit
  (``dicom_scu``'s ``max_staged_mb``): a client that reads slowly holds the
  PACS back through here as it would without this middleware.

Requests coming back with pseudonymous UIDs (a WADO-RS URL taken from a QIDO
answer) are mapped to the originals through the UIDs this middleware has
replaced; query keys that would match on identity (a name, a birth date) are
blanked so a client cannot probe for a person.  Instances that may carry
burned-in identity are quarantined (kept apart, never forwarded) unless a mask
rule cleans them or the policy says to forward them.

    [middleware.deid]
    service = "deidentify"
    [middleware.deid.options]
    secret_file = "secrets/deid.key"        # harmony deidentify --keygen secrets/deid.key
    retain_longitudinal = "modified"        # "no" (default), "full", "modified"
    retain_uids = false                     # ... and every other PS3.15 E.3 option by name
    # lookup_table = "project-ids.csv"      # PatientID,Pseudonym[,PseudonymName]
    # safe_private = ["0029,SIEMENS CSA HEADER,10"]
    # [middleware.deid.options.pixels] suspect = "quarantine" ... mask_rules = [...]
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import sqlite3
import threading
import time
import uuid
from pathlib import Path

from prometheus_client.core import CounterMetricFamily
from pydicom.dataset import Dataset
from twisted.internet import defer, threads
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from harmony.deid import Deidentifier, PixelPolicy, deidentify_file
from harmony.deid.config import build
from harmony.deid.files import QUARANTINED
from harmony.deid.profile import KEEP
from harmony.dicom.files import Staging
from harmony.dicom.render import ResultBodyProducer, release_rest
from harmony.dicom.results import (
    C_FIND,
    C_GET,
    C_MOVE,
    C_STORE,
    OPERATIONS,
    RESULTS_AS,
    BoundedResultStream,
    DicomInstance,
    ResultStream,
)
from harmony.dicom.status import SUCCESS, WARNING_SUBOPS, record
from harmony.envelope import ResponseEnvelope, media_type, read_body
from harmony.errors import BadRequest, PayloadTooLarge
from harmony.log import get_logger
from harmony.middleware.base import Middleware

log = get_logger("harmony.middleware.deidentify")

#: Staged de-identified copies live for one request; anything older is a leftover of a failed one.
STAGED_MAX_AGE_SECS = 3600
STAGING_SWEEP_SECS = 300
#: How many bytes of de-identified instances wait for a slow client when the backend's stream
#: sets no limit of its own (``dicom_scu``'s ``max_staged_mb`` default).
DEFAULT_MAX_QUEUED_BYTES = 128 * 1024 * 1024
_UID_KEYS = ("0020000D", "0020000E", "00080018")
_PATIENT_ID = "00100020"


class ReverseMap:
    """Pseudonym -> original for the UIDs and Patient IDs this middleware has replaced, so requests
    naming pseudonyms (a WADO-RS URL taken from a QIDO answer) reach the originals.

    Kept in a small sqlite file (WAL) beside the quarantine, shared by worker processes and kept
    across restarts, with a bounded in-memory cache in front.  It is a cache of what the secret
    computes anyway: losing it costs a client one query, never consistency; it holds originals,
    so it lives in the middleware's private folder.  Blocking: call it off the reactor.
    """

    def __init__(self, path: Path | None, cache_limit: int = 200_000):
        self.path = path
        self.cache_limit = cache_limit
        self._cache: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._db = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=OFF")  # a cache: a crash loses recent entries, nothing else
            self._db.execute("CREATE TABLE IF NOT EXISTS pseudonyms (pseudonym TEXT PRIMARY KEY, original TEXT)")

    def add(self, original: str, pseudonym: str) -> None:
        with self._lock:
            if pseudonym in self._cache:
                self._cache.move_to_end(pseudonym)
                return
            self._remember(pseudonym, original)
            if self._db is not None:
                self._db.execute("INSERT OR IGNORE INTO pseudonyms VALUES (?, ?)", (pseudonym, original))

    def get(self, pseudonym: str) -> str | None:
        with self._lock:
            found = self._cache.get(pseudonym)
            if found is None and self._db is not None:
                row = self._db.execute("SELECT original FROM pseudonyms WHERE pseudonym = ?", (pseudonym,)).fetchone()
                if row is not None:
                    found = row[0]
                    self._remember(pseudonym, found)
            return found

    def _remember(self, pseudonym: str, original: str) -> None:
        self._cache[pseudonym] = original
        while len(self._cache) > self.cache_limit:
            self._cache.popitem(last=False)

    def __len__(self):
        with self._lock:
            if self._db is not None:
                return self._db.execute("SELECT count(*) FROM pseudonyms").fetchone()[0]
            return len(self._cache)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


class Deidentify(Middleware):
    def __init__(self, name, deid: Deidentifier, policy: PixelPolicy, folder: Path, *, max_body_bytes=1 << 30,
                 backend_data: str = "original"):
        super().__init__(name)
        #: "original": the backend holds identified data, so pseudonyms in requests are mapped back;
        #: "deidentified": it holds what this middleware (same secret) wrote, so they are not.
        self.backend_data = backend_data
        self.deid = deid
        self.policy = policy
        self.folder = Path(folder)
        self.quarantine_dir = self.folder / "quarantine"
        self.staging = Staging(self.folder / "staging")
        self.max_body_bytes = max_body_bytes
        self.reverse = ReverseMap(self.folder / "pseudonyms.sqlite")
        deid.on_uid = self.reverse.add
        self.counts: collections.Counter[str] = collections.Counter()
        self._swept = 0.0

    @classmethod
    def from_config(cls, name, options, ctx):
        deid, policy = build(options)
        folder = options.path("storage_dir", None) or (ctx.storage_path / "deidentify" / name)
        return cls(name, deid, policy, folder,
                   max_body_bytes=options.int("max_body_bytes", 1 << 30, minimum=1024),
                   backend_data=options.str("backend_data", "original", choices=("original", "deidentified")))

    # ------------------------------------------------------------------ requests

    def on_request(self, request):
        op = self._operation(request)
        if op is None:
            # Fail closed: what is not a DICOM operation cannot be de-identified, so it does not pass.
            raise BadRequest("the deidentify middleware passes DICOM operations only (C-ECHO, C-FIND, C-GET, "
                             "C-MOVE, C-STORE; or a Part-10 body with Content-Type application/dicom)")
        request.metadata["dimse_op"] = op
        # Results are de-identified here, as Datasets and files: no precomputed
        # DICOM JSON of the originals may pass by (harmony.dicom.results).
        request.metadata.pop(RESULTS_AS, None)
        if request.state.dicomweb.request is not None:
            # A DICOMweb request the bridge turned into this DIMSE operation: the backend must answer the
            # operation (whose identifier and instance are de-identified here), never forward the client's
            # HTTP request as it came (the dicomweb backend would).  Put back for the bridge on the way out.
            request.state.deid_hidden_dicomweb = request.state.dicomweb.request
            request.state.dicomweb.request = None
        if op == C_STORE:
            return self._store_request(request)
        if op in (C_FIND, C_GET, C_MOVE):
            if op == C_MOVE:
                # Instances must come back through here to be de-identified, never PACS -> destination.
                request.metadata["move_delivery"] = "proxy"
            # the pseudonym map may read its file: off the reactor
            return threads.deferToThread(self._translate_identifier, request).addCallback(lambda _: request)
        return request

    @staticmethod
    def _operation(request) -> str | None:
        """The DICOM operation a request asks for, however its endpoint said it (metadata, a
        ``{"dimse_op": ...}`` JSON body or ``?dimse_op=`` as ``dicom_scu`` reads them, or a Part-10 body)."""
        op = request.metadata.get("dimse_op")
        if not op and isinstance(request.normalized, dict) and isinstance(request.normalized.get("dimse_op"), str):
            op = request.normalized["dimse_op"]
        if not op:
            op = request.query_value("dimse_op")
        if not op and media_type(request.header("Content-Type")) == "application/dicom":
            op = C_STORE
        op = (op or "").upper()
        return op if op in OPERATIONS else None

    def _translate_identifier(self, request) -> None:
        doc = request.normalized
        if isinstance(doc, dict) and "identifier" in doc and isinstance(doc["identifier"], dict):
            doc = doc["identifier"]
        if not isinstance(doc, dict):
            return
        actions = self.deid.profile.actions
        for key, attr_ in list(doc.items()):
            if not isinstance(attr_, dict) or not attr_.get("Value"):
                continue
            if key in _UID_KEYS or key == _PATIENT_ID:
                if self.backend_data == "original":
                    attr_["Value"] = [self.reverse.get(v) or v if isinstance(v, str) else v for v in attr_["Value"]]
                continue
            try:
                action = actions.get(int(key, 16))
            except ValueError:
                continue
            if action is not None and action != KEEP:
                attr_.pop("Value", None)  # no matching on what the answer will not show

    def _store_request(self, request):
        instance = request.state.dicom.instance
        if isinstance(instance, DicomInstance):
            return self._store_file(request, instance.path)
        if isinstance(instance, (str, Path)):
            return self._store_file(request, Path(instance))
        body = request.body
        if isinstance(body, (bytes, bytearray)):
            if not body:
                raise BadRequest("C-STORE needs a DICOM instance")
            if len(body) > self.max_body_bytes:
                raise PayloadTooLarge(f"the instance is larger than max_body_bytes ({self.max_body_bytes})")
            return self._spool(request, bytes(body))
        return read_body(body, self.max_body_bytes).addCallback(lambda data: self._spool(request, data))

    def _spool(self, request, data: bytes):
        def write():
            path = self.staging.ensure().new_path()
            path.write_bytes(data)
            return path

        return threads.deferToThread(write).addCallback(lambda path: self._store_file(request, path, spooled=True))

    @defer.inlineCallbacks
    def _store_file(self, request, path: Path, spooled: bool = False):
        calling = request.metadata.get("calling_aet", "")
        try:
            outcome, staged, header = yield threads.deferToThread(self._deidentify_path, path, calling,
                                                                  isinstance(request.normalized, dict))
        except Exception as e:  # noqa: BLE001 - unreadable input is the sender's problem
            raise BadRequest(f"cannot de-identify the instance: {type(e).__name__}") from None
        finally:
            if spooled:
                _unlink(path)
        if outcome.verdict == QUARANTINED:
            self.counts["quarantined"] += 1
            log.warn("deidentify {name}: quarantined an instance ({reason})", name=self.name, reason=outcome.reason)
            response = ResponseEnvelope.json(202, {"quarantined": outcome.sop_instance_uid, "reason": outcome.reason})
            return record(response, SUCCESS)
        self.counts["deidentified"] += 1
        request.state.dicom.instance = staged
        request.state.deid_staged = staged
        request.body = b""
        request.metadata["sop_instance_uid"] = staged.sop_instance_uid
        if header is not None:
            request.normalized = header
        return request

    def _deidentify_path(self, path: Path, quarantine_from: str | None = None, header: bool = False):
        """(outcome, staged DicomInstance or None, header DICOM JSON or None), all in one thread
        hop; with *quarantine_from* (the calling AE title) a quarantined original is kept for review."""
        self._sweep_staging()
        dst = self.staging.ensure().new_path()
        try:
            outcome = deidentify_file(self.deid, self.policy, path, dst, keep_dataset=True)
        except BaseException:
            _unlink(dst)
            raise
        if outcome.verdict == QUARANTINED:
            if quarantine_from is not None:
                self._quarantine(path, outcome, quarantine_from)
            return outcome, None, None
        ds = outcome.dataset
        outcome.dataset = None
        staged = DicomInstance(path=dst, sop_class_uid=outcome.sop_class_uid, sop_instance_uid=outcome.sop_instance_uid,
                               transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                               study_instance_uid=outcome.study_instance_uid,
                               series_instance_uid=outcome.series_instance_uid, size=dst.stat().st_size, owned=True)
        return outcome, staged, (_header_json(ds) if header else None)

    def _sweep_staging(self, now=None) -> int:
        """Remove staged copies older than an hour, at most every few minutes: on_response releases
        them, but a pipeline that failed after this middleware never calls it."""
        now = time.time() if now is None else now
        if now - self._swept < STAGING_SWEEP_SECS:
            return 0
        self._swept = now
        removed = 0
        folder = self.staging.folder
        if folder.is_dir():
            for entry in os.scandir(folder):
                try:
                    if entry.stat().st_mtime < now - STAGED_MAX_AGE_SECS:
                        os.unlink(entry.path)
                        removed += 1
                except FileNotFoundError:
                    pass
        return removed

    def _quarantine(self, path: Path, outcome, calling_aet: str) -> None:
        """Keep the original apart for review: the file, and a sidecar without PHI."""
        day = time.strftime("%Y%m%d", time.gmtime())
        folder = self.quarantine_dir / day
        folder.mkdir(parents=True, exist_ok=True)
        stem = uuid.uuid4().hex
        shutil.copyfile(path, folder / f"{stem}.dcm")
        sidecar = {"reason": outcome.reason, "sop_class_uid": outcome.sop_class_uid,
                   "pseudonymous_sop_instance_uid": outcome.sop_instance_uid, "calling_aet": calling_aet,
                   "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (folder / f"{stem}.json").write_text(json.dumps(sidecar))

    # ------------------------------------------------------------------ responses

    def on_response(self, request, response):
        if request.state.deid_hidden_dicomweb is not None:
            request.state.dicomweb.request = request.state.deid_hidden_dicomweb
            request.state.deid_hidden_dicomweb = None
        staged, request.state.deid_staged = request.state.deid_staged, None
        if staged is not None:
            staged.release()  # the backend has copied or sent it by now
        op = request.metadata.get("dimse_op")
        stream = response.state.dicom_results
        if stream is None or op not in (C_FIND, C_GET, C_MOVE):
            return response
        out = _DeidentifiedStream(stream)
        self._pump(stream, out, op)
        response.state.dicom_results = out
        body = response.body
        if isinstance(body, ResultBodyProducer):
            kind = "json" if op == C_FIND else "multipart"
            # Stopped only when its client left: the request is marked client-gone before the
            # cancel reaches the backend's stream, so the target pool counts a client abort.
            response.body = ResultBodyProducer(out, kind, request=request)
            response.headers.setRawHeaders("Content-Type", [response.body.content_type])
        return response

    def _pump(self, source: ResultStream, out: ResultStream, op: str) -> None:
        def counted(s):
            if not s.done and s.remaining is not None:
                out.set_counts(s.remaining, s.completed, s.failed, s.warning)

        source.when_counted().addCallback(counted)
        #: SOP instance UIDs (as the client knows them) held back from the answer
        state: dict[str, list[str]] = {"withheld": []}

        def finish():
            out.completed, out.warning = source.completed, source.warning
            out.failed = source.failed + len(state["withheld"])
            out.failed_sop_uids = list(source.failed_sop_uids) + state["withheld"]
            out.remaining = source.remaining
            status = source.status if source.status is not None else SUCCESS
            if state["withheld"] and status == SUCCESS:
                status = WARNING_SUBOPS  # one or more sub-operations failed (withheld: quarantined)
            comment = "withheld for burned-in identity or unreadable" if state["withheld"] else None
            out.finish(status, source.error_comment or comment)

        def given_up(item=None) -> bool:
            """The consumer left: what the source still holds or sends is released, not de-identified."""
            if not out.given_up:
                return False
            if isinstance(item, DicomInstance):
                item.release()
            release_rest(source)
            finish()
            return True

        @defer.inlineCallbacks
        def loop():
            while True:
                # Pulled only while the client keeps up: the source (dicom_scu) then holds the PACS back.
                yield out.room()
                item = yield source.next()
                if item is None:
                    finish()
                    return
                if given_up(item):
                    return
                if isinstance(item, DicomInstance):
                    try:
                        outcome, staged, _ = yield threads.deferToThread(self._deidentify_path, item.path)
                    except Exception as e:  # noqa: BLE001 - one unreadable instance fails its sub-operation only
                        log.warn("deidentify {name}: cannot de-identify a retrieved instance: {error}",
                                 name=self.name, error=type(e).__name__)
                        self.counts["failed"] += 1
                        state["withheld"].append(self.deid.keys.uid(item.sop_instance_uid))
                        continue
                    finally:
                        item.release()
                    if outcome.verdict == QUARANTINED:
                        self.counts["withheld"] += 1
                        state["withheld"].append(outcome.sop_instance_uid)
                        continue
                    self.counts["deidentified"] += 1
                    if given_up(staged):
                        return
                    out.put(staged)
                else:
                    ds = yield threads.deferToThread(self._identifier, item)
                    self.counts["identifiers"] += 1
                    out.put(ds)

        def failed(failure):
            out.fail(failure)

        loop().addErrback(failed)

    def _identifier(self, item):
        ds = item if isinstance(item, Dataset) else Dataset.from_json(item)
        return self.deid.identifier(ds)

    # ------------------------------------------------------------------ operators

    def quarantine_items(self, limit: int = 100) -> list[dict]:
        """The newest quarantined instances (sidecars only: no PHI)."""
        items: list[dict] = []
        if not self.quarantine_dir.is_dir():
            return items
        for day in sorted(self.quarantine_dir.iterdir(), reverse=True):
            for sidecar in sorted(day.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
                try:
                    doc = json.loads(sidecar.read_text())
                except (OSError, ValueError):
                    continue
                doc["id"] = f"{day.name}/{sidecar.stem}"
                items.append(doc)
                if len(items) >= limit:
                    return items
        return items

    def close(self):
        self.staging.clear()
        self.reverse.close()


class _DeidentifiedStream(BoundedResultStream):
    """The de-identified copy of a backend's result stream, bounded in queued bytes like
    the source (its ``limit`` when it has one, else :data:`DEFAULT_MAX_QUEUED_BYTES`).

    Giving it up gives up the backend's stream too, even once this copy has ended
    (the pump has taken the source's end while the consumer still sends what is
    queued here): the source's abandonment is where the target pool counts a
    client abort (``ResultStream.when_abandoned``), and where a backend cancels
    upstream (C-CANCEL) and stops staging."""

    def __init__(self, source: ResultStream):
        super().__init__(limit=getattr(source, "limit", DEFAULT_MAX_QUEUED_BYTES))
        self.source = source

    def cancel(self) -> None:
        super().cancel()
        self.source.cancel()


def deidentifiers(runtime) -> list[Deidentify]:
    """The ``deidentify`` middleware of a runtime (``service.runtime``)."""
    return [m for m in getattr(runtime, "middleware", {}).values() if isinstance(m, Deidentify)]


def quarantine_report(runtime, limit: int = 100) -> dict:
    """What the management API shows: per deidentify middleware of *runtime*, its counters and the
    newest quarantined instances (reasons and pseudonymous UIDs, never PHI).  Blocking (reads
    sidecar files): call it off the reactor."""
    return {m.name: {"counts": dict(m.counts), "quarantined": m.quarantine_items(limit)}
            for m in deidentifiers(runtime)}


class QuarantineResource(Resource):
    """``GET`` -> :func:`quarantine_report` as JSON (``?limit=N``, default 100), for the management API
    to mount (e.g. at ``/admin/deidentify``) behind its token check: it has no authentication of its own."""

    isLeaf = True

    def __init__(self, runtime_of):
        super().__init__()
        self.runtime_of = runtime_of

    def render_GET(self, request):
        try:
            limit = max(1, min(1000, int((request.args.get(b"limit") or [b"100"])[0])))
        except ValueError:
            limit = 100

        def done(doc):
            request.setHeader(b"content-type", b"application/json")
            request.write(json.dumps(doc).encode())
            request.finish()

        def failed(f):
            log.failure("deidentify quarantine report failed", f)
            request.setResponseCode(500)
            request.finish()

        threads.deferToThread(quarantine_report, self.runtime_of(), limit).addCallbacks(done, failed)
        return NOT_DONE_YET


class DeidentifyCollector:
    """Prometheus collector: ``harmony_deidentify_instances_total{middleware, outcome}``.
    ``runtime_of()`` returns the live runtime (e.g. ``lambda: service.runtime``), so a reload's new
    middleware are reported without re-registering."""

    def __init__(self, runtime_of):
        self.runtime_of = runtime_of

    def describe(self):
        return []

    def collect(self):
        total = CounterMetricFamily("harmony_deidentify_instances", "Instances and identifiers handled by deidentify",
                                    labels=["middleware", "outcome"])
        for m in deidentifiers(self.runtime_of()):
            for outcome in ("deidentified", "quarantined", "withheld", "failed", "identifiers"):
                total.add_metric([m.name, outcome], m.counts.get(outcome, 0))
        yield total


def _header_json(ds: Dataset) -> dict:
    """The de-identified header as DICOM JSON for middleware to its right (bulk values left out)."""
    return ds.to_json_dict(bulk_data_threshold=4096, bulk_data_element_handler=lambda _: "")


def _unlink(path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
