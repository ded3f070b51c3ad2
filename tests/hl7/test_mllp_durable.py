"""The durable relay for HL7 v2: ``mllp`` endpoint -> ``store_forward`` (fifo)
-> ``mllp`` backend.  The sender gets AA once a message is on disk, even with
the receiver down; the receiver then gets every message in the order sent;
an AR parks one message in the dead letters (shown by the /queues admin)
without holding up the rest, and a replay sends it again."""

from __future__ import annotations

import json

import pytest_twisted
import treq
from twisted.internet import reactor, task

from tests.harness import MINIMAL_MAIN, start_harmony, write_config
from tests.hl7.peers import Receiver, adt, durable_relay_toml, framed_file, mllp_send
from tests.peers import free_port
from tests.sf_helpers import PortHold

TOKEN = "t0ken-for-the-hl7-tests"


def durable_config(tmp_path, receiver_port):
    main = MINIMAL_MAIN + f"""
[management]
enabled = true
network = "default"
token = "{TOKEN}"
"""
    return write_config(tmp_path / "cfg", main, {"hl7": durable_relay_toml(0, receiver_port, tmp_path / "spool")})


async def until(predicate, what, timeout=30.0):
    """Poll *predicate* (cheap, in memory or a small file) until true or *timeout*."""
    waited = 0.0
    while not predicate():
        if waited > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        await task.deferLater(reactor, 0.02, lambda: None)
        waited += 0.02


@pytest_twisted.ensureDeferred
async def test_acked_while_receiver_down_then_delivered_in_order(tmp_path):
    port = free_port()
    hold = PortHold(port)
    receiver = Receiver(tmp_path, port)
    h = await start_harmony(durable_config(tmp_path, port))
    ep = h.service.runtime.endpoints["feed"]
    forward = h.service.runtime.backends["relay"].forward
    await ep.listening
    ids = [f"SEQ-{i:03d}" for i in range(20)]
    try:
        acks = await mllp_send(ep.bound_port, framed_file(tmp_path / "in.hl7", [adt(i) for i in ids]))
        assert ["MSA|AA|" + i in a.replace("\n", "\r") for a, i in zip(acks, ids)] == [True] * len(ids)
        hold.release()
        receiver.start()
        await until(lambda: len(receiver.control_ids()) >= len(ids), "every message at the receiver")
        await forward.idle()
        assert receiver.control_ids() == ids        # fifo: in the order sent, none twice
    finally:
        await h.stop()
        receiver.stop()
        hold.release()


@pytest_twisted.ensureDeferred
async def test_ar_goes_to_dead_letters_and_replays(tmp_path):
    receiver = Receiver(tmp_path).start()
    h = await start_harmony(durable_config(tmp_path, receiver.port))
    ep = h.service.runtime.endpoints["feed"]
    forward = h.service.runtime.backends["relay"].forward
    await ep.listening
    try:
        await mllp_send(ep.bound_port, framed_file(tmp_path / "in.hl7", [adt("N-1"), adt("AR-2"), adt("N-3")]))
        await until(lambda: "N-3" in receiver.control_ids(), "the message after the rejected one")
        await forward.idle()
        r = await treq.get(h.url("/admin/queues/ris/dead"), headers={"Authorization": f"Bearer {TOKEN}"})
        doc = json.loads(await r.content())
        stats = json.loads(await (await treq.get(h.url("/admin/queues"),
                                                 headers={"Authorization": f"Bearer {TOKEN}"})).content())
        replayed = await forward.retry("ris")
        await until(lambda: receiver.control_ids().count("AR-2") == 2, "the replayed message")
        await forward.idle()
    finally:
        await h.stop()
        receiver.stop()
    assert receiver.control_ids()[:3] == ["N-1", "AR-2", "N-3"]
    [entry] = doc["entries"]
    assert entry["kind"] == "hl7v2" and entry["hl7.control_id"] == "AR-2" and entry["hl7.message_type"] == "ADT"
    assert entry["last_error"] == "HL7 AR" and entry["attempts"] == 1     # AR: never retried
    assert stats["targets"]["ris"]["delivered"] == 2 and stats["targets"]["ris"]["dead"] == 1
    assert replayed == 1
