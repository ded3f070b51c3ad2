"""The repository's shell scripts leave the machine as they found it.

``scripts/test`` installs the real peers (Orthanc, nginx) with a Debian
policy-rc.d in place so their packaged services do not start; it must not leave
that file behind, nor remove one the machine already had.  The scripts run for
real here, with POLICY_RC_D pointed into a temp folder instead of /usr/sbin.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NO_SERVICE_STARTS = ROOT / "scripts" / "no-service-starts"


def _run(policy: Path, *command):
    env = {**os.environ, "POLICY_RC_D": str(policy)}
    return subprocess.run([str(NO_SERVICE_STARTS), *command], env=env, capture_output=True, text=True, timeout=30)


def test_policy_rc_d_is_in_place_during_the_command_and_removed_after(tmp_path):
    policy = tmp_path / "policy-rc.d"
    # The command is what apt-get's maintainer scripts do: invoke-rc.d runs policy-rc.d
    # and skips the start when it exits 101.
    result = _run(policy, "sh", "-c", f'test -x "{policy}"; "{policy}"; echo "rc=$?"')
    assert result.returncode == 0, result.stderr
    assert "rc=101" in result.stdout
    assert not policy.exists()


def test_policy_rc_d_is_removed_when_the_command_fails(tmp_path):
    policy = tmp_path / "policy-rc.d"
    result = _run(policy, "sh", "-c", "exit 7")
    assert result.returncode == 7
    assert not policy.exists()


def test_an_existing_policy_rc_d_is_left_alone(tmp_path):
    policy = tmp_path / "policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 0\n")
    policy.chmod(0o755)
    result = _run(policy, "true")
    assert result.returncode == 0
    assert policy.read_text() == "#!/bin/sh\nexit 0\n"


def test_scripts_test_installs_through_no_service_starts():
    text = (ROOT / "scripts" / "test").read_text()
    assert "/usr/sbin/policy-rc.d" not in text, "scripts/test must not write policy-rc.d itself"
    assert "scripts/no-service-starts apt-get install" in text
