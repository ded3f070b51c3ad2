"""The listening side: who may associate, how many, and what is accepted.

The limits here answer the attacks of issue 13: a connection that never sends
an A-ASSOCIATE-RQ costs a socket and a timer (no thread, no polling) and does
*not* count against ``max_associations`` -- only negotiated associations do;
it is cut after the ACSE timeout.  Connections are capped in total and per
source address, so a storm of silent or garbage-sending sockets cannot starve
real modalities; the listen backlog is sized for bursts.  Every refusal a
peer can understand is an A-ASSOCIATE-RJ with the right reason; the rest are
A-ABORTs.

With ``[proxy] workers = N`` every process accepts on the same listening
socket; ``max_associations`` stays one limit for the listener through a
:class:`SharedAssociationCount` (one slot per process in a small shared file),
while the connection caps stay per process (docs/endpoints/dicom_scp.md).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import tempfile
from collections import Counter

import attr
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor
from twisted.internet import protocol

from harmony.dicom.ul.association import Association, Reject
from harmony.log import get_logger

log = get_logger("harmony.dicom.ul.acceptor")

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 Table 9-21.
REJECT_CALLING_AET = Reject(0x01, 0x01, 0x03)
REJECT_CALLED_AET = Reject(0x01, 0x01, 0x07)
REJECT_NO_REASON = Reject(0x01, 0x01, 0x01)
REJECT_APPLICATION_CONTEXT = Reject(0x01, 0x01, 0x02)
REJECT_BUSY = Reject(0x02, 0x03, 0x02)          # transient, provider (presentation), local limit exceeded
REJECT_IDENTITY = Reject(0x02, 0x02, 0x01)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"


@attr.s(auto_attribs=True, kw_only=True)
class AcceptorLimits:
    """Hostile-peer limits of one listener, with documented defaults (docs/endpoints/dicom_scp.md)."""

    max_associations: int = 10
    #: TCP connections at once, negotiated or not.
    max_connections: int = 512
    #: TCP connections at once from one source address.
    max_connections_per_source: int = 128
    #: Our maximum PDU length (advertised; a larger PDU from the peer is an A-ABORT).
    max_pdu: int = 65536
    acse_timeout: float = 30.0
    dimse_timeout: float = 30.0
    network_timeout: float = 60.0
    backlog: int = 128


class SharedAssociationCount:
    """Associations of one listener across the processes sharing its socket.

    A file of one 8-byte slot per process (the main process is slot 0, worker
    *i* slot *i*), mapped by each: a process writes only its own slot, and the
    check-and-reserve of a new association runs under a POSIX record lock
    (``lockf`` is per process, so it excludes processes that share the file
    descriptor, which ``flock`` would not).  A process killed with -9 leaves its
    slot behind: the main process clears it when the worker ends and the
    restarted worker starts from zero, so a crash never shrinks the limit.
    """

    SLOT = struct.Struct("<q")

    def __init__(self, fd: int, slots: int, slot: int):
        self.fd = fd
        self.slots = slots
        self.slot = slot
        self._map = mmap.mmap(fd, self.SLOT.size * slots)
        self.set(0)

    @classmethod
    def create(cls, slots: int) -> "SharedAssociationCount":
        """A new count for *slots* processes, held by the main process (slot 0)."""
        handle = tempfile.TemporaryFile(prefix="harmony-dimse-")
        fd = os.dup(handle.fileno())
        handle.close()
        os.ftruncate(fd, cls.SLOT.size * slots)
        os.set_inheritable(fd, False)
        return cls(fd, slots, 0)

    def total(self) -> int:
        return sum(self.SLOT.unpack_from(self._map, i * self.SLOT.size)[0] for i in range(self.slots))

    def set(self, count: int, slot: int | None = None) -> None:
        self.SLOT.pack_into(self._map, (self.slot if slot is None else slot) * self.SLOT.size, count)

    def reserve(self, mine: int, limit: int) -> bool:
        """Count one more association of ours (we hold *mine*) unless the
        listener already has *limit*; atomic across the processes."""
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            if self.total() >= limit:
                return False
            self.set(mine + 1)
            return True
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self._map.close()
        os.close(self.fd)


class AcceptorSettings:
    """What an :class:`~.association.Association` asks its listener: limits, timers and negotiation."""

    def __init__(self, local_aet: str, contexts: list[PresentationContext], limits: AcceptorLimits, *,
                 allowed_calling_aets=None, require_called_aet: bool = True, identity_check=None):
        self.local_aet = local_aet
        self.supported_contexts = contexts
        self.limits = limits
        self.allowed_calling_aets = set(allowed_calling_aets) if allowed_calling_aets else None
        self.require_called_aet = require_called_aet
        self.identity_check = identity_check
        self.max_pdu = limits.max_pdu
        self.acse_timeout = limits.acse_timeout
        self.dimse_timeout = limits.dimse_timeout
        self.network_timeout = limits.network_timeout
        self.connections = 0
        self.by_source: Counter = Counter()
        self.associations: set[Association] = set()
        #: Set when worker processes share the listener (see :class:`SharedAssociationCount`).
        self.shared_count: SharedAssociationCount | None = None

    # -- counting (called by the association)

    def connection_made(self, assoc: Association) -> None:
        self.connections += 1
        self.by_source[assoc.peer_address[0]] += 1

    def connection_lost(self, assoc: Association, state: str) -> None:
        self.connections -= 1
        host = assoc.peer_address[0]
        self.by_source[host] -= 1
        if self.by_source[host] <= 0:
            del self.by_source[host]
        self.associations.discard(assoc)
        if self.shared_count is not None:
            self.shared_count.set(len(self.associations))

    def association_established(self, assoc: Association) -> None:
        self.associations.add(assoc)
        if self.shared_count is not None:
            self.shared_count.set(len(self.associations))

    # -- negotiation

    def negotiate(self, assoc: Association, rq):
        """A-ASSOCIATE-RJ (result, source, reason) or (accepted contexts, extra user information items)."""
        if str(rq.application_context_name or "") != APPLICATION_CONTEXT:
            return REJECT_APPLICATION_CONTEXT
        if self.require_called_aet and assoc.called_aet != self.local_aet:
            return REJECT_CALLED_AET
        if self.allowed_calling_aets is not None and assoc.calling_aet not in self.allowed_calling_aets:
            return REJECT_CALLING_AET
        if self.identity_check is not None and assoc.user_identity is not None:
            if not self.identity_check(assoc, assoc.user_identity):
                return REJECT_IDENTITY
        if self.shared_count is not None:
            # Reserved now: an accepted negotiation is established in this same call.
            if not self.shared_count.reserve(len(self.associations), self.limits.max_associations):
                return REJECT_BUSY
        elif len(self.associations) >= self.limits.max_associations:
            return REJECT_BUSY
        roles = {}
        for item in rq.user_information:
            if isinstance(item, SCP_SCU_RoleSelectionNegotiation):
                roles[item.sop_class_uid] = (item.scu_role, item.scp_role)
        accepted, role_items = negotiate_as_acceptor(rq.presentation_context_definition_list,
                                                     self.supported_contexts, roles)
        return accepted, role_items


class AcceptorFactory(protocol.Factory):
    """Builds one :class:`Association` per accepted connection, within the connection caps."""

    def __init__(self, settings: AcceptorSettings, handler, reactor):
        self.settings = settings
        self.handler = handler
        self.reactor = reactor
        self.refused = 0

    def buildProtocol(self, addr):
        limits = self.settings.limits
        host = getattr(addr, "host", "")
        if (self.settings.connections >= limits.max_connections
                or self.settings.by_source.get(host, 0) >= limits.max_connections_per_source):
            # Refuse before any state exists: the connection is closed at once.
            self.refused += 1
            if self.refused == 1 or self.refused % 100 == 0:
                log.warn("dicom_scp {aet}: connection from {host} refused: connection limit reached "
                         "({refused} refused so far)", aet=self.settings.local_aet, host=host,
                         refused=self.refused)
            return None
        assoc = Association(self.settings, self.handler, self.reactor)
        assoc.factory = self
        return assoc
