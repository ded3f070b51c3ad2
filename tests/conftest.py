import pytest
import pytest_twisted

from tests.harness import RecordingUpstream, listen


@pytest.fixture
def upstream():
    """A recording HTTP upstream on a real loopback port."""
    resource = RecordingUpstream()
    port = listen(resource)
    resource.url = f"http://127.0.0.1:{port.getHost().port}"
    yield resource
    pytest_twisted.blockon(port.stopListening())
