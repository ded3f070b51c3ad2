#!/usr/bin/env python3
"""A DIMSE latency client on Harmony's reactor-native upper layer, for the bench.

pynetdicom's own client raced on a busy machine ("Received unexpected C-ECHO
service message", then a DIMSE timeout), so the latency figures are taken with
this one, against Orthanc and Harmony alike.  Prints one JSON line:
``{"echo": [...], "find": [...], "matches": N}`` (seconds).

    python bench/dimse/client.py PORT AET N_ECHO N_FIND
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from pydicom.dataset import Dataset  # noqa: E402
from pynetdicom import build_context  # noqa: E402
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND, Verification  # noqa: E402
from twisted.internet import defer, task  # noqa: E402

from harmony.dicom.ul import commands, datasets  # noqa: E402
from harmony.dicom.ul.requestor import RequestorSettings, associate  # noqa: E402


async def measure(reactor, port, aet, n_echo, n_find):
    assoc = await associate(reactor, "127.0.0.1", port, RequestorSettings(local_aet="BENCH"), aet,
                            [build_context(Verification), build_context(FIND)])
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = ""
    ident.PatientID = ""
    ident.StudyDate = ""
    find_cx = next(cid for cid, cx in assoc.contexts.items() if str(cx.abstract_syntax) == str(FIND))
    encoded = datasets.encode(ident, str(assoc.contexts[find_cx].transfer_syntax[0]))
    echo, find, matches = [], [], 0
    for _ in range(n_echo):
        t = time.perf_counter()
        rsp = await assoc.request(1, {"AffectedSOPClassUID": str(Verification), "CommandField": commands.C_ECHO_RQ})
        assert rsp.command["Status"] == 0
        echo.append(time.perf_counter() - t)
    for _ in range(n_find):
        got = []
        t = time.perf_counter()
        rsp = await assoc.request(find_cx, {"AffectedSOPClassUID": str(FIND), "CommandField": commands.C_FIND_RQ,
                                            "Priority": 0}, encoded, on_pending=got.append)
        assert rsp.command["Status"] == 0, rsp.command
        find.append(time.perf_counter() - t)
        matches = len(got)
    await assoc.release()
    print(json.dumps({"echo": echo, "find": find, "matches": matches}))


if __name__ == "__main__":
    port, aet, n_echo, n_find = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    task.react(lambda reactor: defer.ensureDeferred(measure(reactor, port, aet, n_echo, n_find)))
