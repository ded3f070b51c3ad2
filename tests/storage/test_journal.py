"""The journal of a plain folder of files (harmony.storage.journal, ``dicom_scp``'s ``storage_dir``).

A placed file is answered for once its bytes are committed in the journal; its
own flushes finish behind.  Here a real process is killed (``os._exit(9)``)
right after a placement returned - its file's data sync and folder fsync not
awaited - and a new process opens the folder's journal: the dead process's
rows are written again.  A power loss at that point can leave the file cut
short or its name missing; no test can pull this machine's power, so the test
does that to the file itself before reopening (the one fake here).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from harmony.storage.journal import FolderJournal

KILLED_AFTER_PLACING = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from harmony.storage.journal import FolderJournal
    folder, src, rel = sys.argv[1:]
    journal = FolderJournal(Path(folder))
    journal.open()
    journal.place(Path(src), Path(folder) / rel)
    os._exit(9)  # answered; the file's flushes may still be running, the row is not deleted
""")


def killed_after_placing(folder, src, rel):
    result = subprocess.run([sys.executable, "-c", KILLED_AFTER_PLACING, str(folder), str(src), rel],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 9, result.stderr


def test_a_placed_file_is_in_place_at_once_and_the_journal_goes_when_closed(tmp_path):
    folder = tmp_path / "out"
    src = tmp_path / "in.dcm"
    src.write_bytes(b"x" * 5000)
    journal = FolderJournal(folder)
    assert journal.open() == 0
    journal.place(src, folder / "1.2" / "3.4" / "5.6.dcm")
    assert (folder / "1.2" / "3.4" / "5.6.dcm").read_bytes() == b"x" * 5000  # readers find it at once
    assert not src.exists()
    assert journal.path.exists()
    journal.close()
    assert not journal.path.exists()  # every row settled: nothing to replay


def test_a_file_too_large_for_the_journal_is_moved_the_classic_way(tmp_path):
    folder = tmp_path / "out"
    src = tmp_path / "big.dcm"
    src.write_bytes(b"y" * 3000)
    journal = FolderJournal(folder, max_bytes=1000)
    journal.open()
    journal.place(src, folder / "a.dcm")
    assert (folder / "a.dcm").read_bytes() == b"y" * 3000
    assert journal._conns == []  # never journaled
    journal.close()


def test_an_existing_name_is_replaced(tmp_path):
    folder = tmp_path / "out"
    (folder / "s").mkdir(parents=True)
    (folder / "s" / "a.dcm").write_bytes(b"old")
    src = tmp_path / "new.dcm"
    src.write_bytes(b"new" * 100)
    journal = FolderJournal(folder)
    journal.open()
    journal.place(src, folder / "s" / "a.dcm")
    assert (folder / "s" / "a.dcm").read_bytes() == b"new" * 100
    journal.close()


def test_what_a_killed_process_journaled_is_written_again_after_a_power_loss(tmp_path):
    folder = tmp_path / "out"
    data = os.urandom(9000)
    for name, damage in (("cut", lambda p: p.write_bytes(p.read_bytes()[:100])), ("lost", lambda p: p.unlink())):
        src = tmp_path / f"{name}.dcm"
        src.write_bytes(data)
        killed_after_placing(folder, src, f"st/se/{name}.dcm")
        journals = list((folder / ".journal").glob("*.sqlite"))
        assert len(journals) == 1  # the dead process's, with its row
        damage(folder / "st" / "se" / f"{name}.dcm")  # the fake power loss (see the module docstring)
        journal = FolderJournal(folder)
        assert journal.open() == 1
        assert (folder / "st" / "se" / f"{name}.dcm").read_bytes() == data
        assert list((folder / ".journal").glob("*.sqlite")) == []  # replayed once, then gone
        journal.close()
