"""A reactor-native DICOM upper layer (PS3.8): associations carried by Twisted.

pynetdicom carries each association in two threads (its DUL and its
association loop) that poll with sleeps, watch sockets with ``select()`` and
read a PDU's declared length without checking it (see issue 13 and
``bench/dimse/README.md``).  This package carries associations on the reactor
instead -- one :class:`~twisted.internet.protocol.Protocol` per association,
PDUs framed from a bounded buffer and checked against the negotiated maximum,
timers from the reactor, no thread per socket -- while pynetdicom stays the
DICOM library: its PDU classes encode and decode A-ASSOCIATE, its
presentation-context negotiation decides what is accepted, its SOP class and
status tables name things.

Modules: :mod:`.pdu` (framing, limits, the PDUs we build by hand),
:mod:`.commands` (DIMSE command sets, implicit VR little endian),
:mod:`.association` (the protocol: state, negotiation, messages, flow control),
:mod:`.acceptor` (listener policy: association and per-source limits).
"""
