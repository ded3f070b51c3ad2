"""The requesting side: open an association to a peer on the reactor.

:func:`associate` connects (TCP or TLS, TCP_NODELAY set: see the field notes
on Nagle and DIMSE), proposes presentation contexts and roles, and fires with
the established :class:`~.association.Association` -- or fails with
:class:`~.association.AssociationRejected` / a connection error.  Requests are
then ``assoc.request(...)`` (a Deferred per DIMSE operation); incoming
requests on the same association (C-STORE sub-operations of a C-GET) go to
*handler*, exactly as on an acceptor.
"""

from __future__ import annotations

import attr
from pynetdicom.pdu_primitives import A_ASSOCIATE, SCP_SCU_RoleSelectionNegotiation
from pynetdicom.presentation import PresentationContext
from twisted.internet import protocol, tcp
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS

from harmony.dicom.ul.association import APPLICATION_CONTEXT, Association, BoundedCache, encode_associate_rq
from harmony.dicom.ul.datasets import MemorySink


@attr.s(auto_attribs=True, kw_only=True)
class RequestorSettings:
    """Timers and our maximum PDU for outgoing associations (the counting hooks do nothing)."""

    local_aet: str
    max_pdu: int = 65536
    acse_timeout: float = 30.0
    dimse_timeout: float = 30.0
    network_timeout: float = 60.0
    connect_timeout: float = 10.0

    def connection_made(self, assoc):
        pass

    def connection_lost(self, assoc, state):
        pass

    def association_established(self, assoc):
        pass

    def association_ended(self, assoc):
        pass


class NoRequests:
    """The handler of an association that accepts no requests from the peer."""

    def dataset_sink(self, assoc, context_id, command):
        return MemorySink(64 * 1024)

    def on_request(self, assoc, message):
        assoc.abort("unexpected request from the peer")

    def association_established(self, assoc):
        pass

    def association_closed(self, assoc):
        pass


class _Factory(protocol.Factory):
    def __init__(self, build):
        self.build = build

    def buildProtocol(self, addr):
        return self.build()


def request_primitive(calling_aet: str, called_aet: str, contexts: list[PresentationContext],
                      roles: dict | None = None, extra_items=()) -> A_ASSOCIATE:
    """The A-ASSOCIATE request: contexts numbered 1, 3, 5, ...; *roles* ``{sop_class: (scu, scp)}``."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.calling_ae_title = calling_aet
    primitive.called_ae_title = called_aet
    numbered = []
    for index, cx in enumerate(contexts):
        copy = PresentationContext()
        copy.context_id = 2 * index + 1
        copy.abstract_syntax = cx.abstract_syntax
        for ts in cx.transfer_syntax:
            copy.add_transfer_syntax(ts)
        numbered.append(copy)
    primitive.presentation_context_definition_list = numbered
    items = []
    for sop_class, (scu, scp) in (roles or {}).items():
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid = sop_class
        role.scu_role = scu
        role.scp_role = scp
        items.append(role)
    primitive.user_information = items + list(extra_items)
    return primitive


class _Request:
    """An A-ASSOCIATE-RQ made once for every association that asks the same, and the
    answers read to it (the A-ASSOCIATE-AC's bytes -> what was negotiated)."""

    __slots__ = ("primitive", "pdu", "answers")

    def __init__(self, primitive: A_ASSOCIATE, pdu: bytes):
        self.primitive = primitive
        self.pdu = pdu
        self.answers = BoundedCache(8)


#: Requests by what they ask (see :func:`_request`).
_requests = BoundedCache(32)


def _request(settings: RequestorSettings, called_aet: str, contexts: list[PresentationContext],
             roles: dict | None, extra_items) -> _Request:
    """The request for these AE titles, contexts, roles and items, made once.

    Making pynetdicom's primitive and encoding it validated every UID again: ~15 ms of the
    reactor for ``dicom_scu``'s 128 storage contexts, and ~7 ms more to decode the PACS's
    answer and negotiate, for each association opened to a PACS (the pool's idle ones last
    15 s) - 0.1 ms with the request and its answers kept.  Kept by content, not identity:
    callers build their context lists afresh.  Extra items other than role selections
    (none today) are not kept."""
    def made() -> _Request:
        primitive = request_primitive(settings.local_aet, called_aet, contexts, roles, extra_items)
        return _Request(primitive, encode_associate_rq(primitive, settings.max_pdu))

    if any(not isinstance(item, SCP_SCU_RoleSelectionNegotiation) for item in extra_items):
        return made()
    key = (settings.local_aet, called_aet, settings.max_pdu,
           tuple((str(cx.abstract_syntax), tuple(map(str, cx.transfer_syntax))) for cx in contexts),
           tuple((str(uid), scu, scp) for uid, (scu, scp) in (roles or {}).items()),
           tuple((str(item.sop_class_uid), item.scu_role, item.scp_role) for item in extra_items))
    known = _requests.get(key)
    if known is None:
        known = made()
        _requests.put(key, known)
    return known


async def associate(reactor, host: str, port: int, settings: RequestorSettings, called_aet: str,
                    contexts: list[PresentationContext], *, roles: dict | None = None, handler=None,
                    tls_context=None, extra_items=()) -> Association:
    """Connect and negotiate; returns the established association."""
    request = _request(settings, called_aet, contexts, roles, extra_items)
    assoc_handler = handler or NoRequests()
    endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=settings.connect_timeout)
    if tls_context is not None:
        # zope's @implementer(IStreamClientEndpoint) is invisible to mypy (no mypy-zope plug-in).
        endpoint = wrapClientTLS(tls_context, endpoint)  # type: ignore[arg-type,assignment]

    def build():
        return Association(settings, assoc_handler, reactor, requestor=request.primitive, request_pdu=request.pdu,
                           answers=request.answers)

    assoc = await endpoint.connect(_Factory(build))  # type: ignore[arg-type]  # Factory's zope IProtocolFactory, as above
    transport = assoc.transport
    if isinstance(transport, tcp.Connection) and getattr(transport.protocol, "_wrappedProtocol", None) is assoc:
        # The endpoint's wrapper only passes each read (and the end) on: the association
        # takes them itself, a call less per read on every pooled association (bench/dimse).
        transport.protocol = assoc
    await assoc.established
    return assoc
