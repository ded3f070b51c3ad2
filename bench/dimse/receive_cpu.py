#!/usr/bin/env python3
"""CPU of the DIMSE receive path per C-STORE, in memory: no sockets, no disk, no peer.

Why: every C-STORE row (``storage_dir``, ``local_archive``) pays the upper
layer's receive path - PDU framing, PDVs, the command set's decode, the data
set's sink, the dispatch - and its answer's encode and send.  On a loaded
2-core machine the end-to-end rows move 2x between runs; this measures only
that path, on one thread, so a change to it shows as microseconds.

An acceptor association (harmony.dicom.ul, on a StringTransport and a clock)
is fed what DCMTK ``storescu`` sends for each small instance - one P-DATA-TF
with the command, one with the data set, as two reads - and a handler answers
each with a C-STORE-RSP (``post``).  Two sinks: ``memory`` (the data set kept,
as ``storage_dir`` holds it) and ``file`` (a Part-10 file written as it
arrives into a file created ahead, as the ``local_archive`` path does).

    python bench/dimse/receive_cpu.py [--messages 20000] [--rounds 5] [--sink memory|file]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from harmony.dicom.ul import commands, datasets, pdu  # noqa: E402
from harmony.dicom.ul.requestor import request_primitive  # noqa: E402
from tests.dicom.ul.memory import CONTEXTS, acceptor, connect, pump, requestor  # noqa: E402

CT = "1.2.840.10008.5.1.4.1.1.2"
SYNTAX = "1.2.840.10008.1.2.1"


class Answering:
    """Answers each C-STORE with Success from the bytes the response encoder writes."""

    def __init__(self, sink: str, folder: Path, messages: int):
        self.sink = sink
        # Files created ahead, as dicom_scp's spare staging files are (off the reactor).
        self.spares = [(folder / f"{i}.dcm", open(folder / f"{i}.dcm", "wb")) for i in range(messages)] \
            if sink == "file" else []

    def dataset_sink(self, assoc, context_id, command):
        if self.sink == "file":
            path, file = self.spares.pop()
            return datasets.PartTenSink(path, command, SYNTAX, 1 << 20, file=file)
        return datasets.HeldSink(command, SYNTAX, 1 << 20, 256 * 1024, spill=None)

    def on_request(self, assoc, message):
        command = message.command
        assoc.post(message.context_id, commands.store_response(
            command["AffectedSOPClassUID"], command["AffectedSOPInstanceUID"], message.message_id, 0))

    def association_established(self, assoc):
        pass

    def association_closed(self, assoc):
        pass


def store_pdus(context_id: int, message_id: int, dataset: bytes) -> tuple[bytes, bytes]:
    """What storescu writes for one C-STORE: the command's PDU, then the data set's."""
    command = commands.encode({"AffectedSOPClassUID": CT, "CommandField": commands.C_STORE_RQ,
                               "MessageID": message_id, "Priority": 0,
                               "CommandDataSetType": commands.HAS_DATASET,
                               "AffectedSOPInstanceUID": f"1.2.826.0.1.3680043.9.7.{message_id}.{message_id * 7}"})
    return pdu.pdata(context_id, 0x03, command), pdu.pdata(context_id, 0x02, dataset)


def run(messages: int, sink: str, folder: Path) -> float:
    clock, factory = acceptor(handler=Answering(sink, folder, messages))
    server, st = connect(factory)
    client, ct = requestor(clock)
    pump(client, ct, server, st)
    context_id = next(cid for cid, cx in server.contexts.items() if str(cx.abstract_syntax) == CT)
    dataset = bytes(range(256)) * 4   # ~1 KB, the bench's small instances
    feed = [store_pdus(context_id, i % 65535 + 1, dataset) for i in range(messages)]
    st.clear()
    start = time.process_time()
    for command_pdu, data_pdu in feed:
        server.dataReceived(command_pdu)
        server.dataReceived(data_pdu)
        st.clear()
    return (time.process_time() - start) / messages * 1e6


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sink", choices=("memory", "file"), default="memory")
    args = ap.parse_args()
    assert request_primitive and CONTEXTS
    with tempfile.TemporaryDirectory(prefix="harmony-bench-receive-") as folder:
        per = [run(args.messages, args.sink, Path(folder)) for _ in range(args.rounds)]
    print(f"receive path, {args.sink} sink: {statistics.median(per):.1f} us CPU per C-STORE "
          f"(rounds {[round(p, 1) for p in per]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
