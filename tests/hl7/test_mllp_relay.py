"""MLLP in and out: python-hl7's ``mllp_send`` -> Harmony (``mllp`` endpoint,
``mllp`` backend) -> python-hl7's MLLP server, message by message: what the
receiver got, and which ACK the sender got back."""

from __future__ import annotations

import pytest
import pytest_twisted

from tests.harness import MINIMAL_MAIN, start_harmony, write_config
from tests.hl7.peers import Receiver, adt, framed_file, mllp_send


def relay_config(tmp_path, receiver_port, endpoint_opts="", backend_opts=""):
    return write_config(tmp_path / "cfg", MINIMAL_MAIN, {"hl7": f"""
        [pipelines.hl7]
        networks = ["default"]
        endpoints = ["feed"]
        backends = ["ris"]
        [endpoints.feed]
        service = "mllp"
        [endpoints.feed.options]
        port = 0
        {endpoint_opts}
        [backends.ris]
        service = "mllp"
        [backends.ris.options]
        host = "127.0.0.1"
        port = {receiver_port}
        ack_timeout_secs = 0.5
        retry_delay_secs = 0.01
        {backend_opts}
        """})


@pytest.fixture
def receiver(tmp_path):
    r = Receiver(tmp_path).start()
    yield r
    r.stop()


async def running(path):
    h = await start_harmony(path)
    ep = h.service.runtime.endpoints["feed"]
    await ep.listening
    return h, ep


@pytest_twisted.ensureDeferred
async def test_relay_ack_semantics_message_by_message(tmp_path, receiver):
    h, ep = await running(relay_config(tmp_path, receiver.port, backend_opts="ack_retries = 1"))
    try:
        messages = [adt("OK-1"), adt("AE-1"), adt("AR-1"), adt("AEONCE-1"), adt("SILENT-1"), adt("OK-2", "A08")]
        acks = await mllp_send(ep.bound_port, framed_file(tmp_path / "in.hl7", messages))
    finally:
        await h.stop()
    by_id = {}
    for a in acks:
        msa = [line for line in a.split("\n") if line.startswith("MSA")][0].split("|")
        by_id[msa[2]] = (msa[1], a)
    assert {k: v[0] for k, v in by_id.items()} == {
        "OK-1": "AA", "AE-1": "AE", "AR-1": "AR", "AEONCE-1": "AA", "SILENT-1": "AE", "OK-2": "AA"}
    # the downstream's own ACK came back (python-hl7's create_ack sends MSH-3 = our MSH-5)
    assert "RECVAPP" in by_id["OK-1"][1].split("|")[2]
    # our own AE for the timeout says why, in an ERR segment with table 0357 code 207
    assert "ERR|||207^Application internal error^HL70357|E" in by_id["SILENT-1"][1].replace("\n", "\r")
    seen = receiver.control_ids()
    assert seen.count("AE-1") == 2          # AE: sent again (ack_retries = 1)
    assert seen.count("AR-1") == 1          # AR: never sent again
    assert seen.count("AEONCE-1") == 2      # AE then AA
    assert seen.count("SILENT-1") == 2      # no ACK: sent again, then AE upstream
    # order kept, and the message arrived as sent (byte for byte, as text)
    assert [c for c in seen if c.startswith("OK-")] == ["OK-1", "OK-2"]
    first = receiver.messages()[0]["text"]
    assert first.rstrip("\r") == messages[0].decode().rstrip("\r")


@pytest_twisted.ensureDeferred
async def test_duplicates_answered_as_the_first_time(tmp_path, receiver):
    h, ep = await running(relay_config(tmp_path, receiver.port, "duplicate_window_secs = 60"))
    try:
        acks = await mllp_send(ep.bound_port, framed_file(tmp_path / "in.hl7", [adt("DUP-1"), adt("DUP-1")]))
    finally:
        await h.stop()
    assert len(acks) == 2 and acks[0] == acks[1] and "MSA|AA|DUP-1" in acks[0].replace("\n", "\r")
    assert receiver.control_ids() == ["DUP-1"]


@pytest_twisted.ensureDeferred
async def test_duplicates_rejected_when_configured(tmp_path, receiver):
    h, ep = await running(relay_config(tmp_path, receiver.port,
                                       'duplicate_window_secs = 60\nduplicate_policy = "reject"'))
    try:
        acks = await mllp_send(ep.bound_port, framed_file(tmp_path / "in.hl7", [adt("DUP-2"), adt("DUP-2")]))
    finally:
        await h.stop()
    second = acks[1].replace("\n", "\r")
    assert "MSA|AR|DUP-2" in second and "|205^Duplicate key identifier^HL70357|E" in second
    assert receiver.control_ids() == ["DUP-2"]


@pytest_twisted.ensureDeferred
async def test_unparseable_message_gets_ar_with_err(tmp_path, receiver):
    h, ep = await running(relay_config(tmp_path, receiver.port))
    bad = [b"HELLO|this is not hl7\r",
           b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|\r",                       # no control ID
           b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|BADCS|P|2.5||||||WHATEVER-9\r"]  # unknown MSH-18
    try:
        acks = await mllp_send(ep.bound_port, framed_file(tmp_path / "in.hl7", bad))
    finally:
        await h.stop()
    acks = [a.replace("\n", "\r") for a in acks]
    assert "MSA|AR|" in acks[0] and "ERR||MSH^1|100^Segment sequence error^HL70357|E" in acks[0]
    assert "ERR||MSH^1^10|101^Required field missing^HL70357|E||||MSH-10 is required" in acks[1]
    assert "MSA|AR|BADCS" in acks[2] and "ERR||MSH^1^18|102^" in acks[2]
    assert receiver.control_ids() == []     # nothing unreadable was passed on


@pytest_twisted.ensureDeferred
async def test_no_phi_in_the_log_at_info(tmp_path, receiver):
    """Relayed, refused, rejected and timed-out messages: no log event names the patient."""
    from twisted.logger import formatEvent, globalLogPublisher

    events = []
    observer = events.append
    globalLogPublisher.addObserver(observer)
    cfg = relay_config(tmp_path, receiver.port, "duplicate_window_secs = 60")
    cfg.write_text(cfg.read_text().replace('log_level = "debug"', 'log_level = "info"'))
    secret = dict(family="PHIPROBE", given="ZELDA", mrn="PHIMRN4711")
    try:
        h, ep = await running(cfg)
        try:
            await mllp_send(ep.bound_port, framed_file(tmp_path / "in.hl7", [
                adt("PHI-1", **secret), adt("PHI-1", **secret), adt("AR-PHI-2", **secret),
                adt("SILENT-PHI-3", **secret), adt("", **secret),
                adt("PHI-4", **secret).replace(b"|2.5", b"|2.5||||||WHATEVER")]))
        finally:
            await h.stop()
    finally:
        globalLogPublisher.removeObserver(observer)
    text = "\n".join(formatEvent(e) or "" for e in events if e.get("log_level").name != "debug")
    assert "PHI-1" in text or "refused" in text          # the log did see these messages
    for s in secret.values():
        assert s not in text


@pytest_twisted.ensureDeferred
async def test_metrics_count_acks_and_refusals(tmp_path, receiver):
    h, ep = await running(relay_config(tmp_path, receiver.port))
    try:
        await mllp_send(ep.bound_port, framed_file(tmp_path / "in.hl7",
                                                   [adt("M-1"), adt("AR-M-2"), b"NOT HL7\r"]))
        from prometheus_client import generate_latest
        text = generate_latest(h.service.metrics.registry).decode()
    finally:
        await h.stop()
    assert 'harmony_hl7_acks_total{code="AA",endpoint="feed"} 1.0' in text
    assert 'harmony_hl7_acks_total{code="AR",endpoint="feed"} 2.0' in text
    assert 'harmony_mllp_refused_total{endpoint="feed",reason="parse error"} 1.0' in text
