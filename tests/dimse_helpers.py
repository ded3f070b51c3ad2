"""Helpers for DIMSE tests: direct pynetdicom queries (the reference answers),
DICOM JSON comparison, multipart parsing, a silent TCP peer, and the TOML of
a ``dicom_scp`` pipeline and a ``dicom_scu`` backend."""

from __future__ import annotations

import io
import json
import re
import socket

from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pynetdicom import AE, evt
from twisted.internet import protocol, reactor

from harmony.dicom import net


def _nodelay(event) -> None:
    """pynetdicom never sets TCP_NODELAY: without it a multi-PDU exchange waits
    ~40 ms per round trip for delayed ACKs (docs/field notes)."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


#: evt_handlers for a plain pynetdicom client used as a reference peer.
NODELAY_HANDLERS = [(evt.EVT_CONN_OPEN, _nodelay)]


def scp_pipeline(name: str, aet: str, port: int, backend: str, services=("store",), extra: str = "") -> str:
    """TOML: pipeline *name* = a ``dicom_scp`` endpoint ``{name}_scp`` (AE *aet*) -> *backend*."""
    enables = "".join(f"enable_{s} = true\n" for s in services)
    return f"""
[pipelines.{name}]
endpoints = ["{name}_scp"]
backends = ["{backend}"]
[endpoints.{name}_scp]
service = "dicom_scp"
[endpoints.{name}_scp.options]
local_aet = "{aet}"
bind_addr = "127.0.0.1"
port = {port}
{enables}{extra}"""


def scu_backend(name: str, aet: str, port: int) -> str:
    return f"""
[backends.{name}]
service = "dicom_scu"
[backends.{name}.options]
aet = "{aet}"
host = "127.0.0.1"
port = {port}
local_aet = "HARMONY_SCU"
"""


def ds_from(**kw) -> Dataset:
    ds = Dataset()
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def direct_find(host, port, aet, identifier: Dataset, model="study", calling="HARMONY_SCU") -> list[dict]:
    """C-FIND straight to the PACS with pynetdicom: the answers Harmony must equal."""
    ae = AE(ae_title=calling)
    sop = net.QUERY_MODELS[model]["C-FIND"]
    ae.add_requested_context(sop)
    assoc = ae.associate(host, port, ae_title=aet, evt_handlers=NODELAY_HANDLERS)
    assert assoc.is_established
    out = []
    try:
        for status, ident in assoc.send_c_find(identifier, sop):
            assert status
            if status.Status in (0xFF00, 0xFF01):
                out.append(ident.to_json_dict())
            else:
                assert status.Status == 0, hex(status.Status)
    finally:
        assoc.release()
    return out


def canonical(results: list[dict]) -> list[str]:
    """A comparable form of a list of DICOM JSON matches (order-insensitive,
    trailing UID padding trimmed as pydicom does)."""
    out = []
    for r in results:
        ds = Dataset.from_json(r)
        out.append(json.dumps(ds.to_json_dict(), sort_keys=True))
    return sorted(out)


def parse_multipart(body: bytes, content_type: str) -> list[bytes]:
    boundary = re.search(r"boundary=([^;]+)", content_type).group(1).strip('"').encode()
    parts = []
    for chunk in body.split(b"--" + boundary)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, rest = chunk.partition(b"\r\n\r\n")
        assert rest.endswith(b"\r\n")
        parts.append(rest[:-2])
    return parts


def dataset_bytes(data_or_path) -> bytes:
    """The encoded dataset of a Part-10 file without preamble and file meta:
    what went over the wire, and what must be identical through Harmony."""
    f = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else open(data_or_path, "rb")
    with f:
        read_preamble(f, False)
        _read_file_meta_info(f)
        return f.read()


class _Silent(protocol.Protocol):
    def dataReceived(self, data):
        pass


def silent_peer():
    """A TCP port that accepts connections and never answers (a hung PACS)."""
    factory = protocol.Factory.forProtocol(_Silent)
    return reactor.listenTCP(0, factory, interface="127.0.0.1")


__all__ = ["ds_from", "direct_find", "canonical", "parse_multipart", "dataset_bytes", "silent_peer"]
