"""HL7 v2 peers for the tests: python-hl7's MLLP server (receiver.py) in its
own process, python-hl7's ``mllp_send`` as a sender, and synthetic messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import hl7
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue

HERE = Path(__file__).resolve().parent
MLLP_SEND = str(Path(sys.executable).parent / "mllp_send")


def adt(control_id: str, event: str = "A01", *, family="Testperson", given="Anna", mrn="MRN0001",
        extra: str = "", charset: str = "", msh15: str = "", msh16: str = "", seps="|^~\\&") -> bytes:
    """A synthetic ADT message (no real patient)."""
    f, c = seps[0], seps[1]
    msh = f.join(["MSH", seps[1:], "SENDAPP", "SENDFAC", "RECVAPP", "RECVFAC", "20260101120000", "",
                  c.join(["ADT", event, "ADT_A01"]), control_id, "P", "2.5", "", "", msh15, msh16, "", charset]).rstrip(f)
    pid = f.join(["PID", "1", "", c.join([mrn, "", "", "HOSP"]), "", c.join([family, given]), "", "19800101", "F"])
    pv1 = f.join(["PV1", "1", "I", c.join(["WARD1", "101", "A"]), "", "", "", "", "", "", "", "", "", "", "", "", "",
                  "", "", "VISIT0001"])
    segs = [msh, "EVN" + f + event + f + "20260101120000", pid, pv1] + ([extra] if extra else [])
    return ("\r".join(segs) + "\r").encode("utf-8" if charset in ("", "UNICODE UTF-8") else "latin-1")


def oru(control_id: str) -> bytes:
    segs = ["MSH|^~\\&|LAB|LABFAC|EHR|HOSP|20260101130000||ORU^R01^ORU_R01|" + control_id + "|P|2.5",
            "PID|1||MRN0001^^^HOSP||Testperson^Anna||19800101|F",
            "OBR|1|ORD1|FIL1|24331-1^Lipid panel^LN|||20260101120000||||||||||||||||||F",
            "OBX|1|NM|2093-3^Cholesterol^LN||182|mg/dL|<200||||F|||20260101120000",
            "OBX|2|NM|2571-8^Triglyceride^LN||140|mg/dL|<150||||F|||20260101120000"]
    return ("\r".join(segs) + "\r").encode()


class Receiver:
    """python-hl7's asyncio MLLP server in a process (see receiver.py)."""

    def __init__(self, folder: Path, port: int = 0, seed: int | None = None):
        self.log = folder / "received.jsonl"
        self.proc = None
        self.port = port
        self.seed = seed  # repeatable ACK control IDs (see receiver.py)

    def start(self):
        if not self.log.exists():
            self.log.write_text("")
        self.proc = subprocess.Popen([sys.executable, str(HERE / "receiver.py"), "--log", str(self.log),
                                      "--port", str(self.port or 0)]
                                     + (["--seed", str(self.seed)] if self.seed is not None else []),
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("READY"):
            self.stop()
            raise RuntimeError(f"receiver did not start: {line!r}")
        self.port = int(line.split()[1])
        return self

    def messages(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]

    def control_ids(self) -> list[str]:
        return [m["control_id"] for m in self.messages()]

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc.stdout.close()


def durable_relay_toml(feed_port: int, receiver_port: int, spool: Path, *, ack_timeout: float = 15) -> str:
    """Pipeline ``hl7``: ``mllp`` endpoint ``feed`` -> ``store_forward`` ``relay``
    (fifo, short backoff) -> ``mllp`` backend ``ris`` at *receiver_port*.

    The ACK timeout is generous on purpose: the receiver is a separate python-hl7
    process, and on a loaded CI machine its ACK once took over 2 s, so the relay
    resent a message and the exactly-once assertions saw it twice.  No test here
    is about the timeout itself (the mllp backend tests cover that)."""
    return f"""
[pipelines.hl7]
endpoints = ["feed"]
backends = ["relay"]

[endpoints.feed]
service = "mllp"
[endpoints.feed.options]
port = {feed_port}

[backends.relay]
service = "store_forward"
[backends.relay.options]
forward_to = ["ris"]
order = "fifo"
path = "{spool}"
backoff_initial_seconds = 0.05
backoff_max_seconds = 0.3
max_attempts = 1000000

[backends.ris]
service = "mllp"
[backends.ris.options]
host = "127.0.0.1"
port = {receiver_port}
ack_timeout_secs = {ack_timeout}
ack_retries = 0
"""


def acked_control_ids(stream: bytes) -> list[tuple[str, bytes]]:
    """(MSA-2, raw frame) of every ACK in the MLLP byte stream a sender received,
    read segment by segment with python-hl7.  Searching the raw text for ``MSA|``
    is not enough: python-hl7's random ACK control IDs (MSH-10) end in ``MSA``
    about once in 43,000, and then ``MSA|`` is found in the MSH segment."""
    acks = []
    for raw in stream.split(b"\x1c\r"):
        if raw.strip(b"\r\n"):
            assert raw.startswith(b"\x0b"), f"not an MLLP frame: {raw!r}"
            message = hl7.parse(raw[1:].decode("utf-8"))
            acks.append((str(message.segment("MSA")(2)), raw))
    return acks


def framed_file(path: Path, messages: list[bytes]) -> Path:
    path.write_bytes(b"".join(b"\x0b" + m + b"\x1c\r" for m in messages))
    return path


async def mllp_send(port: int, file: Path) -> list[str]:
    """python-hl7's mllp_send CLI: sends each message of *file*, returns the ACKs it printed."""
    out, err, code = await getProcessOutputAndValue(MLLP_SEND, ["-p", str(port), "-f", str(file), "127.0.0.1"],
                                                    reactor=reactor)
    assert code == 0, err
    acks: list[list[str]] = []
    text = out.decode("utf-8", "replace").replace("\x0b", "").replace("\x1c", "")
    for line in text.replace("\r", "\n").split("\n"):
        if line.startswith("MSH|"):
            acks.append([])
        if line.strip() and acks:
            acks[-1].append(line)
    return ["\n".join(a) for a in acks]
