#!/usr/bin/env python3
"""Association set-up: how long a DICOM listener takes to answer DCMTK storescu's
A-ASSOCIATE-RQ (128 presentation contexts, ~9.6 KiB), Harmony's ``dicom_scp``
against Orthanc and DCMTK ``storescp`` in the same run.

Why: every association starts with it, and Harmony's upper layer decodes and
negotiates it in Python on the reactor, where nothing else moves meanwhile.  Two
rows per listener:

- *same AE title*: the request a listener has seen before (a modality's next
  association);
- *new AE title*: the same proposal from a calling AE title the listener has not
  seen (another modality of a site: each has its own title).  Until session 16
  Harmony kept the decoded request by its bytes, AE titles included, so every
  modality paid the decode and the negotiation once, and every association past
  32 modalities paid them again (bench/dimse/README.md, "Association set-up").

A client here sends the captured request with the calling AE title changed or
not, reads the A-ASSOCIATE-AC, and aborts; the time is connect to answer read.

The other direction, *Harmony as requestor*: ``dicom_scu``'s association to a PACS
(128 storage contexts and their SCP roles, as a C-GET's) opened and aborted again
and again against Orthanc, by Harmony's ``associate`` and by pynetdicom's own
``AE.associate`` with the same contexts and roles (the Python DICOM client many
users run), each in a process of its own; connect to established.

    .venv/bin/python bench/dimse/associate.py [--associations 300] [--rounds 3] [--ab SRC]

``--ab SRC``: a second Harmony from the ``src`` folder SRC (``git archive <commit> src``)
in the same rounds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from bench.common import dicom_scp_endpoint, stop, toml_table  # noqa: E402
from bench.common import harmony_config as common_config  # noqa: E402
from bench.dimse.run import start_harmony  # noqa: E402
from tests.dicom_data import make_instance, save  # noqa: E402
from tests.peers import Orthanc, Storescp, dcmtk_association_request, free_port, peer_env  # noqa: E402

ABORT = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0])


def with_calling(rq: bytes, calling: str) -> bytes:
    """The whole PDU *rq* with its calling AE title field (body bytes 20-36) set to *calling*."""
    return rq[:26] + calling.encode().ljust(16) + rq[42:]


def associate_ms(port: int, pdu: bytes) -> float:
    """Connect, send *pdu*, read the answer whole; milliseconds to the answer. Aborts after."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(pdu)
        data = b""
        while len(data) < 6 or len(data) < 6 + int.from_bytes(data[2:6], "big"):
            chunk = s.recv(65536)
            if not chunk:
                raise RuntimeError(f"the listener on {port} closed without an answer")
            data += chunk
        elapsed = (time.perf_counter() - started) * 1000
        if data[0] != 0x02:
            raise RuntimeError(f"the listener on {port} answered PDU type {data[0]:#x}, not an A-ASSOCIATE-AC")
        s.sendall(ABORT)
    return elapsed


def measure(port: int, rq: bytes, n: int, tag: str) -> dict:
    """p50 and p90 of *n* associations with one AE title, and of *n* each with a new one."""
    associate_ms(port, with_calling(rq, "WARM"))
    same = [associate_ms(port, with_calling(rq, "SAME")) for _ in range(n)]
    new = [associate_ms(port, with_calling(rq, f"{tag}{i}")) for i in range(n)]
    return {"same": same, "new": new}


REQUESTOR = r"""
import json, sys, time
port, aet, n, who = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
from harmony.dicom import net
contexts = net.requestor_contexts()
roles = net.storage_roles(contexts)
times = []
if who == "pynetdicom":
    from pynetdicom import AE
    ae = AE(ae_title="BENCH")
    ae.requested_contexts = contexts
    for _ in range(n):
        t = time.perf_counter()
        assoc = ae.associate("127.0.0.1", port, ae_title=aet, ext_neg=roles)
        times.append((time.perf_counter() - t) * 1000)
        assert assoc.is_established
        assoc.abort()
    print(json.dumps(times))
else:
    from twisted.internet import defer, task
    from harmony.dicom.ul.requestor import RequestorSettings, associate

    async def run(reactor):
        settings = RequestorSettings(local_aet="BENCH", max_pdu=16384)
        for _ in range(n):
            t = time.perf_counter()
            assoc = await associate(reactor, "127.0.0.1", port, settings, aet, contexts, extra_items=roles)
            times.append((time.perf_counter() - t) * 1000)
            assoc.abort()
        print(json.dumps(times))
    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
"""


def requestor_ms(port: int, aet: str, n: int, who: str, pythonpath: str | None = None) -> list[float]:
    """*n* associations to *port* opened by *who* (``harmony`` or ``pynetdicom``) in a process of its own."""
    env = peer_env()
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    out = subprocess.run([sys.executable, "-c", REQUESTOR, str(port), aet, str(n), who], capture_output=True,
                         text=True, env=env, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"the {who} requestor failed: {out.stderr[-1500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def harmony_config(folder: Path, port: int) -> Path:
    """A ``dicom_scp`` on *port* storing into a folder (its contexts are a C-STORE SCP's); the
    HTTP network on a free port, unused."""
    return common_config(folder, free_port(), toml_table("pipelines.ingest", endpoints=["ingest"], backends=["echo"])
                         + toml_table("backends.echo", service="echo")
                         + dicom_scp_endpoint("ingest", port, enable_store=True, storage_dir=str(folder / "in"),
                                              forward_store=False), storage=True)


def pcts(values: list[float]) -> str:
    q = statistics.quantiles(values, n=10)
    return f"p50 {statistics.median(values):6.2f} ms  p90 {q[8]:6.2f} ms"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--associations", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ab", metavar="SRC")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-associate-"))
    try:
        instance = save(make_instance(), tmp / "ct.dcm")
        rq = dcmtk_association_request("storescu", files=(str(instance),), calling="BENCH", called="ANY")
        results: dict[str, dict[str, list[float]]] = {}
        who_all = ["harmony", "orthanc", "storescp"] + (["ab"] if args.ab else [])
        for r in range(args.rounds):
            for who in (who_all if r % 2 == 0 else who_all[::-1]):
                got = results.setdefault(who, {"same": [], "new": []})
                if who in ("orthanc", "storescp"):
                    peer = Orthanc(tmp / f"orthanc-{r}") if who == "orthanc" else Storescp(tmp / f"storescp-{r}")
                    peer.start()
                    try:
                        port = peer.dicom_port if who == "orthanc" else peer.port
                        out = measure(port, with_called(rq, peer.aet), args.associations, f"R{r}{who[0]}")
                    finally:
                        peer.stop()
                else:
                    port = free_port()
                    proc = start_harmony(harmony_config(tmp / f"{who}-{r}", port), port,
                                         pythonpath=args.ab if who == "ab" else None)
                    try:
                        out = measure(port, with_called(rq, "HARMONY"), args.associations, f"R{r}H")
                    finally:
                        stop(proc)
                for kind in ("same", "new"):
                    got[kind] += out[kind]
        requested: dict[str, list[float]] = {}
        requestors = ["harmony", "pynetdicom"] + (["ab"] if args.ab else [])
        orthanc = Orthanc(tmp / "orthanc-requested").start()
        try:
            for r in range(args.rounds):
                for who in (requestors if r % 2 == 0 else requestors[::-1]):
                    requested.setdefault(who, []).extend(requestor_ms(
                        orthanc.dicom_port, orthanc.aet, args.associations // 3, "pynetdicom" if who == "pynetdicom"
                        else "harmony", args.ab if who == "ab" else None))
        finally:
            orthanc.stop()
        print(f"A-ASSOCIATE-RQ of DCMTK storescu ({len(rq)} bytes, 128 contexts) to A-ASSOCIATE-AC, "
              f"{args.associations} associations a row a round, {args.rounds} rounds")
        for kind, label in (("same", "same AE title"), ("new", "a new AE title each")):
            orthanc = statistics.median(results["orthanc"][kind])
            print(f"  {label}:")
            for who in who_all:
                values = results[who][kind]
                name = {"ab": f"Harmony --ab ({args.ab})"}.get(who, who.capitalize() if who != "storescp"
                                                                 else "DCMTK storescp")
                print(f"    {name:<40} {pcts(values)}  {statistics.median(values) / orthanc:5.2f}x Orthanc")
        print(f"Harmony as requestor: dicom_scu's association (128 storage contexts, their SCP roles) to Orthanc, "
              f"{args.associations // 3} a round a client, connect to established (each in its own process):")
        pyn = statistics.median(requested["pynetdicom"])
        for who in requestors:
            name = {"harmony": "Harmony associate()", "pynetdicom": "pynetdicom AE.associate",
                    "ab": f"Harmony --ab ({args.ab})"}[who]
            print(f"    {name:<40} {pcts(requested[who])}  {statistics.median(requested[who]) / pyn:5.2f}x pynetdicom")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def with_called(rq: bytes, called: str) -> bytes:
    """The whole PDU *rq* with its called AE title field (body bytes 4-20) set to *called*."""
    return rq[:10] + called.encode().ljust(16) + rq[26:]


if __name__ == "__main__":
    sys.exit(main())
