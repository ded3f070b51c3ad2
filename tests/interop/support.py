"""What the interop tests share: Harmony run as a real ``twistd`` process from
TOML, DCMTK's tools, Orthanc's REST API with its statuses, and findscu answers
read back as datasets.

The interop suite drives Harmony only with software nobody here wrote (Orthanc
as a client, DCMTK, wrk, nginx, dicomweb-client, requests).  Harmony runs as in
production - a twistd process with its own RSS - so the tests are plain
synchronous functions: a blocking client (Orthanc's REST call that makes
Orthanc connect back to Harmony) can never deadlock with a reactor in the test
process.
"""

from __future__ import annotations

import io
import json
import subprocess
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pydicom

from tests.harness import write_config
from tests.peers import DCMTK, free_port, peer_env, require
from tests.sf_helpers import HarmonyProcess

#: DCMTK tools the interop tests call beyond those tests.peers names.
TOOLS = {**DCMTK, **{name: f"/usr/bin/{name}"
                     for name in ("dcmcjpeg", "dcmcjpls", "dcmcrle", "img2dcm", "dcmdjpeg", "dcmdjpls", "dcmdrle")}}


def dcmtk(tool: str, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run DCMTK's *tool* (by absolute path: pynetdicom's console scripts shadow
    them in the venv) with ``TCP_NODELAY=1``; output captured, never checked here."""
    return subprocess.run([require(TOOLS[tool]), *map(str, args)], capture_output=True, env=peer_env(),
                          timeout=timeout)


#: transfer syntax -> storescu's option proposing it (plus the uncompressed ones)
STORESCU_PROPOSE = {
    "1.2.840.10008.1.2": "-xi", "1.2.840.10008.1.2.1": "-x=", "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.57": "-xs", "1.2.840.10008.1.2.4.50": "-xy", "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.80": "-xt", "1.2.840.10008.1.2.4.81": "-xu", "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw", "1.2.840.10008.1.2.5": "-xr", "1.2.840.10008.1.2.1.99": "-xd",
}


def storescu(port: int, paths, *, aec: str = "HARMONY") -> str:
    """DCMTK storescu of *paths*, each sent in its own transfer syntax (one run
    per syntax: storescu proposes one compressed syntax at a time); its log.
    Asserts that every store succeeded."""
    by_ts: dict[str, list] = {}
    for p in paths:
        ts = str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        by_ts.setdefault(ts, []).append(p)
    log = ""
    for ts, files in by_ts.items():
        r = dcmtk("storescu", "-v", STORESCU_PROPOSE[ts], "-aec", aec, "127.0.0.1", port, *files)
        out = (r.stdout + r.stderr).decode(errors="replace")
        log += out
        assert r.returncode == 0 and out.count("Received Store Response (Success)") == len(files), out
    return log


def key_args(keys: dict) -> list[str]:
    """DCMTK ``-k`` arguments: ``KEY=VALUE``, or a bare ``KEY`` (a return key) for None."""
    return [a for k, v in keys.items() for a in ("-k", k if v is None else f"{k}={v}")]


def getscu(port: int, keys: dict, out: Path, *, prefer: str | None = None,
           aec: str = "HARMONY") -> list[pydicom.Dataset]:
    """DCMTK getscu (Study Root) with *keys*, preferring the transfer syntax
    *prefer* (its instances may then arrive in it; uncompressed otherwise); what arrived."""
    out.mkdir(parents=True, exist_ok=True)
    args = ["-v", "-S", "-aec", aec, "-od", out]
    if prefer is not None:
        args.append("+" + STORESCU_PROPOSE[prefer][1:])  # getscu's "+x?" (prefer) mirrors storescu's "-x?" (propose)
    r = dcmtk("getscu", *args, *key_args(keys), "127.0.0.1", port)
    log = (r.stdout + r.stderr).decode(errors="replace")
    assert r.returncode == 0, log
    return [pydicom.dcmread(p) for p in sorted(out.iterdir())]


def movescu(port: int, keys: dict, out: Path, receive_port: int, *, aec: str = "HARMONY") -> list[pydicom.Dataset]:
    """DCMTK movescu to itself (AE ``MOVESCU`` listening on *receive_port*,
    accepting every syntax it knows) with *keys*; what arrived."""
    out.mkdir(parents=True, exist_ok=True)
    args = ["-v", "-S", "-aet", "MOVESCU", "-aem", "MOVESCU", "-aec", aec, "--port", receive_port, "+xa", "-od", out]
    r = dcmtk("movescu", *args, *key_args(keys), "127.0.0.1", port)
    log = (r.stdout + r.stderr).decode(errors="replace")
    assert r.returncode == 0, log
    return [pydicom.dcmread(p) for p in sorted(out.iterdir())]


def web_pipeline(name: str, service: str, prefix: str, backend_options: dict, *,
                 backend_service: str | None = None) -> str:
    """TOML for pipeline *name*: one *service* endpoint at *prefix* on the default
    network and one backend ``{name}_up`` (of *backend_service*, default the
    endpoint's) with *backend_options*."""
    options = "".join(f"{k} = {json.dumps(v)}\n" for k, v in backend_options.items())
    return f"""
[pipelines.{name}]
networks = ["default"]
endpoints = ["{name}"]
backends = ["{name}_up"]
[endpoints.{name}]
service = "{service}"
[endpoints.{name}.options]
path_prefix = "{prefix}"
[backends.{name}_up]
service = "{backend_service or service}"
[backends.{name}_up.options]
{options}"""


def main_toml(http_port: int, *, log_level: str = "info", extra: str = "") -> str:
    """``harmony.toml`` for a test node: one HTTP network on 127.0.0.1, the store in ``store``."""
    return textwrap.dedent(f"""
        [proxy]
        id = "interop"
        log_level = "{log_level}"

        [network.default.http]
        bind_address = "127.0.0.1"
        bind_port = {http_port}

        [storage.options]
        path = "store"
        """) + extra


class Node(HarmonyProcess):
    """Harmony under twistd in *folder*, from *pipelines* (TOML text), with an
    HTTP network on ``http_port`` and the DIMSE ports in *dimse_ports* waited for."""

    def __init__(self, folder: Path, pipelines: str, *, dimse_ports=(), http_port: int | None = None,
                 log_level: str = "info", management: bool = False):
        self.http_port = http_port or free_port()
        extra, ports = "", [self.http_port, *dimse_ports]
        if management:  # the admin API on loopback, behind a token of our own
            self.admin_port, self.admin_token = free_port(), "interop-admin-token-0123456789"
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / "admin-token").write_text(self.admin_token)
            extra = (f'[management]\nenabled = true\nbind_address = "127.0.0.1"\nbind_port = {self.admin_port}\n'
                     'token_file = "admin-token"\n')
            ports.append(self.admin_port)
        write_config(Path(folder), main_toml(self.http_port, log_level=log_level, extra=extra), {"interop": pipelines})
        super().__init__(folder, ports)

    def admin(self, path: str):
        """A management API call (``management=True``): the decoded JSON."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}/admin{path}",
                                     headers={"Authorization": f"Bearer {self.admin_token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.folder.glob("twistd-*.log")))


def call(server_url: str, method: str, path: str, payload=None, *, timeout: float = 120) -> tuple[int, object]:
    """One REST call (JSON in and out) -> (status, decoded body); errors are returned, not raised."""
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(server_url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, body = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    try:
        return status, json.loads(body) if body else None
    except ValueError:
        return status, body


def orthanc_ok(orthanc, method: str, path: str, payload=None):
    """An Orthanc REST call that must succeed; its body (Orthanc's error details on failure)."""
    status, body = call(orthanc.url, method, path, payload)
    assert status == 200, f"Orthanc {method} {path} -> {status}: {body}"
    return body


def orthanc_find(orthanc, modality: str, level: str, query: dict) -> list[dict]:
    """Orthanc's C-FIND SCU (``/modalities/{m}/query``): the answers, simplified (keyword -> value)."""
    q = orthanc_ok(orthanc, "POST", f"/modalities/{modality}/query", {"Level": level, "Query": query})
    answers = orthanc_ok(orthanc, "GET", f"/queries/{q['ID']}/answers?expand&simplify")
    return answers


def orthanc_sops(orthanc) -> set[str]:
    """SOP Instance UIDs Orthanc holds."""
    return {i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc_ok(orthanc, "GET", "/instances?expand")}


def orthanc_file(orthanc, sop_uid: str) -> pydicom.Dataset:
    """The instance *sop_uid* as Orthanc holds it."""
    found = orthanc.rest("POST", "/tools/lookup", sop_uid.encode(), "text/plain")
    [instance] = [f for f in found if f["Type"] == "Instance"]
    return pydicom.dcmread(io.BytesIO(orthanc.rest("GET", f"/instances/{instance['ID']}/file")))


def clear(orthanc):
    """Delete every study from *orthanc* (a client about to retrieve), and check it is empty."""
    for study in orthanc_ok(orthanc, "GET", "/studies"):
        orthanc_ok(orthanc, "DELETE", f"/studies/{study}")
    assert orthanc_ok(orthanc, "GET", "/instances") == []


def upload(orthanc, paths) -> list[str]:
    """Put files into Orthanc through its REST API; their Orthanc IDs."""
    ids = []
    for p in paths:
        req = urllib.request.Request(orthanc.url + "/instances", data=Path(p).read_bytes(), method="POST",
                                     headers={"Content-Type": "application/dicom"})
        with urllib.request.urlopen(req, timeout=60) as r:
            ids.append(json.loads(r.read())["ID"])
    return ids


def findscu(port: int, level: str, keys: dict, out: Path, *, aec: str = "HARMONY",
            extra=()) -> tuple[list[pydicom.Dataset], str]:
    """DCMTK findscu (Study Root) at *level* with *keys*; each answer as a dataset
    (``--extract`` writes them as files, read back with their character set) and
    the final status line of findscu's log."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rsp*.dcm"):
        old.unlink()
    args = ["-v", "-S", "-aec", aec, "-X", "-od", out, "-k", f"QueryRetrieveLevel={level}", *extra]
    r = dcmtk("findscu", *args, *key_args(keys), "127.0.0.1", port)
    log = (r.stdout + r.stderr).decode(errors="replace")
    finals = [line for line in log.splitlines() if "Received Final Find Response" in line]
    assert r.returncode == 0 and finals, log
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))], finals[-1]
