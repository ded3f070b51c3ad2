"""An A-ASSOCIATE-RQ decoded for the acceptor: pynetdicom's primitive, built in a
fraction of the time, and the keys its negotiation and answer are kept under.

Why it exists: pynetdicom builds a UID object and runs its validators' regular
expressions some forty times for each presentation context it decodes.  The
request DCMTK ``storescu`` and ``getscu`` send (128 contexts of three transfer
syntaxes each, ~9.6 KiB) took 17-31 ms of the reactor to decode and another
~6 ms to negotiate and answer, during which no other association moved.  The
whole request was cached by its bytes, but the bytes carry the calling AE
title: every modality has its own, and past the cache's 32 entries a site's
modalities paid it on every association (and a peer sending new AE titles
paid it at will).

Here each distinct UID is made and checked once, by pynetdicom's own path
(:func:`_abstract_syntax`, :func:`_transfer_syntax`: the same UID, the same
refusal of an invalid one), and each presentation context is assembled from
those; the rest of the request (AE titles, application context, user
information) is decoded by pynetdicom from the request with its contexts taken
out, which is cheap.  The contexts and the role selections are the
*proposal*: requests that differ only in their AE titles share its decoded
contexts, its negotiation and the A-ASSOCIATE-AC's bytes (whose AE title
fields echo the request's, PS3.8 Table 9-17), see
:class:`~harmony.dicom.ul.acceptor.AcceptorSettings`.

Private to pynetdicom: :class:`~pynetdicom.presentation.PresentationContext`'s
``_abstract_syntax`` and ``_transfer_syntax``, set directly (its setters
validate again what the caches validated).  tests/dicom/ul/test_proposal.py
checks the primitive against pynetdicom's own decode of real clients' requests.
"""

from __future__ import annotations

import functools

from pynetdicom import pdu as pn_pdu
from pynetdicom.pdu_items import AbstractSyntaxSubItem, TransferSyntaxSubItem
from pynetdicom.pdu_primitives import A_ASSOCIATE, SCP_SCU_RoleSelectionNegotiation
from pynetdicom.presentation import PresentationContext

from harmony.dicom.ul import pdu

#: The request's fixed part: protocol version, reserved, called and calling AE titles, reserved (PS3.8 Table 9-11).
FIXED_BYTES = 68
#: Where the called and calling AE title fields are, in the request's body and in an answer's.
AE_FIELDS = slice(4, 36)
PRESENTATION_CONTEXT_RQ = 0x20
ABSTRACT_SYNTAX = 0x30
TRANSFER_SYNTAX = 0x40


class Proposal:
    """A decoded A-ASSOCIATE-RQ: shared and read-only, like the caches that hold it."""

    __slots__ = ("primitive", "key", "ae_fields")

    def __init__(self, primitive: A_ASSOCIATE, key: tuple, ae_fields: bytes):
        #: pynetdicom's A-ASSOCIATE primitive of the request.
        self.primitive = primitive
        #: What the negotiation depends on: the presentation context items as sent and
        #: the role selections.  Requests with the same key get the same answer, but for
        #: the AE title fields.
        self.key = key
        #: The called and calling AE title fields as sent (32 bytes), for the answer.
        self.ae_fields = ae_fields


@functools.lru_cache(maxsize=32)
def decode_associate_rq(body: bytes) -> Proposal:
    """The A-ASSOCIATE-RQ whose PDU body is *body*; the same bytes give the same
    (shared, read-only) :class:`Proposal`.  Raises on a malformed request, as
    pynetdicom's decode does (the caller aborts)."""
    if len(body) < FIXED_BYTES:
        raise ValueError("an A-ASSOCIATE-RQ shorter than its fixed fields")
    contexts: list[bytes] = []
    rest = [body[:FIXED_BYTES]]
    for item_type, item in _items(body, FIXED_BYTES):
        (contexts if item_type == PRESENTATION_CONTEXT_RQ else rest).append(item)
    reduced = b"".join(rest)
    rq = pn_pdu.A_ASSOCIATE_RQ()
    rq.decode(pdu.header(pdu.A_ASSOCIATE_RQ, len(reduced)) + reduced)
    primitive = rq.to_primitive()
    proposed = b"".join(contexts)
    primitive.presentation_context_definition_list = list(_contexts(proposed))
    roles = tuple((str(item.sop_class_uid), item.scu_role, item.scp_role) for item in primitive.user_information
                  if isinstance(item, SCP_SCU_RoleSelectionNegotiation))
    return Proposal(primitive, (proposed, roles), body[AE_FIELDS])


def _items(data: bytes, offset: int):
    """(type, the item with its header) for each item from *offset* (PS3.8 9.3.1)."""
    end = len(data)
    while offset < end:
        if end - offset < 4:
            raise ValueError("an item header cut short")
        length = int.from_bytes(data[offset + 2:offset + 4], "big")
        if offset + 4 + length > end:
            raise ValueError("an item longer than what holds it")
        yield data[offset], data[offset:offset + 4 + length]
        offset += 4 + length


@functools.lru_cache(maxsize=32)
def _contexts(items: bytes) -> tuple[PresentationContext, ...]:
    """The presentation contexts of the context items *items* (shared: read-only)."""
    out = []
    for _type, item in _items(items, 0):
        if len(item) < 8:
            raise ValueError("a presentation context item without its ID")
        context = PresentationContext()
        context.context_id = item[4]        # the setter refuses an even or zero ID, as pynetdicom's decode does
        abstract, syntaxes = None, []
        for sub_type, sub in _items(item, 8):
            if sub_type == ABSTRACT_SYNTAX:
                abstract = _abstract_syntax(sub[4:])
            elif sub_type == TRANSFER_SYNTAX:
                syntax = _transfer_syntax(sub[4:])
                if syntax is not None and syntax not in syntaxes:
                    syntaxes.append(syntax)
            else:
                raise ValueError(f"a presentation context sub-item of type 0x{sub_type:02x}")
        context._abstract_syntax = abstract
        context._transfer_syntax = syntaxes
        out.append(context)
    return tuple(out)


def _uid_field(raw: bytes) -> bytes:
    """A UID field as pynetdicom's decode reads it: one trailing NUL of padding dropped."""
    return raw[:-1] if raw[-1:] == b"\x00" else raw


@functools.lru_cache(maxsize=4096)
def _abstract_syntax(raw: bytes):
    """The abstract syntax UID of a sub-item's field *raw*, made and checked the way
    pynetdicom's decode and ``to_primitive`` do (the same UID, the same refusal)."""
    item = AbstractSyntaxSubItem()
    item.abstract_syntax_name = _uid_field(raw)
    context = PresentationContext()
    context.abstract_syntax = item.abstract_syntax_name
    return context.abstract_syntax


@functools.lru_cache(maxsize=4096)
def _transfer_syntax(raw: bytes):
    """The transfer syntax UID of a sub-item's field *raw* (None where pynetdicom
    would add none), made and checked as :func:`_abstract_syntax`."""
    item = TransferSyntaxSubItem()
    item.transfer_syntax_name = _uid_field(raw)
    context = PresentationContext()
    context.add_transfer_syntax(item.transfer_syntax_name)
    return context.transfer_syntax[0] if context.transfer_syntax else None
