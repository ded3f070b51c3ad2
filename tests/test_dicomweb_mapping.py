"""The bridge's mapping code without a PACS: QIDO -> C-FIND identifier,
Dataset -> DICOM JSON with BulkDataURIs, the multipart writer fed from a real
ResultStream, the incremental STOW parser, the metadata cache (task.Clock)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import pytest_twisted
from pydicom import dcmread
from pydicom.dataset import Dataset
from twisted.internet import defer, reactor, task

from harmony.dicom.results import DicomInstance, ResultStream
from harmony.dicomweb import qido, routes
from harmony.dicomweb.cache import BASE_PLACEHOLDER, MetadataCache, with_base
from harmony.dicomweb.dicomjson import dataset_to_json, find_result_to_json, instance_metadata
from harmony.dicomweb.multipart import MultipartWriter, Part, StowParser, multipart_bytes, parse_body
from harmony.dicomweb.pixels import extract_frames
from harmony.envelope import RequestEnvelope, ResponseEnvelope
from harmony.errors import BadRequest, NotAcceptable, NotFound, PayloadTooLarge
from harmony.middleware.dicomweb_bridge import DicomWebBridge
from tests.dicom_data import make_instance, save


def _request(method, path, query=()):
    dw = routes.parse_path(method, path)
    env = RequestEnvelope(method=method, subpath=path, query=list(query))
    if dw.service == "qido":
        dw.query, _ = qido.parse_query(env.query)
        qido.add_path_uids(dw.query, dw.study_uid, dw.series_uid)
        env.normalized = dw.query.match
    dw.base_url = "http://proxy.example/dw"
    env.state.dicomweb.request = dw
    return env


@pytest.fixture
def bridge(tmp_path):
    return DicomWebBridge("bridge", task.Clock(), tmp_path / "bridge")


def test_qido_becomes_c_find_identifier(bridge):
    env = bridge.on_request(_request("GET", "/studies/1.2.3/series", [("Modality", "CT"), ("includefield", "ProtocolName")]))
    ident = env.normalized
    assert env.metadata["dimse_op"] == "C-FIND" and env.metadata["query_level"] == "SERIES"
    assert ident["00080052"] == {"vr": "CS", "Value": ["SERIES"]}
    assert ident["00080060"] == {"vr": "CS", "Value": ["CT"]}          # matching key kept
    assert ident["0020000D"] == {"vr": "UI", "Value": ["1.2.3"]}       # path UID is a matching key
    assert ident["0020000E"] == {"vr": "UI"} and ident["00200011"] == {"vr": "IS"}  # required return keys
    assert ident["00181030"] == {"vr": "LO"}                            # includefield
    assert "00081190" not in ident                                      # RetrieveURL is built, not asked for
    # The identifier is what the dicom_scu backend parses.
    from harmony.dicom.dicomjson import identifier_from_json
    assert identifier_from_json(ident).Modality == "CT"


def test_wado_becomes_c_get_identifier(bridge):
    env = bridge.on_request(_request("GET", "/studies/1.2/series/1.3/instances/1.4/frames/1"))
    assert env.metadata["dimse_op"] == "C-GET" and env.metadata["query_level"] == "IMAGE"
    assert env.normalized == {"00080052": {"vr": "CS", "Value": ["IMAGE"]}, "0020000D": {"vr": "UI", "Value": ["1.2"]},
                              "0020000E": {"vr": "UI", "Value": ["1.3"]}, "00080018": {"vr": "UI", "Value": ["1.4"]}}


def test_wado_refuses_transcoding_it_cannot_do(bridge):
    env = _request("GET", "/studies/1.2")
    env.state.dicomweb.request.transfer_syntax = "1.2.840.10008.1.2.4.50"
    with pytest.raises(NotAcceptable):
        bridge.on_request(env)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the NUL padding is the point of the test
def test_qido_result_gets_retrieve_url_and_loses_dimse_keys(bridge):
    env = _request("GET", "/instances")
    ds = Dataset()
    ds.QueryRetrieveLevel = "IMAGE"
    ds.RetrieveAETitle = "PACS"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = "1.2\0", "1.3", "1.4"
    doc = bridge._qido_item(env.state.dicomweb.request, ds)
    assert "00080052" not in doc and "00080054" not in doc
    assert doc["00081190"]["Value"] == ["http://proxy.example/dw/studies/1.2/series/1.3/instances/1.4"]
    assert find_result_to_json(ds)["0020000D"]["Value"] == ["1.2"]


def test_dataset_json_uses_bulkdata_uris(tmp_path):
    ds = make_instance(sop_uid="1.2.3.4", rows=32, cols=32)
    seq_item = Dataset()
    seq_item.ReferencedSOPInstanceUID = "1.9"
    seq_item.add_new(0x00091010, "OB", b"\x01" * 2048)  # private binary inside a sequence
    ds.ReferencedImageSequence = [seq_item]
    ds.add_new(0x00091011, "OB", b"\x02" * 8)             # small binary stays inline
    path = save(ds, tmp_path / "a.dcm")
    doc = instance_metadata(path, "http://p/dw/studies/1/series/2/instances/3")
    assert doc["7FE00010"] == {"vr": "OW", "BulkDataURI": "http://p/dw/studies/1/series/2/instances/3/bulkdata/7FE00010"}
    nested = doc["00081140"]["Value"][0]["00091010"]
    assert nested["BulkDataURI"].endswith("/bulkdata/00081140/0/00091010")
    assert doc["00091011"]["InlineBinary"]
    assert doc["00100020"] == {"vr": "LO", "Value": ["PAT001"]}
    assert not any(k.startswith("0002") for k in doc)
    # Without a base everything is inline (QIDO results never carry bulk data anyway).
    assert "InlineBinary" in dataset_to_json(dcmread(path), None)["7FE00010"]


def test_frames_as_stored_and_range_checks(tmp_path):
    path = save(make_instance(frames=3, rows=4, cols=4, seed=3), tmp_path / "mf.dcm")
    ds = dcmread(path)
    frames, ts = extract_frames(path, (3, 1), "*")
    assert ts == "1.2.840.10008.1.2.1" and frames == [ds.PixelData[64:96], ds.PixelData[0:32]]
    with pytest.raises(NotFound):
        extract_frames(path, (4,), "*")
    with pytest.raises(NotAcceptable):
        extract_frames(path, (1,), "1.2.840.10008.1.2.4.50")


class Consumer:
    def __init__(self):
        self.data = b""

    def write(self, data):
        self.data += data


@pytest_twisted.ensureDeferred
async def test_multipart_writer_sends_each_instance_as_it_arrives(tmp_path):
    stream = ResultStream()
    files = []
    for n in range(3):
        p = tmp_path / f"{n}.dcm"
        p.write_bytes(f"instance-{n}".encode() * 10)
        files.append(DicomInstance(path=p, owned=True))
    writer = MultipartWriter(lambda: stream.next().addCallback(
        lambda i: None if i is None else Part("application/dicom", path=i.path, release=i.release)),
        "application/dicom", boundary="BND")
    consumer = Consumer()
    done = writer.startProducing(consumer)
    stream.put(files[0])
    while b"instance-0" * 10 not in consumer.data:  # the writer runs on the cooperator: let it turn
        await task.deferLater(reactor, 0, lambda: None)
    # The first part is out (and its staged file released) before the PACS sent the second.
    assert not files[0].path.exists() and b"instance-1" not in consumer.data and not done.called
    stream.put(files[1])
    stream.put(files[2])
    stream.finish(0)
    await done
    body = consumer.data
    assert body.startswith(b"--BND\r\nContent-Type: application/dicom\r\nContent-Length: 100\r\n\r\n")
    assert body.endswith(b"--BND--\r\n") and body.count(b"--BND\r\n") == 3
    assert writer.parts_written == 3 and not any(f.path.exists() for f in files)


@pytest_twisted.ensureDeferred
async def test_multipart_writer_parts_of_several_blocks_round_trip(tmp_path):
    """Parts longer than a block, data and file parts mixed: the body parses back to the same bytes."""
    from harmony.dicomweb.multipart import CHUNK
    big = tmp_path / "big.dcm"
    big.write_bytes(bytes(range(256)) * (CHUNK * 2 // 256 + 3))
    parts = [Part("application/dicom", path=big), Part("application/dicom", data=b"small\r\n--not-the-boundary"),
             Part("application/dicom", path=big)]
    writer = MultipartWriter(lambda: defer.succeed(parts.pop(0) if parts else None), "application/dicom",
                             boundary="BND")
    consumer = Consumer()
    await writer.startProducing(consumer)
    parser = StowParser("BND", tmp_path / "parsed")
    parser.feed(consumer.data)
    got = [Path(p.path).read_bytes() for p in parser.close()]
    assert got == [big.read_bytes(), b"small\r\n--not-the-boundary", big.read_bytes()]


@pytest_twisted.ensureDeferred
async def test_multipart_writer_fails_the_body_when_a_file_ends_early(tmp_path):
    """A file cut short while it is sent must not end as a complete part of
    the announced length: the producer fails, so the connection is cut."""
    from harmony.dicomweb.multipart import CHUNK
    path = tmp_path / "shrinks.dcm"
    path.write_bytes(b"x" * (CHUNK * 3))

    class Truncating(Consumer):
        def write(self, data):
            super().write(data)
            with open(path, "r+b") as f:
                f.truncate(CHUNK + 10)  # after the first block went out

    parts = [Part("application/dicom", path=path)]
    writer = MultipartWriter(lambda: defer.succeed(parts.pop(0) if parts else None), "application/dicom",
                             boundary="BND")
    consumer = Truncating()
    with pytest.raises(OSError, match="ended"):
        await writer.startProducing(consumer)
    assert not consumer.data.endswith(b"--BND--\r\n")


def test_multipart_bytes_round_trip(tmp_path):
    body, ctype = multipart_bytes([Part("application/octet-stream", data=b"a\r\n--x"), Part("application/octet-stream", data=b"")],
                                  "application/octet-stream", boundary="q1")
    assert ctype == 'multipart/related; type="application/octet-stream"; boundary=q1'
    parser = StowParser("q1", tmp_path)
    parser.feed(body)
    parts = parser.close()
    assert [Path(p.path).read_bytes() for p in parts] == [b"a\r\n--x", b""]


def _stow_body(boundary, payloads, preamble=b""):
    out = preamble
    for p in payloads:
        out += b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_stow_parser_is_incremental(tmp_path, chunk):
    payloads = [b"DICM" + bytes(range(256)) * 3, b"second\r\n--notboundary"]
    body = _stow_body(b"b0und", payloads, preamble=b"preamble text\r\n")
    parser = StowParser("b0und", tmp_path)
    for i in range(0, len(body), chunk):
        parser.feed(body[i:i + chunk])
    parts = parser.close()
    assert [Path(p.path).read_bytes() for p in parts] == payloads
    assert parts[0].content_type == "application/dicom"


def test_stow_parser_refuses_truncated_and_oversized(tmp_path):
    body = _stow_body(b"B", [b"x" * 100])
    parser = StowParser("B", tmp_path / "t")
    parser.feed(body[:60])
    with pytest.raises(BadRequest):
        parser.close()
    assert not list((tmp_path / "t").iterdir())      # nothing left behind
    parser = StowParser("B", tmp_path / "o", max_bytes=50)
    with pytest.raises(PayloadTooLarge):
        parser.feed(body)
    assert not (tmp_path / "o").exists()  # refused before any part file (the folder comes with the first)


@pytest_twisted.ensureDeferred
async def test_parse_body_from_a_producer(tmp_path):
    from twisted.web.client import FileBodyProducer
    body = _stow_body(b"B", [b"one", b"two"])
    parts = await parse_body(FileBodyProducer(io.BytesIO(body)), StowParser("B", tmp_path))
    assert [Path(p.path).read_bytes() for p in parts] == [b"one", b"two"]
    with pytest.raises(BadRequest):
        await parse_body(FileBodyProducer(io.BytesIO(b"--B\r\nbroken")), StowParser("B", tmp_path))


def test_metadata_cache_expires_on_the_clock(tmp_path):
    clock = task.Clock()
    cache = MetadataCache(tmp_path, clock, ttl=60)
    cache.put("k", b'["' + BASE_PLACEHOLDER.encode() + b'/x"]')
    assert with_base(cache.get("k"), "http://a") == b'["http://a/x"]'
    clock.advance(59)
    assert cache.get("k") is not None
    clock.advance(2)
    assert cache.get("k") is None


@pytest_twisted.ensureDeferred
async def test_concurrent_identical_metadata_requests_collapse(bridge):
    first = await bridge.on_request(_request("GET", "/studies/1.2/series/1.3/metadata"))
    assert isinstance(first, RequestEnvelope) and first.metadata["dimse_op"] == "C-GET"
    second = bridge.on_request(_request("GET", "/studies/1.2/series/1.3/metadata"))
    outcome = []
    second.addCallback(lambda r: outcome.append(r) or r)
    assert isinstance(second, defer.Deferred) and outcome == []   # waits; no second C-GET
    key = first.state.dicomweb.cache_key
    await bridge.cache.put_async(key, b"[]")   # the cache file is written off the reactor
    bridge.cache.settle(key, b"[]")
    response = await second
    assert isinstance(response, ResponseEnvelope) and response.status == 200
    assert response.headers.getRawHeaders("etag")
    # Later requests are served from the cache (read in a thread) without touching the backend.
    third = await bridge.on_request(_request("GET", "/studies/1.2/series/1.3/metadata"))
    assert isinstance(third, ResponseEnvelope)
