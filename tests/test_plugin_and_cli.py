"""The twistd plugin and the harmony command, run as real processes."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.harness import MINIMAL_MAIN, echo_pipeline, write_config
from tests.peers import free_port

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent




def test_twistd_lists_the_plugin():
    out = subprocess.run([str(BIN / "twistd"), "--help"], capture_output=True, text=True, check=True).stdout
    assert "harmony" in out and "healthcare proxy" in out


def test_plugin_is_in_the_installed_package():
    """`pip install .` must ship twisted/plugins/harmony_plugin.py (find_namespace)."""
    import twisted.plugins
    found = [p for p in twisted.plugins.__path__ if (Path(p) / "harmony_plugin.py").exists()]
    assert found, twisted.plugins.__path__


def test_harmony_check_default_config_ok():
    r = subprocess.run([str(BIN / "harmony"), "check", "-c", str(ROOT / "etc" / "harmony.toml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ": OK" in r.stdout and "/echo" in r.stdout and "/api" in r.stdout


def test_harmony_check_lists_every_problem(tmp_path):
    path = write_config(tmp_path, MINIMAL_MAIN, {"bad": """
[pipelines.p]
endpoints = ["a"]
backends = ["nope"]
[endpoints.a]
service = "bogus"
"""})
    r = subprocess.run([str(BIN / "harmony"), "check", "-c", str(path)], capture_output=True, text=True)
    assert r.returncode == 1
    assert "INVALID" in r.stdout
    assert "[endpoints.a.service]: unknown endpoint type 'bogus'" in r.stdout
    assert "[pipelines.p.backends]: names unknown backend 'nope'" in r.stdout


def test_harmony_routes(tmp_path):
    r = subprocess.run([str(BIN / "harmony"), "routes", "-c", str(ROOT / "etc" / "harmony.toml")],
                       capture_output=True, text=True, check=True)
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["NETWORK", "LISTEN", "PREFIX"]
    assert any("/echo" in l and "echo_http" in l and "echo" in l for l in lines[1:])


def test_twistd_serves_and_stops(tmp_path):
    port = free_port()
    path = write_config(tmp_path, MINIMAL_MAIN.replace("bind_port = 0", f"bind_port = {port}"), {"e": echo_pipeline()})
    proc = subprocess.Popen([str(BIN / "twistd"), "-n", "--pidfile=", "harmony", "-c", str(path)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if "listening on" in line:
                break
        else:
            pytest.fail("twistd exited before listening")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/echo/x?a=1") as resp:
            assert resp.status == 200
            assert b'"subpath":"/x"' in resp.read()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    # Twisted re-raises the signal after a clean shutdown, so -SIGTERM is success.
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Server Shut Down." in out
    assert "GET /echo/x 200" in out  # the access log line, without the query string


def test_twistd_refuses_bad_config(tmp_path):
    path = write_config(tmp_path, MINIMAL_MAIN.replace("bind_port = 0", "bind_port = -1"))
    r = subprocess.run([str(BIN / "twistd"), "-n", "--pidfile=", "harmony", "-c", str(path)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode != 0
    assert "bind_port" in (r.stdout + r.stderr)


@pytest.mark.parametrize("workers", [1, 2])
def test_twistd_exits_non_zero_when_a_network_cannot_listen(tmp_path, workers):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        main = MINIMAL_MAIN.replace("bind_port = 0", f"bind_port = {port}").replace(
            "[proxy]", f"[proxy]\nworkers = {workers}")
        path = write_config(tmp_path, main)
        r = subprocess.run([str(BIN / "twistd"), "-n", "--pidfile=", "harmony", "-c", str(path)],
                           capture_output=True, text=True, cwd=tmp_path, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "network default cannot listen on" in out and "Address already in use" in out
    assert "stopping: not every network could listen" in out
