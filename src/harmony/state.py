"""Typed request state: the facts Harmony's own components hand each other.

An envelope carries three kinds of data beside its body:

- ``metadata``: the string map users address by name (routing rules'
  ``metadata:`` keys, a transform's ``_context.metadata``, ``auth.*`` claims,
  ``dimse_op``, ``calling_aet`` ...).  Its keys are part of the configuration
  language and stay strings.
- ``state`` (this module): the objects and facts one component leaves for
  another - the association a DIMSE request came on, the instance a C-STORE
  carries, the result stream and the DIMSE status of an answer, the HL7 ACK,
  the pipeline for fan-out.  Every one has a named, documented attribute here,
  so a typo is an ``AttributeError`` rather than a silent ``None``, a reader
  finds every producer with a search for the attribute, and the DIMSE status
  has one place (an ``int`` of :mod:`harmony.dicom.status`'s vocabulary).
- ``context``: a free-form dict that belongs to *user* middleware (a plug-in
  written outside this package).  Harmony's own code never reads or writes it;
  ``tests/test_state.py`` fails on any ``.context`` access under
  ``src/harmony``.

The state is protocol-neutral core: values whose classes live in a toolkit
(``DicomInstance``, ``ResultStream``, ``DicomWebRequest``, ``V2Message``, a
``Pipeline``) are typed ``Any`` here because the core imports nothing above it
(tests/devtools/test_imports.py); each attribute's comment names the class it holds.
Per-protocol facts are grouped in small parts (``state.dicom``,
``state.dicomweb``, ``state.jmix``); each is a slotted attrs class, and the
DICOMweb and JMIX parts are made when first read, so a request costs a handful
of small allocations.
"""

from __future__ import annotations

from typing import Any, Sequence

import attr


@attr.s(auto_attribs=True, slots=True)
class DicomRequestFacts:
    """What a DICOM request carries besides its identifier (``normalized``)."""

    #: The ``harmony.dicom.ul.association`` the request arrived on (``dicom_scp``).
    association: Any = None
    #: The ``harmony.dicom.results.DicomInstance`` a C-STORE sends (``dicom_scp``, the
    #: DICOMweb bridge's STOW-RS, store-and-forward delivery, de-identification); the
    #: stores also take a file path here.
    instance: Any = None
    #: The identifier as the DIMSE client sent it: ``(bytes, transfer syntax, json.dumps of
    #: normalized then, or None when the pipeline has no middleware to change it)``
    #: (``dicom_scp``); ``dicom_scu`` relays the bytes while no middleware changed ``normalized``.
    received_identifier: tuple | None = None
    #: C-FIND, set by ``dicom_scp`` only when no middleware sits between it and the backend:
    #: called with the backend's ``ResultStream`` once the request is on its way to the PACS
    #: (``dicom_scu``), so each match reaches the client as it comes while the pipeline's
    #: answer -- which waits for the first one -- completes behind it.
    results_listener: Any = None
    #: C-FIND, set by ``dicom_scp`` with no middleware and one ``dicom_scu`` backend: the
    #: request already sent to the PACS before the pipeline ran (``dicom_scu.FindAhead``),
    #: which that backend's attempt takes over.
    ahead: Any = None


@attr.s(auto_attribs=True, slots=True)
class DicomWebRequestFacts:
    """What the ``dicomweb`` endpoint learnt about a request, for the bridge and backend."""

    #: The parsed ``harmony.dicomweb.routes.DicomWebRequest``.
    request: Any = None
    #: The public root URL (scheme, host, prefix) answers' URLs are built on.
    root: str = ""
    #: The first bytes of a request body, read to tell a STOW-RS body's shape.
    body_head: bytes | None = None
    #: Warnings for the ``Warning`` header of the answer (ignored query parameters ...).
    warnings: Sequence[str] = ()
    #: The response-cache key the bridge computed for this request.
    cache_key: Any = None


@attr.s(auto_attribs=True, slots=True)
class JmixRequestFacts:
    """The ``jmix`` endpoint's and the ``jmix_builder`` middleware's facts."""

    #: An error the endpoint found while routing (rendered once the pipeline answers).
    error: Exception | None = None
    #: The pipeline a study build runs through (a ``harmony.pipeline.Pipeline``).
    pipeline: Any = None
    #: ``(study UID, format)`` the builder was asked for.
    build: tuple | None = None


@attr.s(auto_attribs=True, slots=True)
class RequestState:
    """The well-known facts of one request (see the module docstring for the rule)."""

    #: The ``harmony.pipeline.Pipeline`` running the request: fan-out's ``send_after``.
    pipeline: Any = None
    #: True once the client hung up (``harmony.errors.mark_client_gone``).
    client_gone: bool = False
    dicom: DicomRequestFacts = attr.Factory(DicomRequestFacts)
    #: Made when first read (:attr:`dicomweb`, :attr:`jmix`): a DIMSE request never reads
    #: them, and a proxied C-FIND made both for nothing (bench/dimse).
    _dicomweb: DicomWebRequestFacts | None = None
    _jmix: JmixRequestFacts | None = None
    #: The parsed ``harmony.hl7.message.V2Message`` (``mllp`` endpoint).
    hl7_message: Any = None
    #: The resource id a FHIR read asked for (``fhir_cfind``); None for a search.
    fhir_read_id: str | None = None
    #: De-identification's staged copy of ``dicom.instance`` (removed when answered).
    deid_staged: Any = None
    #: The ``DicomWebRequest`` de-identification hid from the backend while a
    #: de-identified copy is stored (restored on the way back).
    deid_hidden_dicomweb: Any = None

    @property
    def dicomweb(self) -> DicomWebRequestFacts:
        facts = self._dicomweb
        if facts is None:
            facts = self._dicomweb = DicomWebRequestFacts()
        return facts

    @dicomweb.setter
    def dicomweb(self, facts: DicomWebRequestFacts) -> None:
        self._dicomweb = facts

    @property
    def jmix(self) -> JmixRequestFacts:
        facts = self._jmix
        if facts is None:
            facts = self._jmix = JmixRequestFacts()
        return facts

    @jmix.setter
    def jmix(self, facts: JmixRequestFacts) -> None:
        self._jmix = facts


@attr.s(auto_attribs=True, slots=True)
class ResponseState:
    """The well-known facts of one answer."""

    #: A ``harmony.dicom.results.ResultStream`` (DICOM backends: C-FIND matches,
    #: C-GET/C-MOVE instances, or the C-STORE answer of ``dicom_scu``).
    dicom_results: Any = None
    #: The DIMSE status (an ``int`` of ``harmony.dicom.status``) of an answer
    #: that has no result stream, or of an error rendered for DIMSE.  Read it
    #: with ``harmony.dicom.status.of_response``, which also asks the stream.
    dimse_status: int | None = None
    #: The Error Comment that goes with ``dimse_status``.
    error_comment: str | None = None
    #: The ``harmony.storage`` row of an instance a store wrote durably.
    stored_instance: Any = None
    #: An MLLP peer's ACK (bytes), its code (``AA``, ``AE`` ...) and the parsed
    #: ``harmony.hl7.ack`` information, passed back upstream by the ``mllp`` endpoint.
    hl7_ack: bytes | None = None
    hl7_ack_code: str | None = None
    hl7_ack_info: Any = None
    #: The ``harmony.hl7`` error the ``mllp`` endpoint answers with an ERR segment.
    hl7_error: Any = None


__all__ = ["DicomRequestFacts", "DicomWebRequestFacts", "JmixRequestFacts", "RequestState", "ResponseState"]
