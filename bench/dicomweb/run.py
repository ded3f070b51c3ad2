#!/usr/bin/env python3
"""DICOMweb bridge benchmark: Harmony (dicomweb endpoint -> dicomweb_bridge ->
dicom_scu -> Orthanc's DIMSE port) next to Orthanc's native DICOMweb plugin,
same data, same run.

    python bench/dicomweb/run.py [--instances 200] [--gib]

Figures (each with the native one and the ratio):
- QIDO-RS study search latency (p50/p95 over sequential requests);
- WADO-RS whole-study retrieve: throughput (MB/s) and time to the first part;
- STOW-RS of N instances (one request);
- Harmony's peak RSS while retrieving the study (``--gib``: a 1 GiB study).
Goals from issue 13: QIDO <= 1.5x native latency, WADO >= 1.0x DCMTK getscu's
MB/s for the same study; RSS < 150 MB.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.common import (RssSampler, cpu_seconds, dicom_scu_backend, dicomweb_bridge_pipeline,  # noqa: E402
                          free_port, harmony_config, start_harmony, stop)
from tests.dicom_data import make_instance, save  # noqa: E402
from tests.peers import Orthanc  # noqa: E402

STUDY = "1.2.826.0.1.3680043.10.543.900.1"
AET = "HARMONY_BENCH"


def make_study(folder: Path, count: int, rows: int, study=STUDY, patient="BENCH") -> list[Path]:
    paths = []
    for n in range(1, count + 1):
        series = n % 2 + 1
        ds = make_instance(patient_id=patient, study_uid=study, series_uid=f"{study}.{series}",
                           sop_uid=f"{study}.{series}.{n}", instance_number=n, rows=rows, cols=rows, seed=n)
        paths.append(save(ds, folder / f"{n}.dcm"))
    return paths


def config(folder: Path, port: int, orthanc: Orthanc) -> Path:
    return harmony_config(folder, port, dicomweb_bridge_pipeline("pacs", max_upload_bytes=8589934592)
                          + dicom_scu_backend("pacs", orthanc.aet, orthanc.dicom_port, local_aet=AET,
                                              timeout_secs=120), storage=True)


def qido(base: str, rounds: int) -> tuple[float, float]:
    s = requests.Session()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        r = s.get(f"{base}/studies", params={"PatientID": "BENCH"}, headers={"Accept": "application/dicom+json"})
        r.raise_for_status()
        assert len(r.json()) == 1
        times.append(time.perf_counter() - t)
    times.sort()
    return statistics.median(times) * 1000, times[int(len(times) * 0.95) - 1] * 1000


def wado(base: str, study: str) -> tuple[float, float, int]:
    """-> (MB/s, seconds to the first complete part, bytes)."""
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
    t = time.perf_counter()
    r = requests.get(f"{base}/studies/{study}", headers={"Accept": accept}, stream=True)
    r.raise_for_status()
    boundary = r.headers["Content-Type"].split("boundary=")[1].split(";")[0].strip('"').encode()
    size, first, seen = 0, None, b""
    for chunk in r.iter_content(256 * 1024):
        size += len(chunk)
        if first is None:
            seen += chunk
            if seen.count(b"--" + boundary) >= 2:
                first = time.perf_counter() - t
            elif len(seen) > 4 * 1024 * 1024:
                seen = seen[-1024 * 1024:]
    total = time.perf_counter() - t
    return size / total / 1e6, first if first is not None else total, size


def getscu(orthanc: Orthanc, out: Path) -> float:
    """DCMTK's getscu pulling the study (the fastest DIMSE client here): the
    DIMSE transfer bound the bridge works within."""
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    subprocess.run(["/usr/bin/getscu", "-aet", AET, "-aec", orthanc.aet, "-od", str(out), "-k",
                    "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={STUDY}", "127.0.0.1",
                    str(orthanc.dicom_port)], check=True, capture_output=True, env={**os.environ, "TCP_NODELAY": "1"})
    return time.perf_counter() - t


def pynetdicom_get(orthanc: Orthanc, out: Path) -> float:
    """pynetdicom's own C-GET of the study, files written as received: what
    the dicom_scu backend is built on."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet

    out.mkdir(parents=True, exist_ok=True)

    def on_store(event):
        with open(out / event.request.AffectedSOPInstanceUID, "wb") as f:
            f.write(event.encoded_dataset())
        return 0x0000

    ae = AE(ae_title=AET)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = STUDY
    t = time.perf_counter()
    assoc = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title=orthanc.aet,
                         ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    for _status, _ in assoc.send_c_get(ident, StudyRootQueryRetrieveInformationModelGet):
        pass
    assoc.release()
    return time.perf_counter() - t


def pynetdicom_find(orthanc: Orthanc, rounds: int) -> float:
    """p50 of the same study search as a C-FIND from pynetdicom on one open
    association (what the dicom_scu backend does with its pool): the DIMSE
    bound of the bridge's QIDO latency."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
    from tests.dimse_helpers import NODELAY_HANDLERS
    ae = AE(ae_title=AET)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title=orthanc.aet, evt_handlers=NODELAY_HANDLERS)
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.PatientID = "BENCH"
    for keyword in ("StudyInstanceUID", "StudyDate", "PatientName", "AccessionNumber", "ModalitiesInStudy"):
        setattr(ident, keyword, "")
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _status, _ in assoc.send_c_find(ident, StudyRootQueryRetrieveInformationModelFind):
            pass
        times.append(time.perf_counter() - t)
    assoc.release()
    return statistics.median(times) * 1000


def median_by(results: list[tuple], index: int) -> tuple:
    """The result whose *index*-th figure is the median one (its other figures with it)."""
    ordered = sorted(results, key=lambda r: r[index])
    return ordered[len(ordered) // 2]


def stow(base: str, paths: list[Path]) -> float:
    boundary = "benchboundary"
    body = io.BytesIO()
    for p in paths:
        body.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        body.write(p.read_bytes())
        body.write(b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    data = body.getvalue()
    t = time.perf_counter()
    r = requests.post(f"{base}/studies", data=data,
                      headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                               "Accept": "application/dicom+json"})
    elapsed = time.perf_counter() - t
    if r.status_code != 200:
        raise RuntimeError(f"STOW answered {r.status_code}: {r.text[:300]}")
    return elapsed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=200)
    ap.add_argument("--rows", type=int, default=512, help="image size (rows=cols, 16-bit)")
    ap.add_argument("--qido-rounds", type=int, default=100)
    ap.add_argument("--gib", action="store_true", help="retrieve a 1 GiB study for the RSS figure")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    ap.add_argument("--only", choices=("all", "qido"), default="all", help="qido: the QIDO rows only")
    ap.add_argument("--profile", metavar="FILE", help="py-spy record of Harmony during 1,000 extra QIDO requests "
                    "(py-spy in the venv, not a dependency; FILE.txt for raw stacks)")
    ap.add_argument("--ab", type=Path, metavar="SRC",
                    help="with --only qido: also run a second Harmony importing harmony from SRC (e.g. main's "
                         "src/, exported with git archive) in the same interleaved rounds")
    args = ap.parse_args()
    count = args.instances
    if args.gib:
        count = max(count, (1 << 30) // (args.rows * args.rows * 2) + 1)
    with tempfile.TemporaryDirectory(prefix="harmony-bench-dw-") as tmp:
        tmp = Path(tmp)
        print(f"making a study of {count} instances ({args.rows}x{args.rows}, 16-bit)...", flush=True)
        if args.only == "qido":
            count = min(count, 4)
        paths = make_study(tmp / "study", count, args.rows)
        stow_count = args.instances if args.only == "all" else 0
        stow_a = make_study(tmp / "stow-a", stow_count, 128, study=STUDY + ".7", patient="STOWA")
        stow_b = make_study(tmp / "stow-b", stow_count, 128, study=STUDY + ".8", patient="STOWB")
        orthanc = Orthanc(tmp / "orthanc").start()
        harmony = other = None
        try:
            print("loading Orthanc...", flush=True)
            orthanc.upload(paths)
            port = free_port()
            orthanc.add_modality("harmony", AET, free_port())
            harmony = start_harmony(config(tmp, port, orthanc), port, env={**os.environ, "TCP_NODELAY": "1"})
            bridge = f"http://127.0.0.1:{port}/dicomweb"
            native = orthanc.dicomweb_url
            if args.ab:
                b_port = free_port()
                (tmp / "b").mkdir()
                other = start_harmony(config(tmp / "b", b_port, orthanc), b_port,
                                      env={**os.environ, "TCP_NODELAY": "1", "PYTHONPATH": str(args.ab.resolve())})
                bridge_b = f"http://127.0.0.1:{b_port}/dicomweb"
                qido(bridge_b, 5)
            idle_rss = RssSampler(harmony.pid).rss()

            qido(bridge, 5), qido(native, 5)  # warm up associations and caches
            q_rounds, b_rounds = [], []
            for n in range(args.rounds):  # interleaved, who goes first alternating
                sides = [("bridge", bridge), ("native", native)] + ([("b", bridge_b)] if args.ab else [])
                got = dict((name, qido(url, args.qido_rounds)) for name, url in (sides if n % 2 else sides[::-1]))
                q_rounds.append((got["bridge"], got["native"]))
                if args.ab:
                    b_rounds.append((got["b"], got["native"]))
            q_b = median_by([b for b, _ in q_rounds], 0)
            q_n = median_by([n for _, n in q_rounds], 0)
            f_pyn = pynetdicom_find(orthanc, args.qido_rounds)
            cpu = cpu_seconds(harmony.pid)
            qido(bridge, 500)
            cpu_per_qido = (cpu_seconds(harmony.pid) - cpu) / 500
            if args.profile:
                spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(harmony.pid),
                                        "-o", args.profile, "--rate", "1000", "--gil", "--nonblocking"]
                                       + (["--format", "raw"] if args.profile.endswith(".txt") else []),
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1)
                qido(bridge, 1000)
                spy.send_signal(signal.SIGINT)
                spy.wait(60)
            if args.only == "qido":
                print(f"{'QIDO study search p50 (ms)':44} {q_b[0]:16.2f} {q_n[0]:16.2f} {q_b[0] / q_n[0]:7.2f}x"
                      "  (goal <= 1.5x)")
                print(f"  per round: bridge {' '.join(f'{b[0]:.2f}' for b, _ in q_rounds)}; "
                      f"native {' '.join(f'{n[0]:.2f}' for _, n in q_rounds)}")
                print(f"{'  DIMSE bound: C-FIND by pynetdicom p50 (ms)':44} {f_pyn:16.2f}")
                print(f"Harmony CPU per QIDO request: {cpu_per_qido * 1000:.3f} ms")
                if args.ab:
                    q_ab = median_by([b for b, _ in b_rounds], 0)
                    cpu = cpu_seconds(other.pid)
                    qido(bridge_b, 500)
                    cpu_b = (cpu_seconds(other.pid) - cpu) / 500
                    print(f"B ({args.ab}): QIDO p50 {q_ab[0]:.2f} ms, {q_ab[0] / q_n[0]:.2f}x native; per round "
                          f"{' '.join(f'{b[0]:.2f}' for b, _ in b_rounds)}; CPU per QIDO {cpu_b * 1000:.3f} ms")
                return

            wado(native, STUDY)  # warm Orthanc's file cache
            wado(bridge, STUDY)  # and the backend's retrieve association (QIDO warmed its query one)
            sampler = RssSampler(harmony.pid)
            sampler.start()
            rounds = {"bridge": [], "native": [], "getscu": []}
            for r in range(args.rounds):  # interleaved: the machine's load moves between them
                w_b = wado(bridge, STUDY)
                rounds["bridge"].append(w_b)
                rounds["native"].append(wado(native, STUDY))
                rounds["getscu"].append(getscu(orthanc, tmp / f"getscu{r}"))
            sampler.finish()
            w_b = median_by(rounds["bridge"], 0)
            w_n = median_by(rounds["native"], 0)
            g_dcmtk = statistics.median(rounds["getscu"])
            g_pyn = pynetdicom_get(orthanc, tmp / "pynetdicom")

            s_b = stow(bridge, stow_a)
            s_n = stow(native, stow_b)

            mb = w_b[2] / 1e6
            print()
            print(f"{'figure':44} {'harmony bridge':>16} {'orthanc native':>16} {'ratio':>8}")
            print(f"{'QIDO study search p50 (ms)':44} {q_b[0]:16.2f} {q_n[0]:16.2f} {q_b[0] / q_n[0]:7.2f}x"
                  "  (goal <= 1.5x)")
            print(f"{'  DIMSE bound: C-FIND by pynetdicom p50 (ms)':44} {f_pyn:16.2f}")
            print(f"{'  Harmony CPU per QIDO request (ms)':44} {cpu_per_qido * 1000:16.3f}")
            print(f"{'QIDO study search p95 (ms)':44} {q_b[1]:16.2f} {q_n[1]:16.2f} {q_b[1] / q_n[1]:7.2f}x")
            print(f"{f'WADO study retrieve, {count} inst / {mb:.0f} MB (MB/s)':44} {w_b[0]:16.1f} {w_n[0]:16.1f} "
                  f"{w_b[0] / w_n[0] * 100:6.0f}%")
            print(f"{'  DIMSE bound: C-GET by pynetdicom / getscu (MB/s)':44} {mb / g_pyn:16.1f} {mb / g_dcmtk:16.1f}")
            print(f"{'WADO via bridge / DCMTK getscu (MB/s)':44} {w_b[0]:16.1f} {mb / g_dcmtk:16.1f} "
                  f"{w_b[0] / (mb / g_dcmtk):7.2f}x  (goal >= 1.0x)")
            print(f"  WADO per round (MB/s): bridge {' '.join(f'{x[0]:.0f}' for x in rounds['bridge'])}; "
                  f"getscu {' '.join(f'{mb / x:.0f}' for x in rounds['getscu'])}")
            print(f"{'WADO time to first part (ms)':44} {w_b[1] * 1000:16.1f} {w_n[1] * 1000:16.1f} "
                  f"{w_b[1] / w_n[1]:7.2f}x")
            print(f"{f'STOW {args.instances} instances, one request (s)':44} {s_b:16.2f} {s_n:16.2f} "
                  f"{s_b / s_n:7.2f}x")
            print(f"{'Harmony RSS idle / peak during WADO (MB)':44} {idle_rss / 1e6:7.1f} / {sampler.peak / 1e6:6.1f}")
            print()
            print("goals: QIDO <= 1.5x native, WADO >= 1.0x getscu's MB/s, RSS < 150 MB")
        finally:
            stop(other)
            stop(harmony)
            orthanc.stop()


if __name__ == "__main__":
    main()
