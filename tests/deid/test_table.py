"""The attribute table is the standard's own, and the committed module is exactly what the generator makes."""

import hashlib
import subprocess
import sys
from pathlib import Path

from harmony.deid import table

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "third_party" / "dicom-standard" / "confidentiality_profile_attributes.json"
PINNED_SHA256 = "a99a35d1278e2bace8d90ff791b11aea2d45f1e3e1230388eb5224c9dbcd29e6"


def test_source_is_the_pinned_2024b_table():
    assert hashlib.sha256(SOURCE.read_bytes()).hexdigest() == PINNED_SHA256
    assert table.SOURCE_SHA256 == PINNED_SHA256
    assert table.REVISION == "2024b"
    assert table.SOURCE_COMMIT == "8670abdd9ad16c61af5146ef857899699bdd9c5f"
    assert PINNED_SHA256 in (SOURCE.parent / "SOURCE.md").read_text()


def test_committed_module_is_the_generator_output():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen-deid-table"), "--stdout"],
                         check=True, capture_output=True, text=True).stdout
    assert out == (ROOT / "src" / "harmony" / "deid" / "table.py").read_text()
    # and the installed copy is the same module
    assert out == Path(table.__file__).read_text()


def test_table_covers_the_whole_standard_table():
    import json
    rows = json.loads(SOURCE.read_text())
    assert len(table.ATTRIBUTES) + len(table.MASKED) + 1 == len(rows) == 621
    by_tag = {t: (name, basic, opts) for t, name, basic, opts in table.ATTRIBUTES}
    assert by_tag[0x00100010] == ("Patient's Name", "Z", {})
    assert by_tag[0x0020000D] == ("Study Instance UID", "U", {"retain_uids": "K"})
    assert by_tag[0x00100020][1] == "Z/D"
    assert table.PRIVATE == ("Private Attributes", "X", {"retain_safe_private": "C"})
