"""The shipped ``etc/`` runs as it is, with nothing else installed: a copy of it
(only ports rewritten to free ones; the store and the management token land
in the copy's ``../var/harmony``) passes ``harmony check`` and runs under a real
``twistd``: C-ECHO, C-STORE (DCMTK), C-GET, QIDO-RS and WADO-RS
(dicomweb-client) over the local archive, the echo pipeline, and the
management API on loopback behind the token it generated.

A plain synchronous test: it drives a process, not the reactor.
"""

from __future__ import annotations

import json
import re
import shutil
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pydicom

from tests.dicomweb_helpers import client, same_dataset
from tests.peers import DCMTK, free_port, peer_env
from tests.sf_helpers import HarmonyProcess

ETC = Path(__file__).resolve().parent.parent / "etc"


def copy_etc(dest: Path) -> dict:
    """Copy etc/ to *dest* with every fixed port replaced by a free one; the ports."""
    shutil.copytree(ETC, dest, ignore=shutil.ignore_patterns("examples", "var"))
    ports = {"http": free_port(), "scp": free_port(), "management": free_port()}
    for file, pattern, port in (("harmony.toml", r"(\[network\.default\.http\][^\[]*bind_port = )8080", ports["http"]),
                                ("harmony.toml", r"(\[management\][^\[]*bind_port = )9901", ports["management"]),
                                ("pipelines/archive.toml", r"(\nport = )11112", ports["scp"])):
        path = dest / file
        text, n = re.subn(pattern, lambda m: m.group(1) + str(port), path.read_text())
        assert n == 1, f"{file}: {pattern} not found once: the default config changed shape"
        path.write_text(text)
    return ports


def dcmtk(tool, *args):
    return subprocess.run([DCMTK[tool], *map(str, args)], capture_output=True, env=peer_env(), timeout=60)


def http(url, token=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_default_config_runs_a_mini_archive(tmp_path, corpus):
    etc = tmp_path / "etc"
    ports = copy_etc(etc)
    harmony_cli = str(Path(sys.executable).with_name("harmony"))
    check = subprocess.run([harmony_cli, "check", "-c", str(etc / "harmony.toml")], capture_output=True, timeout=120)
    assert check.returncode == 0, check.stderr
    assert b"archive_web" in check.stdout and b"archive_scp" in check.stdout

    harmony = HarmonyProcess(etc, ports.values())
    harmony.config = etc / "harmony.toml"
    try:
        harmony.start()
        assert dcmtk("echoscu", "-aec", "HARMONY", "127.0.0.1", ports["scp"]).returncode == 0
        inst = next(i for i in corpus if not pydicom.dcmread(i.path, stop_before_pixels=True)
                    .file_meta.TransferSyntaxUID.is_compressed)
        r = dcmtk("storescu", "-v", "-aec", "HARMONY", "127.0.0.1", ports["scp"], inst.path)
        assert b"Received Store Response (Success)" in r.stderr, r.stderr

        web = client(f"http://127.0.0.1:{ports['http']}/dicomweb")
        found = web.search_for_instances(study_instance_uid=inst.study_uid)
        assert [f["00080018"]["Value"][0] for f in found] == [inst.sop_uid]
        got = web.retrieve_instance(inst.study_uid, inst.series_uid, inst.sop_uid,
                                    media_types=[("application/dicom", "*")])
        assert same_dataset(got, pydicom.dcmread(inst.path))

        out = tmp_path / "got"
        out.mkdir()
        r = dcmtk("getscu", "-aec", "HARMONY", "-od", out, "-k", "QueryRetrieveLevel=STUDY",
                  "-k", f"StudyInstanceUID={inst.study_uid}", "127.0.0.1", ports["scp"])
        assert r.returncode == 0, r.stderr
        [retrieved] = out.iterdir()
        assert same_dataset(pydicom.dcmread(retrieved), pydicom.dcmread(inst.path))  # getscu writes its own meta

        status, body = http(f"http://127.0.0.1:{ports['http']}/echo/hello")
        assert status == 200 and json.loads(body)["path"].endswith("/echo/hello")

        # The management API: loopback, and only with the token written on first start.
        token_file = tmp_path / "var" / "harmony" / "admin-token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 32
        admin = f"http://127.0.0.1:{ports['management']}/admin"
        assert http(admin + "/info")[0] == 401
        status, body = http(admin + "/info", token)
        assert status == 200 and json.loads(body)["proxy_id"] == "harmony"
        status, body = http(admin + "/queues", token)
        assert (status, json.loads(body)) == (200, {"targets": {}})
    finally:
        harmony.stop()
    # A restart keeps the token and the archive.
    try:
        harmony.start()
        assert (tmp_path / "var" / "harmony" / "admin-token").read_text().strip() == token
        found = web.search_for_instances(study_instance_uid=inst.study_uid)
        assert [f["00080018"]["Value"][0] for f in found] == [inst.sop_uid]
    finally:
        harmony.stop()


def test_create_token_file_needs_token_file(tmp_path):
    import pytest

    from harmony.config import ConfigErrors, load_config
    from harmony.management.settings import ManagementSettings
    from tests.harness import MINIMAL_MAIN, write_config
    path = write_config(tmp_path, MINIMAL_MAIN + "[management]\nenabled = true\ncreate_token_file = true\n")
    with pytest.raises(ConfigErrors) as e:
        ManagementSettings.from_config(load_config(path))
    assert "management.create_token_file" in str(e.value) and "token_file" in str(e.value)
    # An existing token file is used as it is, never overwritten.
    (tmp_path / "mine").write_text("operator-chosen-token-0123\n")
    path = write_config(tmp_path, MINIMAL_MAIN + '[management]\nenabled = true\ntoken_file = "mine"\n'
                                                 'create_token_file = true\n')
    assert ManagementSettings.from_config(load_config(path)).token == "operator-chosen-token-0123"
