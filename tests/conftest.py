import pytest
import pytest_twisted
from hypothesis import settings
from pynetdicom import _config as pynetdicom_config

from tests.harness import RecordingUpstream, listen

# Hypothesis's per-example deadline (200 ms) is a timed test: on a loaded 2-core machine an example of a fast
# property took longer and failed the run (tests/dicom/test_uids.py, load 15). Properties here assert behaviour;
# speed is measured in bench/. Every property test runs without a deadline.
settings.register_profile("harmony", deadline=None)
settings.load_profile("harmony")

#: the peers / in-process tiers: tests/tiers.py
pytest_plugins = ["tests.tiers"]

# Tests that drive plain pynetdicom clients and SCPs (reference peers) send a
# file with C-STORE as its bytes are, and receive to files: a corrupt or
# compressed test file must reach Harmony unchanged, not decoded and
# re-encoded by pynetdicom.  (Harmony itself no longer runs pynetdicom's
# association machinery, so nothing in src/ sets these any more.)
pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True


@pytest.fixture(scope="session", autouse=True)
def _pynetdicom_receives_into_the_runs_folder(tmp_path_factory):
    """pynetdicom writes each received C-STORE data set to a ``NamedTemporaryFile(delete=False)``
    in /tmp and removes it only after a C-STORE handler ran: an association that ends mid data
    set, or a C-GET's sub-operations, left them there (12 ``tmp*.dcm`` a run).  Here they go to
    the run's own folder instead, which pytest removes."""
    import functools

    from pynetdicom import dimse_messages
    real = dimse_messages.NamedTemporaryFile
    dimse_messages.NamedTemporaryFile = functools.partial(real, dir=tmp_path_factory.mktemp("pynetdicom-received"))
    yield
    dimse_messages.NamedTemporaryFile = real


#: The run's folder (pytest's base temp), for pytest_sessionfinish.
_RUNS_FOLDER: list = []


@pytest.fixture(scope="session", autouse=True)
def _the_runs_folder(tmp_path_factory):
    _RUNS_FOLDER.append(tmp_path_factory.getbasetemp())
    yield


def pytest_sessionfinish(session, exitstatus):
    """A green run leaves nothing in /tmp; a red one keeps its folder to look into.

    pytest keeps the folders of the last three runs (``/tmp/pytest-of-<user>``): ~530 MB
    after a full run (stores, archives, peers' folders) left on every machine the suite ran
    on, CI's included.  Every fixture has been torn down by now (peers stopped).  A
    ``--basetemp`` given on the command line is the caller's and stays."""
    if exitstatus != 0 or not _RUNS_FOLDER or session.config.getoption("basetemp"):
        return
    import shutil
    folder = _RUNS_FOLDER[0]
    shutil.rmtree(folder, ignore_errors=True)
    parent = folder.parent   # pytest-of-<user>
    current = parent / f"{folder.name.rsplit('-', 1)[0]}-current"
    if current.is_symlink() and current.resolve(strict=False) == folder:
        current.unlink()
    try:
        parent.rmdir()   # only when nothing else (an earlier run's folder) is in it
    except OSError:
        pass


@pytest.fixture
def dead_port():
    """A loopback port where nothing listens for the whole test: bound, never
    listening, so connections are refused and no other process can take it
    (a port from free_port() may be listening by the time it is used)."""
    from tests.sf_helpers import PortHold
    hold = PortHold()
    yield hold.port
    hold.release()


@pytest.fixture
def upstream():
    """A recording HTTP upstream on a real loopback port."""
    resource = RecordingUpstream()
    port = listen(resource)
    resource.url = f"http://127.0.0.1:{port.getHost().port}"
    yield resource
    pytest_twisted.blockon(port.stopListening())


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The synthetic DICOM corpus (see tests/dicom_data.py), written once per run."""
    from tests.dicom_data import make_corpus
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory, corpus):
    """A real Orthanc (DICOM + DICOMweb) loaded with the corpus, shared by the run.

    Tests that store into it use fresh UIDs so they never disturb each other.
    """
    from tests.peers import Orthanc
    server = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    server.upload(i.path for i in corpus)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def store_orthanc(tmp_path_factory):
    """An empty Orthanc for tests that store (the shared ``orthanc`` must keep exactly the corpus)."""
    from tests.peers import Orthanc
    server = Orthanc(tmp_path_factory.mktemp("store-orthanc")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL 15 cluster on 127.0.0.1 (tests/postgres.py), shared by the run."""
    from tests.postgres import PostgresServer
    server = PostgresServer().start()
    yield server
    server.stop()


#: The index and queue implementations every storage test runs against.
INDEXES = ("sqlite", "postgresql")


@pytest.fixture(params=INDEXES)
def index_kind(request):
    return request.param


@pytest.fixture
def new_store(request, index_kind):
    """``new_store(root, **options)``: an InstanceStore on *index_kind*.

    On PostgreSQL each test gets a fresh database, and every store the test
    opens shares it (a store reopened on the same root finds its rows).
    """
    from tests.postgres import database_for
    database = database_for(request, index_kind)
    return database


@pytest.fixture
def queue_conn(request, index_kind):
    """A bare connection with the queue and index schema, on *index_kind*."""
    from tests.postgres import bare_connection
    conn = bare_connection(request, index_kind)
    yield conn
    conn.close()


@pytest.fixture
def own_postgres():
    """A PostgreSQL of the test's own, for tests that restart or stop it."""
    from tests.postgres import PostgresServer
    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture
def own_s3():
    """An S3-compatible server of the test's own, for tests that stop and start it."""
    from tests.s3 import S3Server
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3():
    """A real S3-compatible server (SeaweedFS, tests/s3.py) on 127.0.0.1, shared by the run."""
    from tests.s3 import S3Server
    server = S3Server().start()
    yield server
    server.stop()
