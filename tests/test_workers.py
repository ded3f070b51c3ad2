"""``[proxy] workers = N``: a real twistd with worker processes sharing its socket."""

import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import pytest_twisted

from tests.harness import MINIMAL_MAIN, echo_pipeline, write_config
from tests.peers import free_port

BIN = Path(sys.executable).parent
ECHO = echo_pipeline()
SERVING = re.compile(r"worker (\d+) \(pid (\d+)\) serving default")


class Output:
    """Reads a process's output line by line, keeping everything read."""

    def __init__(self, proc):
        self.proc = proc
        self.lines = []

    def until(self, pattern, count=1):
        """Read until *pattern* has matched *count* lines (in total); return the matches."""
        regex = re.compile(pattern)
        matches = [m for m in map(regex.search, self.lines) if m]
        while len(matches) < count:
            line = self.proc.stdout.readline()
            if not line:
                pytest.fail(f"process exited before {pattern!r}:\n" + "".join(self.lines))
            self.lines.append(line)
            m = regex.search(line)
            if m:
                matches.append(m)
        return matches

    def text(self):
        return "".join(self.lines)


def get(port, path="/echo/x", context=None):
    scheme = "https" if context else "http"
    with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}{path}", timeout=30, context=context) as resp:
        return resp.status, resp.read()


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_workers_share_the_socket_restart_and_stop_with_twistd(tmp_path):
    port = free_port()
    main = MINIMAL_MAIN.replace("bind_port = 0", f"bind_port = {port}").replace(
        'log_level = "debug"', 'log_level = "info"\nworkers = 3')
    path = write_config(tmp_path, main, {"e": ECHO})
    proc = subprocess.Popen([str(BIN / "twistd"), "-n", "--pidfile=", "harmony", "-c", str(path)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = Output(proc)
    try:
        out.until(r"network default listening on")
        workers = {int(m[1]): int(m[2]) for m in out.until(SERVING.pattern, 2)}
        assert sorted(workers) == [1, 2] and proc.pid not in workers.values()
        assert get(port)[0] == 200

        # With the main process frozen, only the workers can accept: requests
        # still succeed, so they really serve the shared socket.
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            for _ in range(4):
                status, body = get(port, "/echo/frozen")
                assert status == 200 and b'"subpath":"/frozen"' in body
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        frozen = out.until(r"GET /echo/frozen 200", 4)
        assert all("[worker-" in m.string for m in frozen), [m.string for m in frozen]

        # A worker that dies is replaced.
        os.kill(workers[1], signal.SIGKILL)
        out.until(r"worker 1 exited unexpectedly .*signal 9.*restarting")
        restarted = {int(m[1]): int(m[2]) for m in out.until(SERVING.pattern, 3)}
        assert restarted[1] != workers[1]
        assert get(port)[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
        out.lines.append(rest)
    text = out.text()
    assert proc.returncode in (0, -signal.SIGTERM), text
    assert "Server Shut Down." in text
    assert "worker 1 stopped" in text and "worker 2 stopped" in text
    assert "Traceback" not in text
    for pid in list(workers.values()) + list(restarted.values()):
        assert not alive(pid), pid


def test_workers_value_is_checked(tmp_path):
    from harmony.config import ConfigErrors, load_config
    path = write_config(tmp_path, MINIMAL_MAIN.replace("[proxy]", "[proxy]\nworkers = 0"))
    with pytest.raises(ConfigErrors) as info:
        load_config(path)
    assert "[proxy.workers]: must be an integer 1-256, got 0" in str(info.value)


@pytest.mark.parametrize("tls", [False, True])
def test_worker_serves_adopted_socket_and_exits_when_parent_vanishes(tmp_path, tls):
    """Run a worker by hand with a pipe as stdin: it serves the socket it was
    given (with TLS for an ssl: network), and closing the pipe (the parent
    dying) stops it."""
    import socket
    import ssl

    from tests.web.test_network_harmony import self_signed
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    main = MINIMAL_MAIN.replace('log_level = "debug"', 'log_level = "info"')
    context = None
    if tls:
        self_signed(tmp_path)
        main = main.split("[network.default.http]")[0] + (
            f'[network.default]\nlisten = "ssl:0:interface=127.0.0.1:privateKey={tmp_path}/key.pem:'
            f'certKey={tmp_path}/cert.pem"\n')
        context = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
    path = write_config(tmp_path, main, {"e": ECHO})
    code = "import sys; from harmony.workers import worker_main; sys.exit(worker_main(sys.argv[1:]))"
    worker = subprocess.Popen([sys.executable, "-c", code, "-c", str(path), "--index", "7",
                               "--listen", f"default={sock.fileno()}:{int(sock.family)}"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, pass_fds=[sock.fileno()])
    out = Output(worker)
    try:
        out.until(r"worker 7 \(pid \d+\) serving default")
        status, body = get(sock.getsockname()[1], context=context)
        assert status == 200 and b'"subpath":"/x"' in body
        worker.stdin.close()
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
        sock.close()
    assert worker.returncode == 0


def test_systemd_socket_activation_with_workers(tmp_path):
    """twistd started the way systemd starts a socket-activated service (the socket
    as fd 3, LISTEN_FDS/LISTEN_PID set): the main process adopts it, and so do its workers."""
    import socket
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port = sock.getsockname()[1]
    main = MINIMAL_MAIN.split("[network.default.http]")[0].replace(
        'log_level = "debug"', 'log_level = "info"\nworkers = 2') + '[network.default]\nlisten = "systemd:domain=INET:index=0"\n'
    path = write_config(tmp_path, main, {"e": ECHO})
    fd = sock.fileno()

    def as_fd_3():
        os.dup2(fd, 3)
        os.set_inheritable(3, True)

    # LISTEN_PID must be twistd's own pid, known only in the child: let sh set it, then exec.
    proc = subprocess.Popen(["/bin/sh", "-c", 'export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=harmony.socket; exec "$0" "$@"', str(BIN / "twistd"),
                             "-n", "--pidfile=", "harmony", "-c", str(path)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=as_fd_3, close_fds=False)
    sock.close()  # only the server processes hold it now
    out = Output(proc)
    try:
        out.until(SERVING.pattern)
        assert get(port)[0] == 200
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            assert get(port, "/echo/via-worker")[0] == 200
        finally:
            os.kill(proc.pid, signal.SIGCONT)
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
        out.lines.append(rest)
    assert "[worker-1] GET /echo/via-worker 200" in out.text(), out.text()
    assert "Traceback" not in out.text()


@pytest_twisted.ensureDeferred
async def test_restart_workers_replaces_each_worker_and_stop_ends_them(tmp_path):
    """WorkerPool in this test's reactor: a rolling restart (what a hot reload uses)
    replaces each worker with a new process; stopping the service ends them all."""
    from twisted.internet import reactor

    from harmony.config import load_config
    from harmony.runtime import build_runtime
    from harmony.service import HarmonyService
    from harmony.workers import WorkerPool

    path = write_config(tmp_path, MINIMAL_MAIN.replace('log_level = "debug"', 'log_level = "info"'), {"e": ECHO})
    service = HarmonyService(build_runtime(load_config(path), reactor), reactor)
    pool = WorkerPool(path, 2, service, reactor)
    pool.setServiceParent(service)
    service.startService()
    try:
        await service.when_listening()
        before = {i: p.transport.pid for i, p in pool.processes.items()}
        assert sorted(before) == [1, 2]
        await pool.restart_workers()
        after = {i: p.transport.pid for i, p in pool.processes.items()}
        assert sorted(after) == [1, 2] and not set(before.values()) & set(after.values())
        assert pool._failures == {}  # a restart on purpose is not a crash
        ended = [p.ended for p in pool.processes.values()]
    finally:
        await service.stopService()
    assert all(d.called for d in ended) and pool.processes == {}
    for pid in list(before.values()) + list(after.values()):
        assert not alive(pid), pid


def test_workers_log_json_when_twistd_does(tmp_path):
    port = free_port()
    main = MINIMAL_MAIN.replace("bind_port = 0", f"bind_port = {port}").replace(
        'log_level = "debug"', 'log_level = "info"\nworkers = 2')
    path = write_config(tmp_path, main, {"e": ECHO})
    proc = subprocess.Popen([str(BIN / "twistd"), "-n", "--pidfile=", "--logger=harmony.log.json_stdout_observer",
                             "harmony", "-c", str(path)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = Output(proc)
    try:
        out.until(r'"log_format": "worker \{index\} \(pid \{pid\}\) serving \{networks\}"')
        assert get(port)[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
        out.lines.append(rest)
    import json
    records = [json.loads(line) for line in out.text().splitlines() if line.strip()]  # every line is JSON
    assert any(r.get("log_system") == "worker-1" and r.get("log_namespace") == "harmony.workers" for r in records)
