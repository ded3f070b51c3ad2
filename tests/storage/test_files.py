"""harmony.storage.files: claiming a file's final name."""

from __future__ import annotations

import os

from harmony.storage.files import claim_name


def test_a_new_name_is_linked_and_its_missing_folders_made(tmp_path):
    stop = tmp_path / "instances"
    stop.mkdir()
    src = tmp_path / ".a.part"
    src.write_bytes(b"one")
    final = stop / "1.2" / "1.3" / "1.4.dcm"
    assert claim_name(src, final, stop) is True   # new: its data sync is the caller's
    assert final.read_bytes() == b"one" and not src.exists()


def test_keep_source_leaves_the_temp_name_for_later_and_an_existing_name_takes_it_by_rename(tmp_path):
    stop = tmp_path / "instances"
    (stop / "s").mkdir(parents=True)
    src = tmp_path / ".b.part"
    src.write_bytes(b"first")
    final = stop / "s" / "x.dcm"
    assert claim_name(src, final, stop, keep_source=True) is True
    assert os.stat(src).st_ino == os.stat(final).st_ino and os.stat(final).st_nlink == 2
    src.unlink()   # what the store's idle thread does later
    again = tmp_path / ".c.part"
    again.write_bytes(b"second")
    assert claim_name(again, final, stop, keep_source=True) is False   # existing: synced, then renamed over it
    assert final.read_bytes() == b"second" and not again.exists()
