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
socket; ``max_associations`` and both connection caps stay one limit each for
the listener through a :class:`SharedAssociationCount` (a small file every
process maps, counted under a lock; docs/endpoints/dicom_scp.md).  That lock is
never waited for on the reactor: a check that finds it taken by another process
is retried from the reactor, and the connection waits (unread) for the answer.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
import tempfile
from collections import Counter, deque

import attr
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor
from twisted.internet import defer, protocol, tcp
from twisted.internet.posixbase import PosixReactorBase
from twisted.python.failure import Failure

from harmony.dicom.ul.association import CLOSED, Association, BoundedCache, Reject
from harmony.dicom.ul.proposal import Proposal
from harmony.dicom.ul.storage import can_compress
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
    """The counts one listener's limits are checked against, shared by the processes serving its socket.

    ``max_associations``, ``max_connections`` and ``max_connections_per_source`` are each one limit
    for the port, however the kernel spreads connections over the processes.  One small file, mapped
    by every process, holds:

    - per process (the main process is slot 0, worker *i* slot *i*): its associations, its
      connections and the pid serving the slot (0: none), three 8-byte fields; the pids and the
      connection counts also steer which process accepts the next connection (:class:`BalancedPort`);
    - a table of the source addresses that have connections open, each with one 4-byte count per
      process: open addressing with linear probing, keyed by a keyed 16-byte digest of the address
      (the key is random per listener, so a peer cannot pick addresses that collide), an entry
      removed with backward shift when its last connection closes, so lookups stay short however
      many sources came and went.  It has twice as many entries as ``max_connections`` allows
      sources, so it is never full.

    Every check-and-count runs under an exclusive ``flock`` on the file, taken through a
    descriptor each count opens for itself (``/proc/self/fd``): a ``flock`` belongs to an open file
    description, so the inherited descriptor, which every process shares, could not exclude
    anyone, while a private one excludes every other count -- another process's, or a second
    count in this process (the tests).  POSIX ``lockf`` records would not do that, and closing any
    descriptor of the file would drop them.  A process killed with -9 closes its description, so
    its lock goes with it.

    The lock is never waited for on the reactor (a process stopped inside its few microseconds of
    counting would otherwise stop every other process's reactor): each check tries it without
    blocking and, when another process holds it, queues itself; the queue is retried from the
    reactor with a short backoff (1 ms doubling to 20 ms) and runs in order once the lock is
    free.  A check that needs an answer (a connection to admit, an association to reserve) then
    returns a Deferred, and gives up with :class:`CountBusy` after :attr:`LOCK_WAIT_SECS`: the
    connection is refused rather than left hanging.  Counts given back (closed connections, a
    dead worker's) wait in the queue as long as needed: until then the limits are only stricter.

    A process writes only its own counters and its own column of the table.  A process killed
    with -9 leaves its counts behind: the main process clears them when the worker ends (and
    rebuilds the table without its column), and the restarted worker starts from zero, so a crash
    never shrinks a limit.
    """

    #: How long a connection (or an association request) waits for the lock before it is refused.
    LOCK_WAIT_SECS = 2.0
    FIRST_RETRY_SECS = 0.001
    MAX_RETRY_SECS = 0.02

    HEADER = struct.Struct("<8sq16sq")         # magic, table entries, digest key, pid holding the lock
    HOLDER_AT = 32
    MAGIC = b"HMYDIMS3"
    SLOT = struct.Struct("<qqq")               # associations, connections, pid serving the slot (0: none)

    def __init__(self, fd: int, slots: int, slot: int, reactor=None):
        #: The descriptor handed to worker processes (the main process) or inherited (a worker).
        self.fd = fd
        self.slots = slots
        self.slot = slot
        self.reactor = reactor
        #: Our own open file description of the file: the lock is taken through it.
        self._lock_fd = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
        #: Work waiting for the lock: (function, Deferred for its result or None), in order.
        self._waiting: deque = deque()
        self._retry = None
        self._retry_secs = self.FIRST_RETRY_SECS
        # pread: the file offset is shared with every process holding the descriptor.
        magic, entries, secret, _holder = self.HEADER.unpack(os.pread(fd, self.HEADER.size, 0))
        if magic != self.MAGIC:
            raise ValueError("not a shared listener count file")
        self.entries = entries
        self.mask = entries - 1
        self.secret = secret
        self.entry = struct.Struct(f"<16s{slots}i")
        self.slots_at = self.HEADER.size
        self.table_at = self.slots_at + self.SLOT.size * slots
        self._map = mmap.mmap(self._lock_fd, self.size(slots, entries))
        self.set(0)
        self.set_connections(0)

    @classmethod
    def size(cls, slots: int, entries: int) -> int:
        return cls.HEADER.size + cls.SLOT.size * slots + struct.calcsize(f"<16s{slots}i") * entries

    @classmethod
    def create(cls, slots: int, max_connections: int = 512, reactor=None) -> "SharedAssociationCount":
        """A new count for *slots* processes, held by the main process (slot 0)."""
        entries = 1 << max(4, (2 * max_connections).bit_length())
        handle = tempfile.TemporaryFile(prefix="harmony-dimse-")
        fd = os.dup(handle.fileno())
        handle.close()
        os.ftruncate(fd, cls.size(slots, entries))
        os.pwrite(fd, cls.HEADER.pack(cls.MAGIC, entries, os.urandom(16), 0), 0)
        os.set_inheritable(fd, False)
        return cls(fd, slots, 0, reactor)

    # -- the per-process counters

    def _counter(self, slot: int, field: int) -> int:
        return struct.unpack_from("<q", self._map, self.slots_at + slot * self.SLOT.size + 8 * field)[0]

    def _set_counter(self, slot: int, field: int, value: int) -> None:
        struct.pack_into("<q", self._map, self.slots_at + slot * self.SLOT.size + 8 * field, value)

    def total(self) -> int:
        """Associations of the listener, every process counted."""
        return sum(self._counter(i, 0) for i in range(self.slots))

    def connections(self) -> int:
        """TCP connections of the listener, every process counted."""
        return sum(self._counter(i, 1) for i in range(self.slots))

    def set(self, count: int, slot: int | None = None) -> None:
        """Our (or *slot*'s) association count."""
        self._set_counter(self.slot if slot is None else slot, 0, count)

    def set_connections(self, count: int) -> None:
        self._set_counter(self.slot, 1, count)

    def serving(self, serving: bool = True) -> None:
        """Mark our slot as served by this process (or no longer): only served slots are
        left connections to (:meth:`busier_than_another`)."""
        if self._map.closed:  # the port closing after the count (a stop's order is not fixed)
            return
        self._set_counter(self.slot, 2, os.getpid() if serving else 0)

    def busier_than_another(self) -> bool:
        """Whether this process holds more connections of the listener than another process
        serving it does (read without the lock: a hint for who should accept next)."""
        mine = self._counter(self.slot, 1)
        return any(self._counter(i, 1) < mine for i in range(self.slots)
                   if i != self.slot and self._counter(i, 2))

    def reserve(self, limit: int):
        """Count one more association of ours unless the listener already has *limit*;
        atomic across the processes.  A bool, or a Deferred for it when another process
        holds the lock (:class:`CountBusy` after :attr:`LOCK_WAIT_SECS`)."""
        def work() -> bool:
            if self.total() >= limit:
                return False
            self.set(self._counter(self.slot, 0) + 1)
            return True
        return self._when_locked(work, self.LOCK_WAIT_SECS)

    # -- connections, in total and by source address

    def admit(self, host: str, max_connections: int, max_per_source: int):
        """Count a new connection from *host* in our slot unless the listener already
        has *max_connections*, or *max_per_source* from *host*; atomic across the processes.
        A bool, or a Deferred for it as :meth:`reserve`."""
        key = self._key(host)

        def work() -> bool:
            if self.connections() >= max_connections:
                return False
            index, free = self._find(key)
            if index is not None and sum(self._counts(index)) >= max_per_source:
                return False
            if index is None:
                if free < 0:
                    return False  # only if max_connections grew past the table's size (a reload)
                index = free
                self._write(index, key, [0] * self.slots)
            self._add(index, 1)
            self._set_counter(self.slot, 1, self._counter(self.slot, 1) + 1)
            return True
        return self._when_locked(work, self.LOCK_WAIT_SECS)

    def count_existing(self, host: str, count: int) -> None:
        """Count *count* connections from *host* this process held before sharing began."""
        key = self._key(host)

        def work() -> None:
            index, free = self._find(key)
            if index is None:
                if free < 0:
                    return
                index = free
                self._write(index, key, [0] * self.slots)
            self._add(index, count)
            self._set_counter(self.slot, 1, self._counter(self.slot, 1) + count)
        self._when_locked(work)

    def release(self, host: str) -> None:
        """One connection of ours from *host* has closed (counted now, or once the lock is free)."""
        key = self._key(host)

        def work() -> None:
            self._set_counter(self.slot, 1, max(0, self._counter(self.slot, 1) - 1))
            index, _ = self._find(key)
            if index is None:
                return
            counts = self._counts(index)
            if counts[self.slot] > 0:
                self._add(index, -1)
                counts[self.slot] -= 1
            if not any(counts):
                self._remove(index)
        self._when_locked(work)

    def from_source(self, host: str) -> int:
        """Connections from *host* open on the listener, every process counted."""
        index, _ = self._find(self._key(host))
        return 0 if index is None else sum(self._counts(index))

    def clear(self, slot: int) -> None:
        """*slot*'s process is gone: none of its associations or connections count (main process)."""
        self._set_counter(slot, 2, 0)  # at once: no process waits for a dead one to accept

        def work() -> None:
            self._set_counter(slot, 0, 0)
            self._set_counter(slot, 1, 0)
            kept = []
            for index in range(self.entries):
                key, *counts = self.entry.unpack_from(self._map, self._at(index))
                if key != _EMPTY:
                    counts[slot] = 0
                    if any(counts):
                        kept.append((key, counts))
                    self._write(index, _EMPTY, [0] * self.slots)
            for key, counts in kept:
                self._write(self._find(key)[1], key, counts)
        self._when_locked(work)

    def close(self) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        self._waiting.clear()
        self.serving(False)
        self._map.close()
        os.close(self._lock_fd)
        os.close(self.fd)

    # -- the lock, never waited for

    def try_lock(self) -> bool:
        """Take the lock if no other count holds it; never blocks."""
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        struct.pack_into("<q", self._map, self.HOLDER_AT, os.getpid())  # who to name if it is held too long
        return True

    def unlock(self) -> None:
        struct.pack_into("<q", self._map, self.HOLDER_AT, 0)
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def holder(self) -> int:
        """The pid that last took the lock and has not given it back (0: none)."""
        return struct.unpack_from("<q", self._map, self.HOLDER_AT)[0]

    def _when_locked(self, work, wait: float | None = None):
        """*work()*'s result if the lock is free now (and nothing of ours waits before it);
        otherwise a Deferred for it, fired once the lock is ours, in order.  With *wait*,
        the Deferred fails with :class:`CountBusy` after that many seconds (and *work* never
        runs); without, the work waits as long as it takes."""
        if not self._waiting and self.try_lock():
            try:
                return work()
            finally:
                self.unlock()
        entry = [work, None]

        def give_up(d):
            entry[0] = None            # still queued: skipped when the lock comes
        d: defer.Deferred = defer.Deferred(give_up)
        entry[1] = d
        self._waiting.append(entry)
        if self._retry is None:
            self._retry = self._reactor().callLater(self._retry_secs, self._run_waiting)
        if wait is None:
            d.addErrback(lambda f: log.failure("dicom_scp: a shared count update failed", f))
            return d
        d.addTimeout(wait, self._reactor(), onTimeoutCancel=lambda result, timeout: _busy(timeout, self.holder()))
        return d

    def _run_waiting(self) -> None:
        self._retry = None
        if not self.try_lock():
            self._retry_secs = min(self._retry_secs * 2, self.MAX_RETRY_SECS)
            self._retry = self._reactor().callLater(self._retry_secs, self._run_waiting)
            return
        self._retry_secs = self.FIRST_RETRY_SECS
        done = []
        try:
            while self._waiting:
                work, d = self._waiting.popleft()
                if work is None:
                    continue
                try:
                    done.append((d, work()))
                except Exception:
                    done.append((d, Failure()))
        finally:
            self.unlock()
        # Fired with the lock given back: what they start may count again at once.
        for d, result in done:
            d.callback(result)

    def _reactor(self):
        if self.reactor is None:
            from twisted.internet import reactor
            self.reactor = reactor
        return self.reactor

    # -- the table

    def _key(self, host: str) -> bytes:
        return hashlib.blake2b(host.encode("utf-8", "replace"), digest_size=16, key=self.secret).digest()

    def _at(self, index: int) -> int:
        return self.table_at + index * self.entry.size

    def _key_at(self, index: int) -> bytes:
        return bytes(self._map[self._at(index):self._at(index) + 16])

    def _counts(self, index: int) -> list[int]:
        return list(self.entry.unpack_from(self._map, self._at(index))[1:])

    def _write(self, index: int, key: bytes, counts) -> None:
        self.entry.pack_into(self._map, self._at(index), key, *counts)

    def _add(self, index: int, delta: int) -> None:
        at = self._at(index) + 16 + 4 * self.slot
        struct.pack_into("<i", self._map, at, struct.unpack_from("<i", self._map, at)[0] + delta)

    def _home(self, key: bytes) -> int:
        return int.from_bytes(key[:8], "little") & self.mask

    def _find(self, key: bytes) -> tuple[int | None, int]:
        """(the entry holding *key* or None, the empty entry where it would go, -1 if none)."""
        index = self._home(key)
        for _ in range(self.entries):
            found = self._key_at(index)
            if found == key:
                return index, index
            if found == _EMPTY:
                return None, index
            index = (index + 1) & self.mask
        return None, -1

    def _remove(self, index: int) -> None:
        """Empty *index*, moving later entries of its probe run back (no tombstones)."""
        hole = index
        probe = index
        for _ in range(self.entries - 1):  # a full table has no empty entry to stop at
            probe = (probe + 1) & self.mask
            key = self._key_at(probe)
            if key == _EMPTY:
                break
            home = self._home(key)
            # The entry at *probe* may move into the hole unless its home lies
            # cyclically in (hole, probe]: then it is already as close as it can be.
            if (hole < probe and hole < home <= probe) or (hole > probe and (home > hole or home <= probe)):
                continue
            self._write(hole, key, self._counts(probe))
            hole = probe
        self._write(hole, _EMPTY, [0] * self.slots)


_EMPTY = bytes(16)


class CountBusy(Exception):
    """The shared count stayed locked by another process for longer than a connection may wait."""


def _busy(timeout: float, holder: int):
    raise CountBusy(f"the listener's shared count stayed locked by another process (pid {holder}) for "
                    f"{timeout:g} s")


class BalancedPort(tcp.Port):
    """A listening port that, once processes share it, spreads connections evenly over them.

    Every process serving a shared listening socket is woken for each new connection
    (epoll, level-triggered), and Twisted's port accepts as many as are waiting in one go:
    four modalities connecting together mostly landed 3 + 1 or 4 + 0 on two processes
    (bench/ingest, associations counted per pid), so one process did most of the work while
    the other idled.  Shared (:meth:`share`), this port takes one connection a wake-up, and
    a process that holds more connections than another serving process leaves the waiting
    connection to the others for :attr:`YIELD_SECS` -- then takes it itself if it is still
    there, so a busy or stopped peer process delays a connection by that much, never more;
    after :attr:`TAKEN_BACK` such take-backs in a row it accepts without waiting for
    :attr:`NOT_ACCEPTING_SECS`.
    Before sharing begins (and in a single process) it is Twisted's port unchanged.
    """

    #: How long a process holding more than its share leaves a waiting connection to the others:
    #: long enough for a runnable process to be scheduled on a loaded machine (5 ms was not, at
    #: a load of 6 on two cores: 3 + 1 again in two rounds of six), short next to an association's
    #: set-up by a modality.
    YIELD_SECS = 0.05
    #: After TAKEN_BACK connections in a row left to the others had to be taken back, how long
    #: this process stops leaving connections to them: a stuck (not dead) process would otherwise
    #: hold the port to one accept per YIELD_SECS.  One take-back alone (the other process was
    #: late, on a loaded machine) does not: the next connection of a burst is left to it again.
    TAKEN_BACK = 3
    NOT_ACCEPTING_SECS = 1.0

    shared: SharedAssociationCount | None = None
    _resume = None
    _taken_back = 0
    _others_not_accepting_until = 0.0

    def share(self, shared: SharedAssociationCount) -> None:
        """Balance accepts against the other processes counted in *shared*."""
        self.shared = shared
        shared.serving(True)

    def doRead(self):
        shared = self.shared
        if shared is None:
            return super().doRead()
        if shared.busier_than_another() and self.reactor.seconds() >= self._others_not_accepting_until:
            self.stopReading()
            self._resume = self.reactor.callLater(self.YIELD_SECS, self._take_what_is_left)
            return None
        return self._accept_one()

    def _accept_one(self):
        self.numberAccepts = 1  # tcp.Port grows it after a full round
        return super().doRead()

    def _take_what_is_left(self) -> None:
        self._resume = None
        if self.connected and not self.disconnecting:
            taken = self.sessionno
            self._accept_one()   # EAGAIN (nothing) when another process took it meanwhile
            if self.sessionno == taken:
                self._taken_back = 0
            else:                # nobody else did
                self._taken_back += 1
                if self._taken_back >= self.TAKEN_BACK:
                    self._taken_back = 0
                    self._others_not_accepting_until = self.reactor.seconds() + self.NOT_ACCEPTING_SECS
            self.startReading()

    def connectionLost(self, reason):
        if self._resume is not None and self._resume.active():
            self._resume.cancel()
        self._resume = None
        if self.shared is not None:
            self.shared.serving(False)
        return super().connectionLost(reason)


def listen_balanced(reactor, port: int, factory, *, backlog: int, interface: str, tls=None):
    """``reactor.listenTCP``/``listenSSL``, with a :class:`BalancedPort` where the reactor is a
    real one (a test's memory reactor gets its own fake port)."""
    if tls is not None:
        from twisted.protocols.tls import TLSMemoryBIOFactory
        if not isinstance(reactor, PosixReactorBase):
            return reactor.listenSSL(port, factory, tls, backlog=backlog, interface=interface)
        factory = TLSMemoryBIOFactory(tls, False, factory)
    elif not isinstance(reactor, PosixReactorBase):
        return reactor.listenTCP(port, factory, backlog=backlog, interface=interface)
    listening = BalancedPort(port, factory, backlog, interface, reactor)
    listening.startListening()
    return listening


def adopt_balanced(reactor, fd: int, family: int, factory, shared: SharedAssociationCount) -> BalancedPort:
    """Serve an inherited listening socket *fd* (a worker process), balanced through *shared*.
    *fd* is duplicated: the caller closes its own."""
    listening = BalancedPort._fromListeningDescriptor(reactor, fd, family, factory)
    listening.startListening()
    listening.share(shared)
    return listening


class AcceptorSettings:
    """What an :class:`~.association.Association` asks its listener: limits, timers and negotiation."""

    def __init__(self, local_aet: str, contexts: list[PresentationContext], limits: AcceptorLimits, *,
                 allowed_calling_aets=None, require_called_aet: bool = True, identity_check=None,
                 honour_compressed_preference: bool = False):
        self.local_aet = local_aet
        self.supported_contexts = contexts
        self.limits = limits
        self.allowed_calling_aets = set(allowed_calling_aets) if allowed_calling_aets else None
        self.require_called_aet = require_called_aet
        self.identity_check = identity_check
        #: A C-GET requestor's storage contexts (SCP role) take its first syntax when
        #: that is a compressed one Harmony can produce (ul.storage.can_compress).
        self.honour_compressed_preference = honour_compressed_preference
        self.max_pdu = limits.max_pdu
        self.acse_timeout = limits.acse_timeout
        self.dimse_timeout = limits.dimse_timeout
        self.network_timeout = limits.network_timeout
        self.connections = 0
        #: Negotiation results and the A-ASSOCIATE-AC bytes, by the proposal's key (its
        #: presentation contexts and role selections as sent): clients ask with the same
        #: proposal every time, and a site's modalities mostly with one (harmony.dicom.ul.proposal).
        self.negotiated = BoundedCache()
        self.accept_pdus = BoundedCache()
        self.by_source: Counter = Counter()
        self.associations: set[Association] = set()
        #: Set when worker processes share the listener (see :class:`SharedAssociationCount`).
        self.shared_count: SharedAssociationCount | None = None

    # -- counting (called by the factory and the association)

    def admit(self, host: str):
        """Whether a new connection from *host* is within the connection caps.  When
        processes share the listener it is counted there at once (check and count under
        one lock) and given back in :meth:`connection_lost`; if another process holds
        that lock, the answer is a Deferred (None, logged, when the lock stays taken)."""
        limits = self.limits
        if self.shared_count is not None:
            admitted = self.shared_count.admit(host, limits.max_connections, limits.max_connections_per_source)
            if isinstance(admitted, defer.Deferred):
                admitted.addErrback(self._count_busy, "connection from", host, None)
            return admitted
        return self.connections < limits.max_connections and self.by_source.get(host, 0) < \
            limits.max_connections_per_source

    def _count_busy(self, failure, what: str, host: str, answer):
        failure.trap(CountBusy)
        log.warn("dicom_scp {aet}: {what} {host} refused: {reason}", aet=self.local_aet, what=what, host=host,
                 reason=str(failure.value))
        return answer

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
            shared = self.shared_count
            admission = assoc.admission
            if admission is None:
                shared.release(host)
            else:  # admitted after a wait, refused, or still waiting: give back only what was counted
                admission.addCallback(lambda admitted: shared.release(host) if admitted else None)
            shared.set(len(self.associations))

    def association_established(self, assoc: Association) -> None:
        self.associations.add(assoc)
        if self.shared_count is not None:
            self.shared_count.set(len(self.associations))

    def association_ended(self, assoc: Association) -> None:
        """Released or aborted: it stops counting against ``max_associations`` now,
        while its connection may still wait a moment for the peer's close (Sta13)."""
        if assoc in self.associations:
            self.associations.discard(assoc)
            if self.shared_count is not None:
                self.shared_count.set(len(self.associations))

    def share_counts(self, shared: SharedAssociationCount) -> None:
        """From now on count against *shared*, the listener's counts across processes;
        what this process holds already is counted there first."""
        shared.set(len(self.associations))
        for host, count in self.by_source.items():
            shared.count_existing(host, count)
        self.shared_count = shared

    # -- negotiation

    def negotiate(self, assoc: Association, proposal: Proposal):
        """A-ASSOCIATE-RJ (result, source, reason) or (accepted contexts, extra user information items)."""
        rq = proposal.primitive
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
            reserved = self.shared_count.reserve(self.limits.max_associations)
            if isinstance(reserved, defer.Deferred):   # another process holds the count: answered later
                reserved.addErrback(self._count_busy, "association request from", assoc.peer_address[0], False)
                return reserved.addCallback(self._reserved, assoc, proposal)
            if not reserved:
                return REJECT_BUSY
        elif len(self.associations) >= self.limits.max_associations:
            return REJECT_BUSY
        return self._contexts(proposal)

    def _reserved(self, reserved: bool, assoc: Association, proposal: Proposal):
        if not reserved:
            return REJECT_BUSY
        if assoc.state == CLOSED:
            # The peer left while we waited: the reservation is not an association.
            self.shared_count.set(len(self.associations))
            return REJECT_BUSY
        return self._contexts(proposal)

    def _contexts(self, proposal: Proposal):
        known = self.negotiated.get(proposal.key)
        if known is None:
            known = self._negotiate_contexts(proposal.primitive)
            self.negotiated.put(proposal.key, known)
        return known

    def _negotiate_contexts(self, rq):
        roles = {}
        for item in rq.user_information:
            if isinstance(item, SCP_SCU_RoleSelectionNegotiation):
                roles[item.sop_class_uid] = (item.scu_role, item.scp_role)
        accepted, role_items = negotiate_as_acceptor(rq.presentation_context_definition_list,
                                                     self.supported_contexts, roles)
        if self.honour_compressed_preference:
            self._prefer_compressed(rq.presentation_context_definition_list, accepted, roles)
        return accepted, role_items

    def _prefer_compressed(self, proposed, accepted, roles) -> None:
        """pynetdicom picks the first syntax in *our* order (uncompressed first); a
        C-GET client that put a lossless compressed syntax first gets that one."""
        first = {cx.context_id: str(cx.transfer_syntax[0]) for cx in proposed if cx.transfer_syntax}
        ours = {str(cx.abstract_syntax): {str(ts) for ts in cx.transfer_syntax} for cx in self.supported_contexts}
        for cx in accepted:
            wanted = first.get(cx.context_id)
            if (cx.result == 0x00 and wanted and str(cx.transfer_syntax[0]) != wanted
                    and roles.get(cx.abstract_syntax, (None, None))[1] and wanted in ours.get(
                        str(cx.abstract_syntax), ()) and can_compress(wanted)):
                cx.transfer_syntax = [wanted]


class AcceptorFactory(protocol.Factory):
    """Builds one :class:`Association` per accepted connection, within the connection caps."""

    def __init__(self, settings: AcceptorSettings, handler, reactor):
        self.settings = settings
        self.handler = handler
        self.reactor = reactor
        self.refused = 0

    def buildProtocol(self, addr):
        host = getattr(addr, "host", "")
        admitted = self.settings.admit(host)
        if admitted is False:
            # Refuse before any state exists: the connection is closed at once.
            self.refused += 1
            if self.refused == 1 or self.refused % 100 == 0:
                log.warn("dicom_scp {aet}: connection from {host} refused: connection limit reached "
                         "({refused} refused so far)", aet=self.settings.local_aet, host=host,
                         refused=self.refused)
            return None
        assoc = Association(self.settings, self.handler, self.reactor)
        assoc.factory = self
        if admitted is not True:
            # Another process holds the shared count: the connection is read once admitted.
            assoc.admission = admitted
        return assoc
