"""harmony.web.sendfile: multipart bodies of files on real loopback sockets.

Each test serves a real twisted.web Site through ``write_response`` and reads
it with a real client: python requests, curl, or a raw socket in a thread for
the hostile cases.  The checks cover the bytes on the wire, the path taken
(``FileBody.spliced``), what happens on a slow or vanishing client, TLS, gzip
and HEAD.
"""

from __future__ import annotations

import gzip
import os
import shutil
import socket
import struct
import subprocess
from pathlib import Path

import pytest
import pytest_twisted
import requests
from twisted.internet import defer, reactor, threads
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import TaskStopped, deferLater
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from harmony.dicomweb.multipart import MultipartWriter, Part, StowParser
from harmony.envelope import ResponseEnvelope
from harmony.web import sendfile
from harmony.web.bridge import write_response
from tests.web.test_network_harmony import self_signed

SAFETY = 20.0  # seconds: a guard against hanging for ever, never a synchronisation


async def until(condition, what: str):
    """Let the reactor turn until *condition()* holds (bounded by SAFETY)."""
    deadline = reactor.seconds() + SAFETY
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.005, lambda: None)


class Files(Resource):
    """Answers every GET with a multipart body of *paths* (a MultipartWriter)."""

    isLeaf = True

    def __init__(self, paths, part_type="application/dicom", later=False, kind="file"):
        super().__init__()
        self.paths = list(paths)
        #: "file"; "memory": each file's bytes as three buffers (Part.buffers); "staged":
        #: a file its release deletes (Part.staged).
        self.kind = kind
        #: Each part arrives in a later reactor turn (as from a PACS or the deidentify middleware).
        self.later = later
        self.part_type = part_type
        self.writers: list[MultipartWriter] = []
        self.done: list[defer.Deferred] = []
        self.lost: list = []
        self.asked = 0
        self.released = 0
        self.stopped = 0

    def _release(self):
        self.released += 1

    def _part(self, path):
        if self.kind == "memory":
            data = memoryview(path.read_bytes())
            third = len(data) // 3
            return Part("application/dicom", buffers=[data[:third], data[third:2 * third], data[2 * third:]],
                        release=self._release)
        if self.kind == "staged":
            def delete():
                self._release()
                path.unlink()
            return Part("application/dicom", path=path, release=delete, staged=True)
        return Part("application/dicom", path=path, release=self._release)

    def render_GET(self, request):
        paths = list(self.paths)

        def next_part():
            self.asked += 1
            part = self._part(paths.pop(0)) if paths else None
            if not self.later:
                return defer.succeed(part)
            return deferLater(reactor, 0, lambda: part)

        def on_stop():
            self.stopped += 1

        writer = MultipartWriter(next_part, self.part_type, boundary="BND", on_stop=on_stop)
        self.writers.append(writer)
        request.notifyFinish().addErrback(self.lost.append)
        self.done.append(write_response(request, ResponseEnvelope(
            200, Headers({"Content-Type": [writer.content_type]}), writer)))
        return NOT_DONE_YET


def make_files(folder: Path, sizes) -> list[Path]:
    folder.mkdir(exist_ok=True)
    out = []
    for n, size in enumerate(sizes):
        p = folder / f"{n}.dcm"
        p.write_bytes(os.urandom(size))
        out.append(p)
    return out


def parse(body: bytes, folder: Path) -> list[bytes]:
    parser = StowParser("BND", folder)
    parser.feed(body)
    return [Path(p.path).read_bytes() for p in parser.close()]


@pytest.fixture
def serve():
    ports = []

    async def start(resource, description="tcp:0:interface=127.0.0.1"):
        port = await serverFromString(reactor, description).listen(Site(resource))
        ports.append(port)
        return port.getHost().port

    yield start
    for p in ports:
        p.stopListening()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# Sizes: empty, small, one block, several reactor turns (TURN_BYTES), odd.
SIZES = [0, 17, 256 * 1024, 3 * sendfile.TURN_BYTES + 5, 131_858]


@pytest_twisted.ensureDeferred
async def test_parts_go_by_sendfile_and_parse_back(tmp_path, serve):
    paths = make_files(tmp_path / "f", SIZES)
    res = Files(paths)
    port = await serve(res)
    r = await threads.deferToThread(requests.get, f"http://127.0.0.1:{port}/", timeout=SAFETY)
    assert r.status_code == 200 and r.headers["Transfer-Encoding"] == "chunked"
    assert parse(r.content, tmp_path / "p") == [p.read_bytes() for p in paths]
    assert r.content.startswith(b"--BND\r\nContent-Type: application/dicom\r\nContent-Length: 0\r\n\r\n")
    assert r.content.endswith(b"\r\n--BND--\r\n")
    await res.done[0]
    writer = res.writers[0]
    assert writer.spliced == sum(SIZES)  # every file byte went by sendfile, none copied
    assert writer.parts_written == len(SIZES) and res.released == len(SIZES)


@pytest_twisted.ensureDeferred
async def test_parts_that_arrive_later_are_all_sent(tmp_path, serve):
    """A source whose parts come in later reactor turns (a PACS, the deidentify
    middleware): the body waits for each and ends only at the source's end."""
    paths = make_files(tmp_path / "f", [5000, 300_000, 0, 17])
    res = Files(paths, later=True)
    port = await serve(res)
    r = await threads.deferToThread(requests.get, f"http://127.0.0.1:{port}/", timeout=SAFETY)
    assert parse(r.content, tmp_path / "p") == [p.read_bytes() for p in paths]
    await res.done[0]
    assert res.writers[0].spliced == 305_017 and res.released == 4


@pytest_twisted.ensureDeferred
async def test_keep_alive_connection_serves_the_next_request_after_a_spliced_body(tmp_path, serve):
    paths = make_files(tmp_path / "f", [1000, 300_000])
    port = await serve(Files(paths))

    def twice():
        with requests.Session() as s:
            return [s.get(f"http://127.0.0.1:{port}/", timeout=SAFETY).content for _ in range(2)]
    first, second = await threads.deferToThread(twice)
    assert first == second and parse(first, tmp_path / "p") == [p.read_bytes() for p in paths]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("version", ["--http1.1", "--http1.0"])
async def test_curl_reads_the_same_bytes_chunked_or_not(tmp_path, serve, version):
    """HTTP/1.0 has no chunked coding: the body goes unframed and the connection closes after it."""
    if shutil.which("curl") is None:
        pytest.fail("curl is not installed (scripts/test installs it)")
    paths = make_files(tmp_path / "f", SIZES)
    res = Files(paths)
    port = await serve(res)
    out = tmp_path / "body"
    got = await threads.deferToThread(subprocess.run, ["curl", "-sS", version, "-D", "-", "-o", str(out),
                                                       f"http://127.0.0.1:{port}/"],
                                      capture_output=True, timeout=SAFETY)
    assert got.returncode == 0, got.stderr
    head = got.stdout.decode().lower()
    assert ("transfer-encoding: chunked" in head) == (version == "--http1.1")
    assert parse(out.read_bytes(), tmp_path / "p") == [p.read_bytes() for p in paths]
    await res.done[0]
    assert res.writers[0].spliced == sum(SIZES)


@pytest_twisted.ensureDeferred
async def test_tls_falls_back_to_copying(tmp_path, serve):
    self_signed(tmp_path)
    paths = make_files(tmp_path / "f", SIZES)
    res = Files(paths)
    port = await serve(res, f"ssl:0:interface=127.0.0.1:privateKey={tmp_path / 'key.pem'}:"
                            f"certKey={tmp_path / 'cert.pem'}")
    r = await threads.deferToThread(requests.get, f"https://127.0.0.1:{port}/", timeout=SAFETY,
                                    verify=str(tmp_path / "cert.pem"))
    assert parse(r.content, tmp_path / "p") == [p.read_bytes() for p in paths]
    await res.done[0]
    assert res.writers[0].spliced == 0


@pytest_twisted.ensureDeferred
async def test_gzip_answers_fall_back_to_the_compressing_path(tmp_path, serve):
    """A body harmony.web.coding compresses (JSON parts, a relayed client asking
    for gzip) is copied through the compressor, never spliced past it."""
    paths = make_files(tmp_path / "f", [2000, 70_000])
    for p in paths:
        p.write_bytes(b'{"00100010": {"vr": "PN"}}' * (p.stat().st_size // 26))
    res = Files(paths, part_type="application/dicom+json")
    port = await serve(res)
    r = await threads.deferToThread(
        requests.get, f"http://127.0.0.1:{port}/", timeout=SAFETY, stream=True,
        headers={"Accept-Encoding": "gzip", "X-Forwarded-For": "203.0.113.9"})
    raw = r.raw.read(decode_content=False)
    assert r.headers["Content-Encoding"] == "gzip"
    assert parse(gzip.decompress(raw), tmp_path / "p") == [p.read_bytes() for p in paths]
    await res.done[0]
    assert res.writers[0].spliced == 0


@pytest_twisted.ensureDeferred
async def test_head_sends_no_body(tmp_path, serve):
    paths = make_files(tmp_path / "f", [5000])
    res = Files(paths)
    port = await serve(res)
    r = await threads.deferToThread(requests.head, f"http://127.0.0.1:{port}/", timeout=SAFETY)
    assert r.status_code == 200 and r.content == b""
    await res.done[0]
    assert res.writers[0].spliced == 0


def _raw_client(port: int, rcvbuf: int = 8192) -> socket.socket:
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: the window stays small
    c.settimeout(SAFETY)
    c.connect(("127.0.0.1", port))
    c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    return c


def _read_all(c: socket.socket) -> bytes:
    """Read until the server closes (or resets) the connection."""
    out = []
    while True:
        try:
            data = c.recv(1 << 16)
        except ConnectionResetError:
            data = b""
        if not data:
            return b"".join(out)
        out.append(data)


def _dechunk(data: bytes) -> tuple[bytes, bool]:
    """(the body, whether its last chunk arrived) of a chunked response."""
    head, _, rest = data.partition(b"\r\n\r\n")
    body = []
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return b"".join(body), True
        body.append(rest[:size])
        rest = rest[size + 2:]
    return b"".join(body), False


@pytest_twisted.ensureDeferred
async def test_a_slow_reader_holds_one_file_and_nothing_buffered(tmp_path, serve):
    big = 8 * 1024 * 1024
    paths = make_files(tmp_path / "f", [big, big, 1000])
    res = Files(paths)
    port = await serve(res)
    fds = open_fds()
    client = await threads.deferToThread(_raw_client, port)
    try:
        writer, transport = await _stalled(res)
        # The client reads nothing: the first file is mid-send, the second not asked for,
        # and nothing waits in Python: the transport's buffer is empty.
        assert 0 < writer.spliced < big and res.asked == 1
        assert transport.dataBuffer == b"" and not transport._tempDataBuffer
        assert open_fds() <= fds + 3  # the connection, our duplicate of it, the file
        body = await threads.deferToThread(_read_all_http11, client)
    finally:
        client.close()
    got, complete = _dechunk(body)
    assert complete and parse(got, tmp_path / "p") == [p.read_bytes() for p in paths]


async def _stalled(res: Files):
    """The first writer and its transport, once the socket is full (the client reads nothing)."""
    await until(lambda: res.writers and res.writers[0]._pump is not None
                and res.writers[0]._pump._writing, "the socket to fill up")
    return res.writers[0], res.writers[0]._pump.transport


def _read_all_http11(c: socket.socket) -> bytes:
    """Read a chunked response until its last chunk (the connection stays open)."""
    out: list[bytes] = []
    tail = b""
    while not tail.endswith(b"\r\n0\r\n\r\n"):
        data = c.recv(1 << 16)
        if not data:
            break
        out.append(data)
        tail = (tail + data)[-16:]
    return b"".join(out)


@pytest_twisted.ensureDeferred
async def test_a_client_gone_mid_part_is_a_client_abort_and_frees_the_files(tmp_path, serve):
    paths = make_files(tmp_path / "f", [8 * 1024 * 1024, 1000])
    res = Files(paths)
    port = await serve(res)
    fds = open_fds()
    client = await threads.deferToThread(_raw_client, port)
    await until(lambda: res.writers and res.writers[0]._pump is not None
                and res.writers[0]._pump._writing, "the socket to fill up")
    # Reset, not FIN: the send that follows fails at once.
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    await res.done[0]
    await until(lambda: res.lost, "twisted.web to report the request lost")
    writer = res.writers[0]
    assert res.stopped == 1 and res.released == 1 and res.asked == 1  # the open part let go, the source stopped
    assert 0 < writer.spliced < 8 * 1024 * 1024
    await until(lambda: open_fds() <= fds, "the descriptors to be closed")


@pytest_twisted.ensureDeferred
async def test_a_file_cut_short_mid_send_cuts_the_connection(tmp_path, serve):
    size = 8 * 1024 * 1024
    paths = make_files(tmp_path / "f", [size, 1000])
    res = Files(paths)
    port = await serve(res)
    client = await threads.deferToThread(_raw_client, port)
    try:
        await until(lambda: res.writers and res.writers[0]._pump is not None
                    and res.writers[0]._pump._writing, "the socket to fill up")
        with open(paths[0], "r+b") as f:
            f.truncate(size // 2)
        body = await threads.deferToThread(_read_all, client)  # ends when Harmony cuts the connection
    finally:
        client.close()
    got, complete = _dechunk(body)
    assert not complete and b"--BND--" not in got and len(got) < size
    await res.done[0]
    assert res.released == 1


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("later", [False, True])
async def test_in_memory_parts_go_by_sendmsg_and_parse_back(tmp_path, serve, later):
    """Parts held in memory (``Part.buffers``, e.g. instances the DICOMweb bridge
    staged in memory) go to the socket with ``sendmsg``, never joined; the same bytes."""
    paths = make_files(tmp_path / "f", SIZES)
    res = Files(paths, later=later, kind="memory")
    port = await serve(res)
    before = sendfile.sent_from_memory_total
    r = await threads.deferToThread(requests.get, f"http://127.0.0.1:{port}/", timeout=SAFETY)
    assert r.status_code == 200
    assert parse(r.content, tmp_path / "p") == [p.read_bytes() for p in paths]
    await res.done[0]
    assert res.writers[0].spliced == 0 and res.released == len(paths)
    assert sendfile.sent_from_memory_total - before == sum(SIZES)


@pytest_twisted.ensureDeferred
async def test_in_memory_parts_are_copied_where_sendfile_is_off(tmp_path, serve, monkeypatch):
    """``HARMONY_SENDFILE=0`` (and TLS, gzip, HEAD: the copying path) writes the
    buffers through twisted.web: the same bytes, nothing by ``sendmsg``."""
    monkeypatch.setenv("HARMONY_SENDFILE", "0")
    paths = make_files(tmp_path / "f", SIZES)
    res = Files(paths, kind="memory")
    port = await serve(res)
    before = sendfile.sent_from_memory_total
    r = await threads.deferToThread(requests.get, f"http://127.0.0.1:{port}/", timeout=SAFETY)
    assert parse(r.content, tmp_path / "p") == [p.read_bytes() for p in paths]
    await res.done[0]
    assert sendfile.sent_from_memory_total == before and res.released == len(paths)


@pytest_twisted.ensureDeferred
async def test_a_slow_reader_of_in_memory_parts_holds_only_the_part_being_sent(tmp_path, serve):
    big = 8 * 1024 * 1024
    paths = make_files(tmp_path / "f", [big, big, 1000])
    res = Files(paths, kind="memory")
    port = await serve(res)
    client = await threads.deferToThread(_raw_client, port)
    try:
        writer, transport = await _stalled(res)
        # The client reads nothing: the first part is mid-send, the next not asked for,
        # and nothing was copied into the transport's buffer.
        assert res.asked == 1 and writer._pump._views
        assert transport.dataBuffer == b"" and not transport._tempDataBuffer
        body = await threads.deferToThread(_read_all_http11, client)
    finally:
        client.close()
    got, complete = _dechunk(body)
    assert complete and parse(got, tmp_path / "p") == [p.read_bytes() for p in paths]


@pytest_twisted.ensureDeferred
async def test_staged_files_are_gone_once_sent_and_closed_off_the_reactor(tmp_path, serve):
    """A staged file (``Part.staged``: its release deletes it) is deleted the moment its
    part is sent, and its descriptor closed on the closer thread (where tmpfs frees the
    pages); nothing stays open."""
    paths = make_files(tmp_path / "f", SIZES)
    expected = [p.read_bytes() for p in paths]
    res = Files(paths, kind="staged")
    port = await serve(res)
    r = await threads.deferToThread(requests.get, f"http://127.0.0.1:{port}/", timeout=SAFETY)
    assert parse(r.content, tmp_path / "p") == expected
    await res.done[0]
    assert res.released == len(paths) and not any(p.exists() for p in paths)
    assert await threads.deferToThread(sendfile._closer.drain)
    assert not [fd for fd, target in _fd_targets().items() if target.startswith(str(tmp_path / "f"))]


def _fd_targets() -> dict:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return out


@pytest_twisted.ensureDeferred
async def test_a_part_arriving_after_the_body_stopped_is_let_go_on_the_copying_path(tmp_path):
    """The copying path (TLS, gzip, HARMONY_SENDFILE=0) is stopped (its client left) while
    the next part is still being made, as the DICOMweb bridge converts an instance on a
    thread: once it arrives it is let go, its staged file deleted and its descriptor
    closed, not held by a stopped generator until the garbage collector (the sendfile
    path already did so)."""
    staged = make_files(tmp_path / "f", [1000])[0]
    coming: defer.Deferred = defer.Deferred()
    released = []

    def delete():
        released.append(staged)
        staged.unlink()

    class Sink:  # not a twisted.web request: the copying path
        def write(self, data):
            pass

    asked = []
    writer = MultipartWriter(lambda: asked.append(True) or coming, "application/dicom", boundary="BND")
    ended = writer.startProducing(Sink())
    await until(lambda: asked, "the body to ask for its first part")
    writer.stopProducing()
    stopped = []
    ended.addErrback(lambda f: stopped.append(f.check(TaskStopped)))
    assert stopped == [TaskStopped]
    fds = open_fds()
    coming.callback(Part("application/dicom", path=staged, release=delete, staged=True))
    assert released == [staged] and not staged.exists()
    assert sendfile._closer.drain() and open_fds() == fds
