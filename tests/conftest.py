import pytest
import pytest_twisted

from tests.harness import RecordingUpstream, listen

#: the peers / in-process tiers: tests/tiers.py
pytest_plugins = ["tests.tiers"]


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
