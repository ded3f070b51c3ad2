"""``[proxy] workers = N``: N processes serving the same listening sockets.

One Python process saturates one core long before a proxy's network does, so
the HTTP networks can be served by several processes.  The main process (the
one twistd runs) binds every network as usual, then starts ``N - 1`` worker
processes that inherit those sockets as file descriptors and adopt them with
``reactor.adoptStreamPort``; the kernel hands each new connection to whichever
process accepts it first.  Sharing the parent's sockets, rather than binding
again with ``SO_REUSEPORT``, keeps every listen form working unchanged: port 0,
``ssl:`` (workers wrap the adopted port in TLS with the same context) and
``systemd:`` socket activation.

The ``[network.*]`` web sites and the ``dicom_scp`` listeners run in workers
(a DIMSE listener's ``max_associations`` stays one limit across the processes:
see :class:`harmony.dicom.ul.acceptor.SharedAssociationCount`).  A separate
management listener stays in the main process.  Each process tells the store
which one it is (``HARMONY_WORKER``): temp files, crash markers and queue
leases are per process (harmony.storage.config).

Lifecycle: workers start once the main process listens, are restarted (with a
growing delay when they keep dying young) if they exit on their own, stop on
SIGTERM when the main process stops, and stop by themselves if the main process
disappears (their stdin is a pipe from it; EOF means the parent is gone).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

from twisted.application.service import Service
from twisted.internet import defer, fdesc
from twisted.internet.abstract import FileDescriptor
from twisted.internet.protocol import ProcessProtocol

from harmony import log as hlog
from harmony.compat.twisted import server_tls_options
from harmony.log import get_logger

log = get_logger("harmony.workers")

#: How long a stopping worker may take to finish before it is killed.
STOP_GRACE_SECS = 30.0
#: A worker that dies sooner than this after starting counts as failing to start.
STABLE_SECS = 10.0
MAX_RESTART_DELAY_SECS = 30.0
#: The environment variable that tells a process which worker it is (the main process: unset, 0).
WORKER_ENV = "HARMONY_WORKER"


class _WorkerProcess(ProcessProtocol):
    def __init__(self, pool: "WorkerPool", index: int):
        self.pool = pool
        self.index = index
        self.started = time.monotonic()
        self.ended: defer.Deferred[None] = defer.Deferred()

    def processEnded(self, reason):
        self.pool._ended(self, reason)
        self.ended.callback(None)


class WorkerPool(Service):
    """Starts, restarts and stops the worker processes of one HarmonyService."""

    def __init__(self, config_path, count: int, harmony, reactor, *, executable: str | None = None):
        self.setName("workers")
        self.config_path = str(config_path)
        self.count = count
        self.harmony = harmony
        self.reactor = reactor
        self.executable = executable or sys.executable
        self.processes: dict[int, _WorkerProcess] = {}
        self._failures: dict[int, int] = {}
        self._restarts: dict[int, object] = {}
        #: Workers being replaced on purpose (restart_workers), not after a crash.
        self._replacing: set[int] = set()

    def startService(self):
        super().startService()
        self.harmony.when_listening().addCallbacks(self._start_all, self._not_listening)

    def _not_listening(self, failure):
        log.critical("not starting workers: a network could not listen")
        return None

    def _start_all(self, _):
        for index in range(1, self.count + 1):
            self._spawn(index)

    def _inherited(self):
        """(network name, parent fd, address family) for every listening network."""
        out = []
        for name, net in self.harmony.networks.items():
            port = net.port
            if port is None:
                continue
            out.append((name, port.fileno(), port.socket.family))
        return out

    def _dimse_listeners(self) -> list:
        """The listening DIMSE endpoints (those that can be shared: see DicomScpEndpoint.share)."""
        return [ep for ep, _ in self.harmony.runtime.listeners()
                if hasattr(ep, "share") and getattr(ep, "listening", None) is not None]

    def _spawn(self, index: int):
        self._restarts.pop(index, None)
        if not self.running:
            return
        child_fds = {0: "w", 1: 1, 2: 2}
        args = [self.executable, "-c", "import sys; from harmony.workers import worker_main; "
                "sys.exit(worker_main(sys.argv[1:]))", "-c", self.config_path, "--index", str(index),
                "--log-format", hlog.stdout_format]
        for offset, (name, fd, family) in enumerate(self._inherited()):
            child_fd = 3 + offset
            child_fds[child_fd] = fd
            args += ["--listen", f"{name}={child_fd}:{int(family)}"]
        child_fd = len(child_fds)  # the next free one: 0-2 and the networks' are taken
        for ep in self._dimse_listeners():
            fd, family, count_fd = ep.share(self.count + 1)
            child_fds[child_fd], child_fds[child_fd + 1] = fd, count_fd
            args += ["--dimse", f"{ep.name}={child_fd}:{family}:{child_fd + 1}:{self.count + 1}"]
            child_fd += 2
        proc = _WorkerProcess(self, index)
        self.processes[index] = proc
        # systemd's socket-activation variables describe the parent's sockets, not ours.
        env = {k: v for k, v in os.environ.items() if k not in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")}
        env[WORKER_ENV] = str(index)
        self.reactor.spawnProcess(proc, self.executable, args, env=env, childFDs=child_fds)
        log.info("worker {index} started (pid {pid})", index=index, pid=proc.transport.pid)

    def _ended(self, proc: _WorkerProcess, reason):
        if self.processes.get(proc.index) is proc:
            del self.processes[proc.index]
        for ep in self._dimse_listeners():
            ep.worker_ended(proc.index)
        status = getattr(reason.value, "exitCode", None)
        signo = getattr(reason.value, "signal", None)
        if not self.running:
            log.info("worker {index} stopped (exit {status}, signal {signal})",
                     index=proc.index, status=status, signal=signo)
            return
        if proc.index in self._replacing:
            self._replacing.discard(proc.index)
            log.info("worker {index} stopped for a restart", index=proc.index)
            self._spawn(proc.index)
            return
        lived = time.monotonic() - proc.started
        failures = self._failures.get(proc.index, 0) + 1 if lived < STABLE_SECS else 0
        self._failures[proc.index] = failures
        delay = min(MAX_RESTART_DELAY_SECS, 0.5 * 2 ** failures)
        log.error("worker {index} exited unexpectedly (exit {status}, signal {signal}); restarting in {delay}s",
                  index=proc.index, status=status, signal=signo, delay=delay)
        self._restarts[proc.index] = self.reactor.callLater(delay, self._spawn, proc.index)

    @defer.inlineCallbacks
    def restart_workers(self):
        """Replace every worker, one at a time, so they re-read the configuration
        (a hot reload in the main process calls this).  The main process and the
        other workers keep serving the shared socket meanwhile, so no connection
        is refused.  Fires once every worker has been replaced."""
        for index in sorted(self.processes):
            proc = self.processes.get(index)
            if proc is None or not self.running:
                continue
            self._replacing.add(index)
            proc.transport.signalProcess("TERM")
            yield proc.ended

    def stopService(self):
        super().stopService()
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        waiting = []
        for proc in list(self.processes.values()):
            try:
                proc.transport.signalProcess("TERM")
            except Exception:  # noqa: BLE001 - already gone
                continue
            killer = self.reactor.callLater(STOP_GRACE_SECS, self._kill, proc)
            proc.ended.addBoth(lambda _, k=killer: k.cancel() if k.active() else None)
            waiting.append(proc.ended)
        return defer.DeferredList(waiting)

    def _kill(self, proc):
        log.warn("worker {index} did not stop within {grace}s; killing it", index=proc.index, grace=STOP_GRACE_SECS)
        try:
            proc.transport.signalProcess("KILL")
        except Exception:  # noqa: BLE001
            pass


# ------------------------------------------------------------------ worker side


class _ParentWatch(FileDescriptor):
    """Reads the pipe from the parent; EOF means the parent is gone."""

    def __init__(self, reactor, fd: int, on_lost):
        super().__init__(reactor)
        self.fd = fd
        self.on_lost = on_lost
        fdesc.setNonBlocking(fd)

    def fileno(self):
        return self.fd

    def doRead(self):
        return fdesc.readFromFD(self.fd, lambda data: None)

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.on_lost()


def adopt_port(reactor, description: str, fd: int, family: int, factory):
    """Adopt an inherited listening socket, with TLS when *description* is ``ssl:``."""
    from twisted.internet.endpoints import SSL4ServerEndpoint, serverFromString
    # Only ssl: needs anything from the description (its TLS context); others,
    # systemd: above all (its sockets belong to the parent), are not parsed.
    endpoint = serverFromString(reactor, description) if description.lstrip().startswith("ssl:") else None
    if isinstance(endpoint, SSL4ServerEndpoint):
        from twisted.protocols.tls import TLSMemoryBIOFactory
        factory = TLSMemoryBIOFactory(server_tls_options(endpoint), False, factory)
    # A blocking listening socket would block the reactor in accept() once
    # another process took the connection; the parent's is non-blocking already.
    fdesc.setNonBlocking(fd)
    port = reactor.adoptStreamPort(fd, family, factory)
    os.close(fd)  # adoptStreamPort dup()s it
    return port


def _worker_service(runtime, reactor, fds: dict, dimse: dict | None = None, index: int = 0):
    """The HarmonyService of a worker: its networks and DIMSE endpoints adopt
    the inherited sockets, and a separate management listener stays in the
    main process."""
    from harmony.service import HarmonyService
    from harmony.web.network import NetworkService, network_http_table
    from harmony.web.router import PrefixRouter

    class AdoptedNetworkService(NetworkService):
        def listen(self):
            fd, family = fds[self.network]
            return defer.maybeDeferred(adopt_port, self.reactor, self.description, fd, family, self.site)

    class WorkerService(HarmonyService):
        def add_network(self, name, listen, runtime):
            svc = AdoptedNetworkService(name, listen, PrefixRouter(name, runtime.routes.get(name, [])),
                                        self.reactor)
            svc.site.apply_settings(network_http_table(runtime, name))
            svc.setServiceParent(self)
            self.networks[name] = svc
            return svc

        def set_management(self, settings):
            self.management_settings = settings
            return False

    runtime.config.networks = {n: net for n, net in runtime.config.networks.items() if n in fds}
    dimse = dimse or {}
    listeners = [(ep, pipe) for ep, pipe in runtime.listeners() if ep.name in dimse]
    for ep, _ in listeners:
        fd, family, count_fd, slots = dimse[ep.name]
        ep.inherited = (fd, family, count_fd, slots, index)
    runtime.listeners = lambda: listeners
    return WorkerService(runtime, reactor)


def _log_to_stdout(tag: str, fmt: str):
    from twisted.logger import globalLogBeginner, textFileLogObserver

    out = hlog.json_stdout_observer() if fmt == "json" else textFileLogObserver(sys.stdout)

    def observer(event):
        if not event.get("log_system") or event.get("log_system") == "-":
            event = {**event, "log_system": tag}
        out(event)

    # Any callable observes; the stub asks for ILogObserver, a zope interface mypy cannot match.
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)  # type: ignore[list-item]


def worker_main(argv) -> int:
    """Entry point of a worker process (started by :class:`WorkerPool`)."""
    import argparse

    parser = argparse.ArgumentParser(prog="harmony-worker")
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--listen", action="append", default=[], help="NETWORK=FD:FAMILY")
    parser.add_argument("--dimse", action="append", default=[], help="ENDPOINT=FD:FAMILY:COUNT_FD:SLOTS")
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    args = parser.parse_args(argv)
    fds = {}
    for spec in args.listen:
        name, _, rest = spec.partition("=")
        fd, _, family = rest.partition(":")
        fds[name] = (int(fd), socket.AddressFamily(int(family)))
    dimse = {}
    for spec in args.dimse:
        name, _, rest = spec.partition("=")
        fd, family, count_fd, slots = (int(v) for v in rest.split(":"))
        dimse[name] = (fd, family, count_fd, slots)
    os.environ.setdefault(WORKER_ENV, str(args.index))

    from twisted.internet import reactor

    from harmony.config import ConfigErrors
    from harmony.runtime import load_runtime

    _log_to_stdout(f"worker-{args.index}", args.log_format)
    try:
        runtime = load_runtime(args.config, reactor)
    except ConfigErrors as e:
        sys.stderr.write(f"harmony worker {args.index}: not starting, {e.render()}\n")
        return 1
    service = _worker_service(runtime, reactor, fds, dimse, args.index)

    stopping: list[bool] = []

    def stop():
        if not stopping:
            stopping.append(True)
            reactor.stop()

    def on_signal(signo, frame):
        reactor.callFromThread(stop)

    watch = _ParentWatch(reactor, 0, stop)

    def started():
        from harmony.service import settle_heap
        settle_heap()   # before the shared sockets are adopted, as harmony.tap does before it listens
        service.startService()
        watch.startReading()

        def up(_):
            from harmony.compat.twisted import lean_io, lean_poll
            lean_poll(reactor, runtime.config.proxy.poll_spin_us / 1e6)
            lean_io()
            log.info("worker {index} (pid {pid}) serving {networks}", index=args.index, pid=os.getpid(),
                     networks=", ".join(sorted(fds) + [f"dimse:{name}" for name in sorted(dimse)]))

        def down(failure):
            log.critical("worker {index} cannot serve: {error}", index=args.index, error=failure.getErrorMessage())
            stop()

        service.when_listening().addCallbacks(up, down)

    reactor.callWhenRunning(started)
    # IReactorCore's methods are declared without self (zope style), which mypy
    # misreads without the mypy-zope plug-in: hence the two ignores below.
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)  # type: ignore[arg-type]
    # Our own handlers: a terminal's Ctrl-C or `timeout` signals the whole
    # process group and the parent then sends TERM too; stop once, quietly.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reload is the main process's business
    reactor.run(installSignalHandlers=False)  # type: ignore[misc,call-arg]
    return 0
