"""``harmony transform SPEC.json [INPUT.json]`` run as users run it: a process."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "etc" / "transforms" / "patient_to_fhir.json"
GOLDEN_IN = ROOT / "tests" / "golden" / "patient_to_fhir.input.json"
GOLDEN_OUT = ROOT / "tests" / "golden" / "patient_to_fhir.expected.json"


def harmony(*args, stdin=b""):
    return subprocess.run([sys.executable, "-m", "harmony.cli", "transform", *map(str, args)],
                          input=stdin, capture_output=True, timeout=60)


def test_file_input_prints_transformed_json():
    r = harmony(SPEC, GOLDEN_IN)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == json.loads(GOLDEN_OUT.read_text())
    assert r.stdout.startswith(b"{\n  ")  # readable by default


def test_stdin_input_and_compact_output():
    r = harmony("--compact", SPEC, stdin=GOLDEN_IN.read_bytes())
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(b"\n") == 1
    assert json.loads(r.stdout) == json.loads(GOLDEN_OUT.read_text())


def test_context_file_reaches_modify_specs(tmp_path):
    spec = tmp_path / "ctx.json"
    spec.write_text(json.dumps([{"operation": "modify-overwrite-beta", "spec": {"site": "^site"}}]))
    ctx = tmp_path / "context.json"
    ctx.write_text('{"site": "north"}')
    r = harmony("--context", ctx, spec, stdin=b'{"a": 1}')
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"a": 1, "site": "north"}


def test_bad_spec_exits_2_naming_the_file(tmp_path):
    spec = tmp_path / "typo.json"
    spec.write_text(json.dumps([{"operation": "shfit", "spec": {}}]))
    r = harmony(spec, GOLDEN_IN)
    assert r.returncode == 2
    assert r.stdout == b""
    assert str(spec).encode() in r.stderr and b"unknown operation 'shfit'" in r.stderr


def test_spec_that_is_not_json_exits_2(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text("[{")
    r = harmony(spec, stdin=b"{}")
    assert r.returncode == 2
    assert b"spec.json: invalid JSON" in r.stderr and b"line 1 column" in r.stderr


def test_bad_input_exits_3_naming_the_input(tmp_path):
    bad = tmp_path / "in.json"
    bad.write_bytes(b'{"a": }')
    r = harmony(SPEC, bad)
    assert r.returncode == 3
    assert f"{bad}: invalid JSON".encode() in r.stderr
    r = harmony(SPEC, stdin=b"\xff\xfe")
    assert r.returncode == 3 and b"<stdin>: not UTF-8" in r.stderr
    r = harmony(SPEC, tmp_path / "absent.json")
    assert r.returncode == 3 and b"cannot read" in r.stderr and b"absent.json" in r.stderr


def test_context_must_be_an_object(tmp_path):
    ctx = tmp_path / "c.json"
    ctx.write_text("[1]")
    r = harmony("--context", ctx, SPEC, GOLDEN_IN)
    assert r.returncode == 3 and b"must be a JSON object" in r.stderr
