"""harmony.dicom.render: a result stream written as DICOM JSON or multipart/related as it arrives;
a stream that fails after the head fails the body (never a truncated answer that looks whole)."""

from __future__ import annotations

import io

import pytest
import pytest_twisted
from pydicom.dataset import Dataset

from harmony.dicom import status as dimse
from harmony.dicom.render import ResultBodyProducer, StreamBroken, release_rest
from harmony.dicom.results import DicomInstance, ResultStream
from harmony.dicomweb.multipart import StowParser
from harmony.errors import client_gone
from tests.memory import request, result_of


def _match(pid):
    ds = Dataset()
    ds.PatientID = pid
    return ds


@pytest_twisted.ensureDeferred
async def test_find_results_as_a_dicom_json_array():
    stream = ResultStream()
    stream.put(_match("SYN-1"))
    stream.put({"00100020": {"vr": "LO", "Value": ["SYN-2"]}})  # a JSON match passes as it is
    stream.finish()
    producer = ResultBodyProducer(stream)
    sink = io.BytesIO()
    await producer.startProducing(sink)
    assert producer.content_type == "application/dicom+json"
    assert sink.getvalue() == (b'[{"00100020":{"vr":"LO","Value":["SYN-1"]}},'
                               b'{"00100020":{"vr":"LO","Value":["SYN-2"]}}]')


@pytest_twisted.ensureDeferred
async def test_instances_as_multipart_each_file_released(tmp_path):
    files = []
    stream = ResultStream()
    for i in range(2):
        path = tmp_path / f"{i}.dcm"
        path.write_bytes(b"DICM" * (i + 1))
        files.append(path)
        stream.put(DicomInstance(path, owned=True))
    stream.finish()
    producer = ResultBodyProducer(stream, "multipart", boundary="bnd")
    sink = io.BytesIO()
    await producer.startProducing(sink)
    parser = StowParser("bnd", tmp_path / "parsed")
    parser.feed(sink.getvalue())
    assert [open(p.path, "rb").read() for p in parser.close()] == [b"DICM", b"DICMDICM"]
    assert producer.content_type == 'multipart/related; type="application/dicom"; boundary=bnd'
    assert not any(p.exists() for p in files)  # staged files go once written


@pytest_twisted.ensureDeferred
async def test_a_failure_after_the_head_fails_the_body():
    stream = ResultStream()
    stream.put(_match("SYN-1"))
    stream.finish(0xA700, "out of resources")
    with pytest.raises(StreamBroken, match="0xA700"):
        await ResultBodyProducer(stream).startProducing(io.BytesIO())


def test_release_rest_takes_and_releases_what_is_left(tmp_path):
    path = tmp_path / "left.dcm"
    path.write_bytes(b"x")
    stream = ResultStream()
    stream.put(DicomInstance(path, owned=True))
    stream.finish()
    result_of(release_rest(stream))
    assert not path.exists() and stream.pending == 0


@pytest.mark.parametrize("pacs_done_first", [True, False])
def test_a_body_stopped_by_its_client_marks_the_request_before_cancelling(tmp_path, pacs_done_first):
    """Only the HTTP layer stops a body, and only when its client left.  The request is
    marked client-gone before the stream is cancelled: a target pool decides at the
    stream's abandonment whether it was a client abort, and when the PACS had finished
    that is at once, before the endpoint hears that the connection was lost."""
    stream = ResultStream()
    staged = tmp_path / "1.dcm"
    staged.write_bytes(b"DICM")
    stream.put(DicomInstance(staged, owned=True))
    if pacs_done_first:
        stream.finish()
    env = request()
    verdicts = []
    stream.when_abandoned().addCallback(lambda _: verdicts.append(client_gone(env)))
    ResultBodyProducer(stream, "multipart", request=env).stopProducing()
    if not pacs_done_first:
        assert stream.cancelled  # C-CANCEL asked; the PACS ends after it
        stream.finish(dimse.CANCEL)
    assert verdicts == [True] and not staged.exists()
