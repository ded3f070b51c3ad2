"""etc/harmony.service and the shipped etc/ work together as installed (issue 12, defect 22).

The unit is parsed, and its own ExecStartPre/ExecStart command lines run with
its settings under a temporary root: the config folder (the unit's
/etc/harmony) is a read-only copy of etc/, the state directory exists as
systemd's ``StateDirectory=`` makes it, and ``STATE_DIRECTORY``,
``WorkingDirectory`` and ``UMask`` are set as systemd sets them.  Harmony runs
as an unprivileged user (the unit's ``User=``; ``nobody`` here) when the test
runs as root, so the read-only modes bind it.  It must start, answer, and write
only inside the state directory.  A plain synchronous test: it drives
processes, not the reactor.
"""

from __future__ import annotations

import json
import os
import pwd
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest

from tests.peers import peer_env, port_open, wait_for
from tests.test_default_config import copy_etc

UNIT = Path(__file__).resolve().parent.parent / "etc" / "harmony.service"
RUN_AS = "nobody"


def parse_unit(path: Path) -> dict:
    """``{section: {key: [values...]}}``: systemd allows a key more than once."""
    sections, current, pending = {}, None, ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def as_installed(command: str, mapping: dict) -> list[str]:
    """The unit's command line with its install paths moved under the temp root."""
    argv = shlex.split(command.lstrip("-@+!:"))
    out = []
    for arg in argv:
        for installed, here in mapping.items():
            if arg == installed or arg.startswith(installed + "/"):
                arg = here + arg[len(installed):]
                break
        out.append(arg)
    return out


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mode, p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def make_read_only(folder: Path):
    for p in [folder, *folder.rglob("*")]:
        p.chmod(stat.S_IMODE(p.stat().st_mode) & ~0o222)


@pytest.fixture
def temp_root():
    """A folder the unprivileged user can reach (pytest's own tmp tree is 0700, and
    shared with other sessions that set it back): made here, removed after."""
    folder = Path(tempfile.mkdtemp(prefix="harmony-unit-"))
    folder.chmod(0o711)
    yield folder
    for p in [folder, *folder.rglob("*")]:
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o700)
    shutil.rmtree(folder)


def test_the_unit_runs_the_shipped_config_from_a_read_only_etc(temp_root):
    tmp_path = temp_root
    service = parse_unit(UNIT)["Service"]
    one = {k: v[-1] for k, v in service.items()}
    assert one["StateDirectory"] == "harmony" and one["ProtectSystem"] == "strict"
    assert "/var/lib/harmony" in one["ReadWritePaths"].split()
    assert one["WorkingDirectory"] == "/var/lib/harmony"

    root = tmp_path / "root"
    etc = root / "etc" / "harmony"
    ports = copy_etc(etc)
    state = root / "var" / "lib" / "harmony"
    logs = root / "var" / "log" / "harmony"
    user = pwd.getpwnam(RUN_AS) if os.getuid() == 0 else None
    for folder, mode in ((state, int(one.get("StateDirectoryMode", "0755"), 8)), (logs, 0o755)):
        folder.mkdir(parents=True)
        folder.chmod(mode)
        if user is not None:
            os.chown(folder, user.pw_uid, user.pw_gid)
    make_read_only(etc)
    before = tree(etc)

    venv_bin = str(Path(sys.executable).parent)
    mapping = {"/opt/harmony/venv/bin": venv_bin, "/etc/harmony": str(etc), "/var/lib/harmony": str(state),
               "/var/log/harmony": str(logs)}
    env = {**peer_env(), "STATE_DIRECTORY": str(state), "LOGS_DIRECTORY": str(logs)}
    cwd = as_installed(one["WorkingDirectory"], mapping)[0]
    umask = int(one["UMask"], 8)
    prefix = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"] if user else []

    def run_as_unit(argv, **kw):
        return subprocess.Popen(prefix + argv, env=env, cwd=cwd, preexec_fn=lambda: os.umask(umask), **kw)

    check = run_as_unit(as_installed(one["ExecStartPre"], mapping), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = check.communicate(timeout=120)
    assert check.returncode == 0, (out, err)
    assert f"state directory: {state}".encode() in out

    log = open(tmp_path / "twistd.log", "wb")
    proc = run_as_unit(as_installed(one["ExecStart"], mapping), stdout=log, stderr=subprocess.STDOUT)
    try:
        for port in ports.values():
            try:
                wait_for(lambda: port_open(port), 60, f"harmony port {port}", proc)
            except RuntimeError as e:
                log.flush()
                raise AssertionError((tmp_path / "twistd.log").read_text()[-3000:]) from e
        token = (state / "admin-token").read_text().strip()
        assert stat.S_IMODE((state / "admin-token").stat().st_mode) == 0o600
        req = urllib.request.Request(f"http://127.0.0.1:{ports['management']}/admin/info",
                                     headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['http']}/echo/hello", timeout=30) as r:
            assert r.status == 200 and json.loads(r.read())
        # A query opens the archive's store: in the state directory.
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['http']}/dicomweb/studies", timeout=30) as r:
            assert r.status in (200, 204)  # no studies yet (the empty answer's code is issue 12 defect 8's)
        assert (state / "index.sqlite").exists()
    finally:
        proc.send_signal(signal.SIGTERM)  # KillMode=mixed: SIGTERM to the main process
        proc.wait(60)
        log.close()
    # twistd ends by re-raising SIGTERM, which systemd counts as a clean stop.
    assert proc.returncode in (0, -signal.SIGTERM), (tmp_path / "twistd.log").read_text()[-3000:]

    assert tree(etc) == before  # nothing written, nothing created in the config folder
    outside = [p for p in root.rglob("*") if p.is_file() and state not in p.parents and logs not in p.parents
               and etc not in p.parents]
    assert outside == []
    assert (state / "clean-shutdown").exists()  # the store closed cleanly on SIGTERM
    if user is not None:
        owners = {p.stat().st_uid for p in state.rglob("*")}
        assert owners == {user.pw_uid}


def test_state_dir_precedence_and_placeholder(tmp_path, monkeypatch):
    """--state-dir, then $STATE_DIRECTORY, then [proxy] state_dir (relative to the
    file), then var/harmony next to it; ``{state_dir}`` values follow it."""
    from harmony.config import load_config
    from tests.harness import MINIMAL_MAIN, write_config

    main = MINIMAL_MAIN + '\n[storage.options]\npath = "{state_dir}/store"\n'
    path = write_config(tmp_path / "etc", main)
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    assert load_config(path).state_dir == (tmp_path / "etc" / "var" / "harmony").resolve()
    path = write_config(tmp_path / "etc", main.replace('[proxy]\n', '[proxy]\nstate_dir = "../state"\n'))
    config = load_config(path)
    assert config.state_dir == (tmp_path / "state").resolve()
    assert config.storage_path == (tmp_path / "state" / "store").resolve()
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path}/systemd:{tmp_path}/second")
    assert load_config(path).storage_path == tmp_path / "systemd" / "store"
    assert load_config(path, state_dir=tmp_path / "flag").storage_path == tmp_path / "flag" / "store"
