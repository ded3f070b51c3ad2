"""``jmix_builder`` middleware: DICOM retrieve results in, a stored JMIX envelope out.

On the way in, a study request (``jmix.study_uid`` set by the ``jmix``
endpoint, or ``?studyInstanceUid=`` behind any other endpoint) is answered from
the store when an envelope for the study exists - the backend is not called.
Otherwise the request is turned into a study-level retrieve for a DICOM backend
(``metadata["dimse_op"]`` = C-GET, ``query_level`` = STUDY, the identifier as
DICOM JSON in ``request.normalized``; a ``dicom_scu`` backend configured for
C-MOVE fetches the same way through its own store SCP).

On the way back it drains ``response.state.dicom_results`` (the
:mod:`harmony.dicom.results` contract: C-GET/C-MOVE items are
:class:`DicomInstance` files), builds the envelope off the reactor, stores and
indexes it, releases the backend's staged files and answers with the archive.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from twisted.internet import defer

from harmony.config.errors import OptionError
from harmony.dicom.render import next_or_give_up
from harmony.dicom.results import C_FIND, C_GET, DicomInstance
from harmony.envelope import RequestEnvelope
from harmony.errors import BackendUnavailable, NotFound
from harmony.jmix import crypto
from harmony.jmix.builder import AssertionSpec, BuildOptions, Entity, build_envelope, read_headers
from harmony.jmix.dicom import valid_uid
from harmony.jmix.profiles import PROFILES
from harmony.jmix.store import store_option
from harmony.jmix.web import JSON, envelope_response, negotiate
from harmony.log import get_logger
from harmony.middleware.base import Middleware

log = get_logger("harmony.jmix")

_META_STUDY = "jmix.study_uid"  # set by harmony.endpoints.jmix (kept literal to avoid importing it)
_META_ROUTE = "jmix.route"


def _key(options, name, loader, what):
    if name not in options:
        return None
    path = options.path(name)
    try:
        return loader(path.read_bytes())
    except (OSError, crypto.CryptoError) as e:
        raise OptionError(name, f"cannot load {what} from {path}: {e}") from None


def _entity(table, key) -> Entity:
    if not isinstance(table, dict) or not isinstance(table.get("id"), str) or not table["id"]:
        raise OptionError(key, "must be a table with a non-empty string 'id' (and optional 'name', 'contact')")
    return Entity(table["id"], table.get("name"), table.get("contact"))


class JmixBuilder(Middleware):
    #: The ``jmix`` endpoint routes study builds only to pipelines with a builder.
    builds_jmix = True

    def __init__(self, name, store, reactor, build_options: BuildOptions):
        super().__init__(name)
        self.store = store
        self.reactor = reactor
        self.build_options = build_options

    @classmethod
    def from_config(cls, name, options, ctx):
        sender = _entity(options.table("sender", {"id": "org:harmony-proxy", "name": "Harmony Proxy"}), "sender")
        receivers = [_entity(t, "receivers") for t in options.list("receivers", [], of=dict)]
        requester = options.table("requester", None)
        bo = BuildOptions(
            sender=sender, requester=_entity(requester, "requester") if requester is not None else None,
            classification=options.str("classification", "confidential",
                                       choices=("confidential", "sensitive", "de-identified")),
            profile=options.str("profile", "spec", choices=tuple(sorted(PROFILES))),
            skip_hashing=options.bool("skip_hashing", False), skip_listing=options.bool("skip_listing", False),
            recipient_public_key=_key(options, "encryption_public_key_file", crypto.x25519_public,
                                      "an X25519 public key"),
            jws_key=_key(options, "signing_key_file", crypto.ed25519_private, "an Ed25519 private key"))
        if receivers:
            bo.receivers = receivers
        assertion_key = _key(options, "assertion_key_file", crypto.ed25519_private, "an Ed25519 private key")
        if assertion_key is not None:
            bo.assertions["sender"] = AssertionSpec(assertion_key)
        return cls(name, store_option(options, ctx), ctx.reactor, bo)

    def _thread(self, f, *args):
        return self.store.in_thread(self.reactor, f, *args)

    # -- way in
    def on_request(self, request):
        uid = request.metadata.get(_META_STUDY)
        if uid is None and _META_ROUTE not in request.metadata and request.method in ("GET", "HEAD"):
            uid = request.query_value("studyInstanceUid")
            if uid and not valid_uid(uid):
                return request  # not ours to judge; the jmix endpoint answers 400 itself
        if not uid or request.metadata.get(_META_ROUTE, "study") != "study":
            return request
        fmt = negotiate(request.header("accept"), allow_json=True)
        if fmt == JSON:
            return request  # the JSON index is the jmix endpoint's store to answer, not a build
        # The index lookup waits on the store's lock, which a build may hold.
        return self._thread(self.store.newest_for_study, uid).addCallback(self._cached_or_build, request, uid, fmt)

    def _cached_or_build(self, env_id, request, uid, fmt):
        if env_id is not None:
            return envelope_response(self.store, env_id, fmt, request.method, self.reactor)
        request.state.jmix.build = (uid, fmt)
        # A retrieve to us: whether the PACS is asked by C-GET or by C-MOVE to the
        # proxy's own store SCP is the DICOM backend's configuration, not ours.
        request.metadata["dimse_op"] = C_GET
        request.metadata["query_level"] = "STUDY"
        request.normalized = {"00080052": {"vr": "CS", "Value": ["STUDY"]},
                              "0020000D": {"vr": "UI", "Value": [uid]}}
        return request

    # -- way back
    @defer.inlineCallbacks
    def on_response(self, request, response):
        wanted = request.state.jmix.build
        if wanted is None:
            return response
        uid, fmt = wanted
        stream = response.state.dicom_results
        if stream is None:
            if response.status >= 400:
                return response  # the backend's own error, passed on
            raise BackendUnavailable("the backend answered without DICOM retrieve results")
        instances: list[DicomInstance] = []
        try:
            while True:
                # The client leaving meanwhile gives the retrieve up (C-CANCEL; what the PACS
                # still sends is released): the target counts a client abort.
                item = yield next_or_give_up(stream)
                if item is None:
                    break
                if isinstance(item, DicomInstance):
                    instances.append(item)
            if not instances:
                if stream.status not in (None, 0x0000):
                    exists = yield self._study_exists(request, uid)
                    if exists is not False:
                        raise BackendUnavailable(f"retrieve of study {uid} failed (status 0x{stream.status:04X}"
                                                 f"{': ' + stream.error_comment if stream.error_comment else ''})")
                raise NotFound(f"study {uid} not found")
            stored = yield self._thread(self._build_and_store, [Path(i.path) for i in instances], uid)
        finally:
            # The backend's staged files are ours to clean once copied (or on failure).
            for item in instances:
                item.release()
        log.info("built JMIX envelope {id} for a study: {count} instance(s), {size} bytes", id=stored["id"],
                 count=len(instances), size=stored["size"])
        answer = yield envelope_response(self.store, stored["id"], fmt, request.method, self.reactor)
        return answer

    @defer.inlineCallbacks
    def _study_exists(self, request, uid):
        """Ask the backend a study-level C-FIND: True, False, or None (cannot tell).

        PACSes answer a retrieve of an unknown study differently - Orthanc with
        0xC000 "unable to process", others with success and no instances - so a
        failed, empty retrieve is told apart from a missing study by asking.
        The ``jmix`` endpoint passes its pipeline in ``request.state.jmix.pipeline``.
        """
        pipeline = request.state.jmix.pipeline
        if pipeline is None:
            return None
        find = RequestEnvelope(method="GET", path=request.path, metadata={
            **request.metadata, "dimse_op": C_FIND, "query_level": "STUDY"},
            normalized={"00080052": {"vr": "CS", "Value": ["STUDY"]}, "0020000D": {"vr": "UI", "Value": [uid]}})
        try:
            response = yield pipeline.select_backend(request).send(find)
            stream = response.state.dicom_results
            if stream is None:
                return None
            matches = yield stream.collect()
        except Exception:  # noqa: BLE001 - any failure here just means "cannot tell"
            return None
        return bool(matches)

    def _build_and_store(self, paths, uid):
        """Build, store and index (worker thread); the work folder always goes."""
        work = self.store.new_workdir()
        try:
            headers = [h for h in read_headers(paths) if h.study_uid == uid]
            if not headers:
                raise NotFound(f"study {uid} not found (the backend sent other studies)")
            result = build_envelope([], work, self.build_options, headers=headers)
            return self.store.add(result.root, result.study_uid, "built")
        finally:
            shutil.rmtree(work, ignore_errors=True)
