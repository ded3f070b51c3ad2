"""Kill -9 during a durable HL7 relay: a real ``twistd harmony`` (``mllp``
endpoint -> ``store_forward`` fifo -> ``mllp`` backend) is SIGKILLed at
random moments while python-hl7's ``MLLPClient`` feeds it (resending what got
no ACK, as a sending system does) and once more while it drains to
python-hl7's MLLP server, which is down at first.  The receiver must get
every acknowledged message, in the order sent: a message may arrive twice in
a row (a crash between its delivery and the bookkeeping, or an ACK the sender
never saw), never out of order, never lost.

Plain synchronous tests: they drive processes, not the reactor.
"""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time

import hl7
from hl7.client import MLLPClient

from tests.hl7.peers import Receiver, adt, durable_relay_toml
from tests.peers import free_port, wait_for
from tests.sf_helpers import HarmonyProcess, PortHold

N_MESSAGES = 200
KILLS_DURING_INGEST = 4


def config(http_port, mllp_port, receiver_port, spool):
    return f"""
[proxy]
id = "hl7-crash"
log_level = "info"

[network.default.http]
bind_address = "127.0.0.1"
bind_port = {http_port}

""" + durable_relay_toml(mllp_port, receiver_port, spool, ack_timeout=5)


def send_until_acked(harmony: HarmonyProcess, port: int, message: str, client: list) -> None:
    """Send *message* until it gets AA; a dead Harmony is restarted (what a sender's
    operator would do) and the message sent again."""
    while True:
        try:
            if not client:
                client.append(MLLPClient("127.0.0.1", port))
                client[0].socket.settimeout(30)
            ack = client[0].send_message(message)
            code = str(hl7.parse(ack.decode().strip("\x0b\x1c\r")).segment("MSA")(1))
            assert code == "AA", ack
            return
        except (OSError, ConnectionError, IndexError, hl7.ParseException):
            if client:
                try:
                    client.pop().close()
                except OSError:
                    pass
            harmony.kill()
            harmony.start()


def without_repeats(seq):
    out = []
    for x in seq:
        if not out or out[-1] != x:
            out.append(x)
    return out


def test_kill_9_during_durable_relay_loses_and_reorders_nothing(tmp_path):
    seed = int(os.environ.get("HARMONY_CRASH_SEED", "0")) or random.randrange(1, 2**31)
    print(f"kill points from HARMONY_CRASH_SEED={seed}")
    rnd = random.Random(seed)
    http_port, mllp_port, receiver_port = free_port(), free_port(), free_port()
    hold = PortHold(receiver_port)   # the receiver is down while the feed comes in
    folder = tmp_path / "harmony"
    folder.mkdir()
    (folder / "harmony.toml").write_text(config(http_port, mllp_port, receiver_port, folder / "spool"))
    harmony = HarmonyProcess(folder, [http_port, mllp_port])
    receiver = Receiver(tmp_path, receiver_port)
    ids = [f"C-{i:04d}" for i in range(N_MESSAGES)]
    client: list = []
    try:
        harmony.start()
        kills = sorted(rnd.sample(range(10, N_MESSAGES - 10, 3), KILLS_DURING_INGEST))
        for n, control_id in enumerate(ids):
            if kills and n == kills[0]:
                kills.pop(0)
                proc = harmony.proc
                threading.Timer(rnd.uniform(0, 0.02), harmony.kill, kwargs={"proc": proc}).start()
            send_until_acked(harmony, mllp_port, adt(control_id).decode(), client)
        assert harmony.starts >= 2, "no kill landed during the feed"
        if client:
            client[0].close()
        hold.release()
        receiver.start()
        time.sleep(rnd.uniform(0.05, 0.4))  # a random kill moment while draining, not synchronisation
        harmony.kill()
        harmony.start()
        wait_for(lambda: set(ids) <= set(receiver.control_ids()), 120, "every acknowledged message received")
        received = receiver.control_ids()
        assert without_repeats(received) == ids, "a message was lost or overtaken"
        db = sqlite3.connect(folder / "spool" / "index.sqlite")
        try:
            dead = db.execute("SELECT count(*) FROM queue WHERE state='dead'").fetchone()[0]
        finally:
            db.close()
        assert dead == 0
    finally:
        harmony.kill()
        receiver.stop()
        hold.release()
