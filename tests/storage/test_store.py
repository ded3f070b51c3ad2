"""The durable store: atomic layout, UID validation, disk guard, index, streaming ingest."""

from __future__ import annotations

import io
import json
import os

import pytest
import pytest_twisted
from hypothesis import example, given
from hypothesis import strategies as st
from twisted.web.client import FileBodyProducer

from harmony.storage.errors import InvalidInstance, StorageFull
from harmony.storage.query import PATIENT_ROOT, PLAIN_TEXT_VRS, plain_json_elements, query_keys, value_matches
from harmony.storage.store import InstanceStore
from harmony.storage.uids import is_valid_uid
from tests.dicom_data import make_instance, save


@pytest.fixture
def store(tmp_path, new_store):
    s = new_store(tmp_path / "store", min_free_bytes=0)
    yield s
    s.close()


def leftovers(store) -> list:
    """Temp files left behind (not counting the empty ones made ahead for the next instances).
    Looked at with the spares' tending held off: the flush thread behind the answers makes
    spares and removes used names after its rounds, and a name made or removed between the
    listing and the look at the spares read as left behind (seen once in CI)."""
    with store.spares._tending:
        spares = store.spares.held()
        return [p for p in store.tmp_dir.iterdir() if p not in spares]


@pytest_twisted.ensureDeferred
async def test_corpus_is_filed_by_uid_and_indexed(store, corpus):
    for inst in corpus:
        stored = await store.put_file(inst.path)
        assert stored.path == store.instances_dir / inst.study_uid / inst.series_uid / f"{inst.sop_uid}.dcm"
        assert stored.path.read_bytes() == inst.path.read_bytes()
        assert not stored.owned
    counts = await store.read(lambda c: {t: c.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                                         for t in ("patients", "studies", "series", "instances")})
    assert counts == {"patients": 3, "studies": 4, "series": 9, "instances": 22}
    assert leftovers(store) == []
    # Storing the same instance again replaces it: still one row, one file.
    await store.put_file(corpus[0].path)
    assert (await store.run(store.counts_sync))["instances"] == 22
    if not store.shared:
        mode = await store.read(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0])
        assert mode == "wal"


@pytest_twisted.ensureDeferred
async def test_owned_staging_file_is_moved_not_copied(store, corpus, tmp_path):
    store.open_sync()
    staged = store.root / "staged.dcm"  # same filesystem as the store
    staged.write_bytes(corpus[3].path.read_bytes())
    from harmony.dicom.results import DicomInstance
    stored = await store.put_instance(DicomInstance(path=staged, owned=True))
    assert not staged.exists()
    assert stored.path.read_bytes() == corpus[3].path.read_bytes()


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length")
@pytest.mark.parametrize("bad_uid", ["../../../../tmp/evil", "1.2.3/../../x", "1.2.abc", "", "1." + "2" * 70,
                                     "1..2", "/etc/passwd"])
@pytest_twisted.ensureDeferred
async def test_uids_that_are_not_uids_never_become_paths(store, tmp_path, bad_uid):
    ds = make_instance()
    ds.SOPInstanceUID = bad_uid
    path = save(ds, tmp_path / "bad.dcm")
    with pytest.raises(InvalidInstance):
        await store.put_file(path)
    assert list(store.instances_dir.rglob("*")) == []
    assert leftovers(store) == []
    assert (await store.run(store.counts_sync))["instances"] == 0


@pytest_twisted.ensureDeferred
async def test_not_dicom_is_refused(store, tmp_path):
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"hello, this is not DICOM" * 10)
    with pytest.raises(InvalidInstance):
        await store.put_file(junk)
    assert leftovers(store) == []


@given(st.text(max_size=80))
def test_uid_validation_admits_only_digits_and_dots(text):
    if is_valid_uid(text):
        assert set(text) <= set("0123456789.") and ".." not in text and not text.startswith(".")
        assert len(text) <= 64 and not text.endswith(".")


@pytest_twisted.ensureDeferred
async def test_disk_guard_refuses_before_writing(tmp_path, new_store, corpus):
    free = {"bytes": 10_000_000}
    s = new_store(tmp_path / "guarded", min_free_bytes=9_999_000, free_bytes=lambda: free["bytes"])
    try:
        with pytest.raises(StorageFull) as e:
            await s.put_file(corpus[0].path)
        assert e.value.status == 507 and e.value.dimse_status == 0xA700
        assert list(s.instances_dir.rglob("*.dcm")) == [] and leftovers(s) == []
        free["bytes"] = 100_000_000
        await s.put_file(corpus[0].path)
        assert len(list(s.instances_dir.rglob("*.dcm"))) == 1
    finally:
        s.close()


@pytest_twisted.ensureDeferred
async def test_stream_refused_midway_leaves_nothing(tmp_path, new_store):
    """A body of unknown length crossing the floor while it streams is refused
    and its temp file removed: the refusal never follows a claimed write."""
    checks = []

    def free_bytes():
        checks.append(1)
        return 10**12 if len(checks) < 2 else 1  # plenty at first, then the disk "fills"

    s = new_store(tmp_path / "filling", min_free_bytes=1024, free_bytes=free_bytes)
    try:
        body = FileBodyProducer(io.BytesIO(b"\0" * (40 * 1024 * 1024)))
        body.length = object()  # unknown length: only the streaming re-check can catch it
        with pytest.raises(StorageFull):
            await s.put_producer(body)
        assert leftovers(s) == [] and list(s.instances_dir.rglob("*")) == []
    finally:
        s.close()


@pytest_twisted.ensureDeferred
async def test_producer_ingest_streams_to_the_same_file(store, corpus):
    inst = corpus[5]
    stored = await store.put_producer(FileBodyProducer(open(inst.path, "rb")))
    assert stored.path.read_bytes() == inst.path.read_bytes()
    assert stored.sop_instance_uid == inst.sop_uid
    assert leftovers(store) == []


def test_building_a_store_touches_no_disk(tmp_path):
    """``harmony check`` builds every component: that must not create a store."""
    s = InstanceStore(tmp_path / "not-yet", min_free_bytes=0)
    try:
        assert not (tmp_path / "not-yet").exists()
        assert s.guard.free_bytes() > 0  # measured on the nearest existing parent
    finally:
        s.close()


def test_crash_leftovers_are_cleared_on_open(tmp_path, new_store):
    s = new_store(tmp_path / "s", min_free_bytes=0)
    s.open_sync()
    s.close()
    (s.tmp_dir / ".deadbeef.part").write_bytes(b"half an instance")
    s2 = new_store(tmp_path / "s", min_free_bytes=0)
    try:
        s2.open_sync()
        assert leftovers(s2) == []
    finally:
        s2.close()


@pytest.mark.parametrize("vr,query,stored,expected", [
    ("PN", "test^al*", ["TEST^ALPHA"], True),
    ("PN", "TEST^ALPH?", ["TEST^ALPHA"], True),
    ("PN", "TEST", ["TEST^ALPHA"], False),
    ("LO", "pat00*", ["PAT001"], False),  # only PN is case-insensitive
    ("LO", "PAT00*", ["PAT001"], True),
    ("DA", "20240101-20241231", ["20240315"], True),
    ("DA", "-20231231", ["20240315"], False),
    ("DA", "2024-", ["20240315"], True),
    ("TM", "1000-1100", ["101500"], True),
    ("TM", "1020-", ["101500"], False),
    ("UI", "1.2*", ["1.2.3"], False),  # no wildcards on UIDs
    ("IS", "1", ["1"], True),
    ("CS", "MR", ["CT", "MR"], True),
])
def test_matching_rules(vr, query, stored, expected):
    assert value_matches(vr, query, stored) is expected


_PLAIN_KEYS = {"UI": ["0020000D", "0020000E"], "LO": ["00100020"], "CS": ["00080061", "00080052"], "DA": ["00080020"],
               "TM": ["00080030"], "SH": ["00080050"], "LT": ["00081030"], "AE": ["00080054"], "DT": ["0008002A"],
               "AS": ["00101010"], "ST": ["00081080"], "UC": ["00189381"], "UR": ["00081190"], "UT": ["00400441"]}
_plain_element = st.sampled_from(sorted(PLAIN_TEXT_VRS)).flatmap(lambda vr: st.tuples(
    st.sampled_from(_PLAIN_KEYS[vr]), st.just(vr),
    st.one_of(st.none(), st.lists(st.text(alphabet="1.2 A*\\-", max_size=6), max_size=3))))


_return_key = st.tuples(st.sampled_from(["00100010", "00201206", "00081032", "7FE00010", "00080061"]),
                        st.sampled_from(["PN", "IS", "SQ", "OB", "CS", "US"]), st.sampled_from([None, []]))


@given(st.lists(st.one_of(_plain_element, _return_key), max_size=6),
       st.sampled_from(["PATIENT", "STUDY", "SERIES", "IMAGE"]))
@example([("0020000D", "UI", [" 1.2 \\ 3.4 "]), ("0020000E", "UI", [" 1.2 ", " ", "5"])], "IMAGE")
@example([("00100020", "LO", [" a\\\\b "]), ("00080061", "CS", ["CT\\", ""]), ("00080020", "DA", [])], "STUDY")
def test_plain_dicom_json_gives_the_keys_pydicom_reading_gives(elements, level):
    """A DICOMweb query's identifier is read without pydicom when it is plain
    text; the keys (values split, UIDs unpadded, empties dropped, tag order)
    must be exactly those of the Dataset it used to become."""
    import warnings

    from pydicom.dataset import Dataset
    doc = {tag: ({"vr": vr} if value is None else {"vr": vr, "Value": value}) for tag, vr, value in elements}
    assert plain_json_elements(doc) is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UIDs generated here
        expected = query_keys(Dataset.from_json(doc), level, PATIENT_ROOT)
    assert query_keys(doc, level, PATIENT_ROOT) == expected


@pytest.mark.parametrize("doc", [
    {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^J"}]}},  # person-name groups
    {"00201208": {"vr": "IS", "Value": [3]}},  # numbers
    {"0020000d": {"vr": "UI", "Value": ["1.2"]}},  # lower-case tag
    {"0020000D": {"vr": "UI", "Value": [None]}},
    {"0020000D": {"vr": "UI", "Value": "1.2"}},  # not a list
    {"0020000D": {"vr": "UI", "InlineBinary": "AAAA"}},
    {"00100010": {"vr": "XX"}},  # no such VR: left to pydicom
    {"0020000D": "1.2"},
])
def test_anything_else_is_left_to_pydicom(doc):
    assert plain_json_elements(doc) is None


@given(st.text(alphabet="AB*?^", max_size=8), st.text(alphabet="AB^", max_size=8))
def test_wildcards_agree_with_fnmatch(pattern, value):
    import fnmatch
    if pattern:  # an empty key is universal matching, decided before value_matches
        assert value_matches("LO", pattern, [value]) == fnmatch.fnmatchcase(value, pattern)


@pytest_twisted.ensureDeferred
async def test_truncated_instance_is_refused(store, corpus, tmp_path):
    """A body cut short (a dropped connection, a full disk upstream) parses as a
    header with missing pixels; it must be refused, not filed and acknowledged."""
    data = corpus[0].path.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[:-100])
    with pytest.raises(InvalidInstance):
        await store.put_file(cut)
    with pytest.raises(InvalidInstance):
        await store.put_bytes(data[:-100])
    assert list(store.instances_dir.rglob("*.dcm")) == [] and leftovers(store) == []


@pytest_twisted.ensureDeferred
async def test_ingest_reads_common_instances_without_pydicom(store, corpus, monkeypatch):
    """The store describes a received instance from its bytes (harmony.dicom.rawscan): no
    pydicom parse on the common path, and the same index row and stored metadata as pydicom's
    parse gives (the whole corpus, RLE and multi-frame included, then once more through pydicom)."""
    from harmony.dicom import files
    parses = []
    real = files.dcmread
    monkeypatch.setattr(files, "dcmread", lambda *a, **k: parses.append(a) or real(*a, **k))
    rows = ("SELECT sop_uid, sop_class_uid, transfer_syntax_uid, relpath, size, attrs, metadata FROM instances "
            "ORDER BY sop_uid")
    for inst in corpus:
        await store.put_file(inst.path)
    assert parses == []
    scanned = await store.read(lambda c: c.execute(rows).fetchall())
    monkeypatch.setattr("harmony.storage.store.scan_file", _declined)
    for inst in corpus:
        await store.put_file(inst.path)
    assert len(parses) == len(corpus)
    assert await store.read(lambda c: c.execute(rows).fetchall()) == scanned


def _declined(path):
    from harmony.dicom.rawscan import ScanDeclined
    raise ScanDeclined("test: every file through pydicom")


@pytest_twisted.ensureDeferred
async def test_what_the_scanner_declines_pydicom_files(store, tmp_path):
    """A Latin-1 patient name is left to pydicom: filed and indexed as before."""
    ds = make_instance(sop_uid="1.2.826.0.1.3680043.10.1442.78.1")
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Müller^Jürgen"
    stored = await store.put_file(save(ds, tmp_path / "latin.dcm"))
    attrs = await store.read(lambda c: c.execute("SELECT attrs FROM instances WHERE sop_uid = ?",
                                                 (stored.sop_instance_uid,)).fetchone()[0])
    assert json.loads(attrs)["00100010"]["Value"] == [{"Alphabetic": "Müller^Jürgen"}]


# ---------------------------------------------------------------------- instances held in memory


@pytest_twisted.ensureDeferred
async def test_an_instance_held_in_memory_is_filed_from_its_bytes(store, corpus):
    """A small C-STORE data set received into memory (``DicomInstance.data``): filed
    from its bytes (no file of its own before), checked against the UIDs it came
    with, and on a journaling store its bytes ride in its in_flight row."""
    from harmony.dicom.results import DicomInstance
    inst = corpus[5]
    data = inst.path.read_bytes()
    received = DicomInstance(path=store.root / "never-made", data=[data[:300], data[300:]], unchecked=True,
                             sop_class_uid=inst.sop_class, sop_instance_uid=inst.sop_uid)
    stored = await store.put_instance(received)
    assert stored.path == store.instances_dir / inst.study_uid / inst.series_uid / f"{inst.sop_uid}.dcm"
    assert stored.path.read_bytes() == data
    assert (stored.study_instance_uid, stored.series_instance_uid) == (inst.study_uid, inst.series_uid)
    assert leftovers(store) == []
    if store.journal:
        journaled = await store.read(lambda c: c.execute("SELECT data FROM in_flight WHERE sop_uid=?",
                                                          (inst.sop_uid,)).fetchone())
        assert journaled is None or bytes(journaled[0]) == data   # (forgotten once its flushes finished)
    # The same instance again (its name exists): replaced, still one row.
    await store.put_instance(DicomInstance(path=store.root / "never-made", data=[data]))
    assert (await store.run(store.counts_sync))["instances"] == 1
    assert stored.path.read_bytes() == data and leftovers(store) == []


@pytest_twisted.ensureDeferred
async def test_an_instance_in_memory_that_is_not_what_it_came_as_is_refused_and_leaves_nothing(store, corpus):
    from harmony.dicom.results import DicomInstance
    from harmony.storage.errors import MismatchedInstance
    inst = corpus[6]
    data = inst.path.read_bytes()
    with pytest.raises(MismatchedInstance):
        await store.put_instance(DicomInstance(path=store.root / "x", data=[data], unchecked=True,
                                               sop_class_uid=inst.sop_class, sop_instance_uid="1.2.3.4"))
    with pytest.raises(InvalidInstance):
        await store.put_instance(DicomInstance(path=store.root / "x", data=[data[:-100]]))   # cut inside its pixel data
    with pytest.raises(InvalidInstance):
        await store.put_instance(DicomInstance(path=store.root / "x", data=[b"not DICOM at all"]))
    assert (await store.run(store.counts_sync))["instances"] == 0
    assert leftovers(store) == [] and not any(store.instances_dir.rglob("*.dcm"))
    assert store.counters["refused_invalid"] == 3


def test_the_flushes_behind_run_together_and_a_failure_is_its_tasks_own(tmp_path, monkeypatch):
    """Without ``syncfs`` (no folder given, or not Linux): tasks queued while the flush
    thread works go in its next round, a folder shared by them is fsynced once a round,
    and a sync that fails fails only its own task."""
    import threading

    from harmony.storage import store as store_module
    gate, synced = threading.Event(), []

    def fdatasync(path):
        if path.name == "first":
            gate.wait(30)   # the first round is still syncing while the others are queued
        if path.name == "broken":
            raise OSError(5, "Input/output error")
        synced.append(path.name)

    monkeypatch.setattr(store_module, "fdatasync_file", fdatasync)
    monkeypatch.setattr(store_module, "fsync_dir", lambda folder: synced.append(f"dir:{folder.name}"))
    behind = store_module._FlushesBehind()
    try:
        first = behind.submit([tmp_path / "first"], [tmp_path / "a"])
        later = [behind.submit([tmp_path / name], [tmp_path / "b"]) for name in ("one", "broken", "two")]
        gate.set()
        behind.wait_idle()
        assert first.result() is None
        assert later[0].result() is None and later[2].result() is None
        assert isinstance(later[1].exception(), OSError)
        assert synced == ["first", "dir:a", "one", "dir:b", "two"]   # folder b: once for the round
        behind.wait_idle()   # the thread sleeps now: a task wakes it, a stop ends it
        assert behind.submit([tmp_path / "woken"], []).result(timeout=30) is None
        behind.wait_idle()
    finally:
        gate.set()
        behind.stop()
    assert synced[-1] == "woken" and not behind._thread.is_alive()


def test_a_round_of_flushes_behind_is_one_syncfs_of_the_store_file_system(tmp_path, monkeypatch):
    """On Linux a round makes every task's files and folders durable with one ``syncfs``
    of the store's file system, not a ``fdatasync`` a file and a ``fsync`` a folder; a
    task whose folder cannot be looked at goes the file-by-file way, and fails alone."""
    from harmony.storage import store as store_module
    assert store_module._syncfs is not None   # this machine is Linux: the path bench/ingest measures
    calls, one_by_one = [], []
    real = store_module._syncfs
    monkeypatch.setattr(store_module, "_syncfs", lambda fd: (calls.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                              real(fd)))
    monkeypatch.setattr(store_module, "fdatasync_file", lambda path: one_by_one.append(path.name))
    folders = [tmp_path / "st" / f"se{i}" for i in range(2)]
    for folder in folders:
        folder.mkdir(parents=True)
    files = [folders[i % 2] / f"{i}.dcm" for i in range(6)]
    for path in files:
        path.write_bytes(b"x" * 100)
    behind = store_module._FlushesBehind(tmp_path)
    try:
        tasks = [behind.submit(files[i:i + 2], folders) for i in range(0, 6, 2)]
        gone = behind.submit([tmp_path / "gone" / "x.dcm"], [tmp_path / "gone"])
        behind.wait_idle()
        assert [t.result() for t in tasks] == [None, None, None]
        assert isinstance(gone.exception(), OSError)   # its folder's fsync met the missing folder
        assert calls and set(calls) == {str(tmp_path)} and len(calls) <= 2   # a round or two, not a file each
        assert one_by_one == ["x.dcm"]
    finally:
        behind.stop()


def test_a_failed_syncfs_fails_every_task_of_its_round(tmp_path, monkeypatch):
    """A write-back error ``syncfs`` reports belongs to every file of the round: none of
    them is known durable, so each task gets it (their in_flight rows stay for the next start)."""
    from harmony.storage import store as store_module

    def failing(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(store_module, "_syncfs", failing)
    (tmp_path / "se").mkdir()
    behind = store_module._FlushesBehind(tmp_path)
    try:
        tasks = [behind.submit([tmp_path / "se" / f"{i}.dcm"], [tmp_path / "se"]) for i in range(3)]
        behind.wait_idle()
        assert all(isinstance(t.exception(), OSError) for t in tasks)
        # A round that breaks otherwise (a bug) fails its tasks too, and the thread goes on.
        monkeypatch.setattr(store_module, "_syncfs", lambda fd: 1 / 0)
        assert isinstance(behind.submit([], [tmp_path / "se"]).exception(timeout=30), OSError)
        monkeypatch.setattr(store_module, "_syncfs", lambda fd: None)
        assert behind.submit([], [tmp_path / "se"]).result(timeout=30) is None
    finally:
        behind.stop()


# ---------------------------------------------------------------------- off the C-STORE's way: spares, checkpoints


def _tend(store):
    """What a storage thread with nothing to do runs (called here on a store thread, as it would be)."""
    return store.run(store._tend_spares, lambda: 0, True)


@pytest_twisted.ensureDeferred
async def test_instances_from_memory_use_temp_files_made_ahead_and_leave_none_behind(tmp_path, new_store, corpus):
    """A storage thread with nothing to do makes the temp files the next instances
    held in memory are written into, and removes the temp names new files were
    linked from; the instances land whole, and a clean close leaves ``tmp`` empty."""
    from harmony.storage.files import clear_temp
    store = new_store(tmp_path / "store", min_free_bytes=0)
    try:
        assert not any(store.tmp_dir.iterdir()) if store.tmp_dir.exists() else True
        first = corpus[0].path.read_bytes()
        await store.put_bytes(first)
        await _tend(store)
        spares = store.spares.held()
        assert spares and all(p.parent == store.tmp_dir and p.name.endswith(".part") for p in spares)
        assert {p.name for p in store.tmp_dir.iterdir()} == {p.name for p in spares}   # the used name is gone
        for inst in corpus[1:6]:
            stored = await store.put_bytes(inst.path.read_bytes())
            assert stored.path.read_bytes() == inst.path.read_bytes()
            assert stored.path.stat().st_nlink in (1, 2)   # (its temp name may not be removed yet)
        taken = spares - store.spares.held()
        assert taken, "no instance was written into a temp file made ahead"
        await _tend(store)
        assert all(p.stat().st_size == 0 for p in store.tmp_dir.iterdir())   # spares only: nothing written left
        assert all(p.stat().st_nlink == 1 for p in store.instances_dir.rglob("*.dcm"))
        # What a crash (kill -9) would leave: the start-up sweep's pattern takes the spares, not the instances.
        assert clear_temp(store.tmp_dir) == len(store.spares.held())
        assert (await store.run(store.counts_sync))["instances"] == 6
    finally:
        store.close()
    assert not any(store.tmp_dir.iterdir())
    assert all(p.read_bytes() for p in store.instances_dir.rglob("*.dcm"))


@pytest_twisted.ensureDeferred
async def test_a_store_that_never_files_from_memory_makes_no_spares(store, corpus):
    await store.put_file(corpus[0].path)
    await _tend(store)
    assert store.spares.held() == set() and leftovers(store) == [] and not any(store.tmp_dir.iterdir())


def test_spares_stop_for_a_while_when_they_cannot_be_made(tmp_path, monkeypatch):
    """A folder where files cannot be created (a full disk): no spare, no error - the
    instance meets (and reports) the error itself - and no retry before SPARE_RETRY_SECS."""
    from harmony.storage import store as store_module
    made = []

    def name():
        made.append(1)
        return tmp_path / "missing-folder" / ".x.part"
    spares = store_module._SpareTemps(name, size=2)
    assert spares.take() is None
    spares.tend()
    spares.tend()
    assert len(made) == 1 and spares.held() == set()
    monkeypatch.setattr(store_module, "SPARE_RETRY_SECS", 0.0)
    spares.tend()
    assert len(made) == 2
    spares.close()


@pytest_twisted.ensureDeferred
async def test_idle_storage_threads_checkpoint_the_index_and_commits_only_past_the_backstop(tmp_path, new_store,
                                                                                             corpus, monkeypatch):
    """The index's WAL is checkpointed by a storage thread with nothing to do, once
    enough commits are in it; a commit checkpoints only past the backstop."""
    from harmony.storage import store as store_module
    store = new_store(tmp_path / "store", min_free_bytes=0)
    try:
        monkeypatch.setattr(store_module, "CHECKPOINT_COMMITS", 10**9)   # none while the instances come
        for inst in corpus[:5]:
            await store.put_bytes(inst.path.read_bytes())
        if store.db.dialect != "sqlite":
            assert store.checkpoints == 0
            return
        backstop = await store.run(store.write_sync, lambda c: c.execute("PRAGMA wal_autocheckpoint").fetchone()[0])
        assert backstop == store_module.WAL_BACKSTOP_PAGES
        assert store.checkpoints == 0 and store._commits_since_checkpoint >= 5
        monkeypatch.setattr(store_module, "CHECKPOINT_COMMITS", 5)
        await _tend(store)   # (or the storage thread idle after the last commit does it: one of the two)
        assert store._commits_since_checkpoint == 0 and store.checkpoints == 1
        frames = await store.run(lambda: store.db.connection().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone())
        assert frames[1] == frames[2]   # every frame of the WAL is in the database
        await _tend(store)
        assert store.checkpoints == 1   # nothing committed since: not again
    finally:
        store.close()


def test_flushes_behind_hold_the_reactors_spin_off_while_a_round_is_on(tmp_path, monkeypatch):
    """harmony.compat.spin: a round's thread reports back through the GIL the spinning
    reactor holds, so the flushes count as working from the submit to the round's end,
    and not once they sleep or stopped."""
    import threading

    from harmony.compat import spin
    from harmony.storage import store as store_module

    entered, release = threading.Event(), threading.Event()
    monkeypatch.setattr(store_module, "_syncfs", lambda fd: (entered.set(), release.wait(10)))
    (tmp_path / "se").mkdir()
    (tmp_path / "se" / "1.dcm").write_bytes(b"x")
    behind = store_module._FlushesBehind(tmp_path)
    try:
        assert not behind.working
        task = behind.submit([tmp_path / "se" / "1.dcm"], [tmp_path / "se"])
        assert entered.wait(10)
        assert behind.working and spin.threads_working()
        release.set()
        behind.wait_idle()
        assert task.result() is None
        assert not behind.working
    finally:
        release.set()
        behind.stop()
    assert not behind.working
