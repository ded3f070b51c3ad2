"""``harmony deidentify`` on files and folders, run as a user runs it (the installed console script)."""

import json
import subprocess
import sys
from pathlib import Path

from pydicom import dcmread

from tests.deid.synthetic import PATIENT_NAME, full_instance, simple_instance

HARMONY = str(Path(sys.executable).with_name("harmony"))
ROOT = "1.2.826.0.1.3680043.9999.88."


def harmony(*args, cwd=None):
    return subprocess.run([HARMONY, "deidentify", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def corpus(folder: Path):
    (folder / "sub").mkdir(parents=True)
    full_instance().save_as(folder / "DOE_JOHN.dcm", enforce_file_format=True)
    simple_instance(ROOT + "1", ROOT + "1.1", ROOT + "1.1.1").save_as(folder / "sub" / "a.dcm",
                                                                      enforce_file_format=True)
    simple_instance(ROOT + "1", ROOT + "1.2", ROOT + "1.2.1", modality="US",
                    sop_class="1.2.840.10008.5.1.4.1.1.6.1").save_as(folder / "sub" / "us.dcm",
                                                                     enforce_file_format=True)
    (folder / "sub" / "notes.txt").write_text("not DICOM")


def test_keygen_then_folder_then_same_result_again(tmp_path):
    corpus(tmp_path / "in")
    assert harmony("--keygen", tmp_path / "k").returncode == 0
    assert harmony("--keygen", tmp_path / "k").returncode == 1  # never overwrites a secret
    r = harmony("--key", tmp_path / "k", "--retain-longitudinal", "modified", tmp_path / "in", "-o", tmp_path / "out",
                "--report", tmp_path / "report.json")
    assert r.returncode == 1, r.stderr  # notes.txt is not DICOM: reported, the rest done
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["files"] == {"deidentified": 2, "quarantined": 1, "error": 1}
    assert "113107" in summary["profile_codes"]
    written = sorted((tmp_path / "out").rglob("*.dcm"))
    assert len(written) == 2 and all(p.name.startswith("2.25.") for p in written)
    assert not any(b"SECRET" in p.read_bytes() or b"DOE" in p.read_bytes() for p in written)
    report = json.loads((tmp_path / "report.json").read_text())
    assert PATIENT_NAME not in json.dumps(report) and "SECRET" not in json.dumps(report)
    full = next(f for f in report["files"] if f["input"].endswith("DOE_JOHN.dcm"))
    assert {"(0010,0010)", "(0020,000D)"} <= {c["tag"] for c in full["changes"]}
    # a second run with the same secret writes the same files
    r2 = harmony("--key", tmp_path / "k", "--retain-longitudinal", "modified", tmp_path / "in", "-o", tmp_path / "out2")
    again = sorted((tmp_path / "out2").rglob("*.dcm"))
    assert [p.relative_to(tmp_path / "out2") for p in again] == [p.relative_to(tmp_path / "out") for p in written]
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in written], r2.stderr


def test_dry_run_writes_nothing_and_options_file_is_the_middleware_format(tmp_path):
    corpus(tmp_path / "in")
    harmony("--keygen", tmp_path / "k")
    (tmp_path / "deid.toml").write_text('secret_file = "k"\nretain_uids = true\n[pixels]\nsuspect = "forward"\n')
    r = harmony("--options", tmp_path / "deid.toml", "--dry-run", tmp_path / "in" / "sub" / "a.dcm",
                tmp_path / "in" / "sub" / "us.dcm")
    assert r.returncode == 0, r.stderr
    assert "would be de-identified (modality US)" in r.stdout
    assert json.loads(r.stdout.strip().splitlines()[-1])["files"] == {"deidentified": 2}
    assert not list(tmp_path.rglob("2.25.*"))
    r = harmony("--options", tmp_path / "deid.toml", tmp_path / "in" / "sub" / "a.dcm", "-o", tmp_path / "o")
    (out,) = (tmp_path / "o").rglob("*.dcm")
    assert dcmread(out).SOPInstanceUID == ROOT + "1.1.1"  # Retain UIDs


def test_bad_options_name_the_key(tmp_path):
    (tmp_path / "deid.toml").write_text('secret_file = "missing.key"\n')
    r = harmony("--options", tmp_path / "deid.toml", "--dry-run", tmp_path)
    assert r.returncode == 1 and "secret_file" in r.stderr and "missing.key" in r.stderr
    (tmp_path / "k").write_text("x" * 40)
    r = harmony("--key", tmp_path / "k", "--safe-private", "0028,NOPE,10", "--dry-run", tmp_path)
    assert r.returncode == 1 and "safe_private" in r.stderr
