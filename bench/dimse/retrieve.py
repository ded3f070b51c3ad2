#!/usr/bin/env python3
"""Retrieve benchmark: issue 13's two retrieve rows in one run, with profiles.

Why a separate script: the two goals on retrieving through Harmony --
C-GET via ``dicom_scp`` -> ``dicom_scu`` -> Orthanc against ``getscu``
straight to Orthanc (<= 2x the time), and WADO-RS through the DICOMweb
bridge against DCMTK ``getscu`` of the same study (>= 1.0x its MB/s) -- need
many interleaved rounds and a profiler attached to Harmony only while it
works; run.py and bench/dicomweb/run.py measure everything else too.

    python bench/dimse/retrieve.py [--rounds 5] [--instances 200]
    python bench/dimse/retrieve.py --profile get --profile-out get.svg   # py-spy flame graph of the C-GET rounds
    python bench/dimse/retrieve.py --strace wado                          # strace -c of the WADO rounds

Every round runs each retrieve next to its peer (direct C-GET and C-GET via
Harmony; WADO via the bridge and getscu of the same study), in alternating
order, so the machine's load moves both alike; the ratios are of medians.  Files retrieved through
Harmony are compared byte for byte with Orthanc's.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.common import (RssSampler, cpu_seconds, dicom_scp_endpoint, dicom_scu_backend,  # noqa: E402
                          dicomweb_bridge_pipeline, free_port, harmony_config, start_harmony, stop, toml_table)
from bench.dimse.run import make_big_study as make_get_study  # noqa: E402  (run.py's C-GET study)
from tests.dicom_data import make_instance, save, uid  # noqa: E402
from tests.peers import Orthanc, peer_env, port_open, wait_for  # noqa: E402

GET_AET = "BENCH"
BRIDGE_AET = "HARMONY_SCU"
WADO_STUDY = "1.2.826.0.1.3680043.10.543.901.1"
PY_SPY = Path(sys.executable).parent / "py-spy"


def make_wado_study(folder: Path, n: int, side: int) -> list[Path]:
    """bench/dicomweb/run.py's WADO study: two series."""
    paths = []
    for i in range(1, n + 1):
        series = i % 2 + 1
        ds = make_instance(patient_id="BENCHW", study_uid=WADO_STUDY, series_uid=f"{WADO_STUDY}.{series}",
                           sop_uid=f"{WADO_STUDY}.{series}.{i}", instance_number=i, rows=side, cols=side, seed=i)
        paths.append(save(ds, folder / f"{i}.dcm"))
    return paths


def config(folder: Path, http_port: int, scp_port: int, orthanc: Orthanc) -> Path:
    return harmony_config(folder, http_port, toml_table("pipelines.router", endpoints=["scp"], backends=["pacs"])
                          + dicomweb_bridge_pipeline("pacs")
                          + dicom_scp_endpoint("scp", scp_port, enable_find=True, enable_get=True)
                          + dicom_scu_backend("pacs", orthanc.aet, orthanc.dicom_port, local_aet=BRIDGE_AET,
                                              timeout_secs=120), storage=True)


def thread_cpu(pid: int) -> float:
    """CPU seconds of *pid*'s main thread alone: Harmony's reactor (work moved to
    helper threads leaves it, whatever the process total says)."""
    try:
        fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu(who=resource.RUSAGE_SELF) -> float:
    """CPU seconds (user + system) of this process, or of its finished children (getscu)."""
    u = resource.getrusage(who)
    return u.ru_utime + u.ru_stime


def getscu(port: int, aet: str, out: Path, keys: list[str], calling=GET_AET) -> float:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    args = []
    for k in keys:
        args += ["-k", k]
    t = time.perf_counter()
    r = subprocess.run(["/usr/bin/getscu", "-S", "-aet", calling, "-aec", aet, "-od", str(out), "-pdu", "131072",
                        *args, "127.0.0.1", str(port)], capture_output=True, env=peer_env())
    elapsed = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"getscu from {aet} failed: {r.stderr.decode(errors='replace')[-500:]}")
    return elapsed


def wado(base: str, study: str) -> tuple[float, int]:
    """-> (seconds, bytes) of a whole-study WADO-RS, read in 256 KiB blocks (as bench/dicomweb/run.py)."""
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
    t = time.perf_counter()
    r = requests.get(f"{base}/studies/{study}", headers={"Accept": accept}, stream=True)
    r.raise_for_status()
    size = 0
    for chunk in r.iter_content(256 * 1024):
        size += len(chunk)
    return time.perf_counter() - t, size


class Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


class Observer:
    """py-spy or strace attached to Harmony for the rounds of one workload."""

    def __init__(self, pid: int, tool: str | None, out: Path | None):
        self.pid, self.tool, self.out, self.proc = pid, tool, out, None

    def __enter__(self):
        if self.proc is not None:
            return self   # attached for the first round, kept for the next ones
        if self.tool == "py-spy":
            self.proc = subprocess.Popen([str(PY_SPY), "record", "-p", str(self.pid), "-r", "250", "--nonblocking",
                                          "-o", str(self.out), "-f", "flamegraph" if str(self.out).endswith(
                                              ".svg") else "raw"], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE)
        elif self.tool == "strace":
            command = os.environ.get("HARMONY_BENCH_STRACE", "strace -c -f").split()   # e.g. "strace -f -tt -T"
            self.proc = subprocess.Popen(command + ["-p", str(self.pid), "-o", str(self.out)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if self.proc is not None:
            time.sleep(1.0)  # let it attach (not a synchronisation of the system under test)
        return self

    def __exit__(self, *exc):
        pass

    def close(self):
        if self.proc is not None:
            self.proc.send_signal(2)
            self.proc.wait(60)
            print(f"{self.tool} output: {self.out}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--instances", type=int, default=200)
    ap.add_argument("--get-side", type=int, default=256)
    ap.add_argument("--wado-side", type=int, default=512)
    ap.add_argument("--profile", choices=("get", "wado"), help="py-spy record Harmony during these rounds")
    ap.add_argument("--profile-out", type=Path)
    ap.add_argument("--strace", choices=("get", "wado"), help="strace -c -f Harmony during these rounds")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--ab", type=Path, metavar="SRC",
                    help="also run a second Harmony importing harmony from SRC (e.g. main's src/, exported with "
                         "git archive), in the same rounds: an A/B of two builds under the same load")
    ap.add_argument("--ab-env", action="append", default=[], metavar="NAME=VALUE",
                    help="an environment variable for the second Harmony only (e.g. HARMONY_SENDFILE=0); "
                         "without --ab, the second Harmony runs this build")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="harmony-bench-retrieve-"))
    orthanc = harmony = None
    try:
        print(f"preparing data in {work} ...", flush=True)
        get_files = make_get_study(work / "get-study", args.instances, args.get_side)
        wado_files = make_wado_study(work / "wado-study", args.instances, args.wado_side)
        orthanc = Orthanc(work / "orthanc").start()
        orthanc.upload(get_files + wado_files)
        for aet in (GET_AET, BRIDGE_AET):
            orthanc.add_modality(aet.lower(), aet, free_port())
        http_port, scp_port = free_port(), free_port()
        harmony = start_harmony(config(work / "harmony", http_port, scp_port, orthanc), http_port,
                                env=peer_env())
        wait_for(lambda: port_open(scp_port), 30, "harmony's dicom_scp", harmony)
        other = None
        if args.ab or args.ab_env:
            b_http, b_scp = free_port(), free_port()
            b_env = {**peer_env(), **dict(kv.split("=", 1) for kv in args.ab_env)}
            if args.ab:
                b_env["PYTHONPATH"] = str(args.ab.resolve())
            other = start_harmony(config(work / "harmony-b", b_http, b_scp, orthanc), b_http, env=b_env)
            wait_for(lambda: port_open(b_scp), 30, "the second harmony's dicom_scp", other)
            base_b = f"http://127.0.0.1:{b_http}/dicomweb"
            getscu(b_scp, "HARMONY", work / "warm", ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={uid(9, 1)}"])
            wado(base_b, WADO_STUDY)
        base = f"http://127.0.0.1:{http_port}/dicomweb"
        get_keys = ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={uid(9, 1)}"]
        wado_keys = ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={WADO_STUDY}"]

        # Warm: Orthanc's caches, Harmony's association pool and accept cache.
        getscu(scp_port, "HARMONY", work / "warm", get_keys)
        getscu(orthanc.dicom_port, orthanc.aet, work / "warm", get_keys)
        wado(base, WADO_STUDY)
        rss_idle = RssSampler(harmony.pid).rss()
        sampler = RssSampler(harmony.pid)
        sampler.start()

        observing = args.profile or args.strace
        observer = Observer(harmony.pid, "py-spy" if args.profile else "strace" if args.strace else None,
                            args.profile_out or work / (f"{observing}.svg" if args.profile
                                                        else f"strace-{observing}.txt"))

        rows: dict[str, list] = {"direct": [], "via": [], "wado": [], "getscu": [], "cpu_get": [], "cpu_wado": [],
                                 "via_b": [], "wado_b": [], "cpu_get_b": [], "cpu_wado_b": [],
                                 "orthanc_wado": [], "client_wado": [], "reactor_wado": [], "reactor_wado_b": [], "orthanc_getscu": [], "client_getscu": []}
        wado_bytes = 0
        for r in range(args.rounds):
            # Each pair back to back, in alternating order: what runs first may find the
            # previous round's files still being written back.
            order = ["direct", "via"] + (["via_b"] if other else [])
            for what in order[r % len(order):] + order[:r % len(order)]:
                if observing == "wado":
                    break
                if what == "direct":
                    rows["direct"].append(getscu(orthanc.dicom_port, orthanc.aet, work / "get-direct", get_keys))
                elif what == "via_b":
                    cpu = cpu_seconds(other.pid)
                    rows["via_b"].append(getscu(b_scp, "HARMONY", work / "get-via-b", get_keys))
                    rows["cpu_get_b"].append(cpu_seconds(other.pid) - cpu)
                else:
                    with observer if observing == "get" else Nothing():
                        cpu = cpu_seconds(harmony.pid)
                        rows["via"].append(getscu(scp_port, "HARMONY", work / "get-via", get_keys))
                        rows["cpu_get"].append(cpu_seconds(harmony.pid) - cpu)
            order = ["wado", "getscu"] + (["wado_b"] if other else [])
            for what in order[r % len(order):] + order[:r % len(order)]:
                if observing == "get":
                    break
                if what == "getscu":
                    cpu, peer, client = cpu_seconds(harmony.pid), cpu_seconds(orthanc.proc.pid), \
                        own_cpu(resource.RUSAGE_CHILDREN)
                    rows["getscu"].append(getscu(orthanc.dicom_port, orthanc.aet, work / "getscu-wado", wado_keys,
                                                 calling=BRIDGE_AET))
                    rows["orthanc_getscu"].append(cpu_seconds(orthanc.proc.pid) - peer)
                    rows["client_getscu"].append(own_cpu(resource.RUSAGE_CHILDREN) - client)
                elif what == "wado_b":
                    cpu, reactor = cpu_seconds(other.pid), thread_cpu(other.pid)
                    rows["wado_b"].append(wado(base_b, WADO_STUDY)[0])
                    rows["cpu_wado_b"].append(cpu_seconds(other.pid) - cpu)
                    rows["reactor_wado_b"].append(thread_cpu(other.pid) - reactor)
                else:
                    with observer if observing == "wado" else Nothing():
                        cpu, peer, client = cpu_seconds(harmony.pid), cpu_seconds(orthanc.proc.pid), own_cpu()
                        reactor = thread_cpu(harmony.pid)
                        seconds, wado_bytes = wado(base, WADO_STUDY)
                        rows["cpu_wado"].append(cpu_seconds(harmony.pid) - cpu)
                        rows["reactor_wado"].append(thread_cpu(harmony.pid) - reactor)
                        rows["orthanc_wado"].append(cpu_seconds(orthanc.proc.pid) - peer)
                        rows["client_wado"].append(own_cpu() - client)
                    rows["wado"].append(seconds)
        sampler.finish()
        observer.close()

        med = {k: statistics.median(v) for k, v in rows.items() if v}
        print(f"\n== {args.rounds} interleaved rounds, medians (load average {os.getloadavg()[0]:.1f}) ==")

        def per_round(key, fmt="{:.2f}"):
            return " ".join(fmt.format(v) for v in rows[key])

        if rows["via"]:
            names = sorted(p.name for p in (work / "get-direct").iterdir())
            assert names == sorted(p.name for p in (work / "get-via").iterdir()) and len(names) == args.instances
            same = all((work / "get-direct" / n).read_bytes() == (work / "get-via" / n).read_bytes() for n in names)
            get_mb = sum(p.stat().st_size for p in (work / "get-direct").iterdir()) / 1e6
            print(f"C-GET {args.instances} x {args.get_side}^2 ({get_mb:.0f} MB), DCMTK getscu:")
            print(f"  direct Orthanc   {med['direct']:6.3f} s   rounds {per_round('direct')}")
            print(f"  via Harmony      {med['via']:6.3f} s   rounds {per_round('via')}")
            ratios = [v / d for v, d in zip(rows["via"], rows["direct"], strict=False)]
            print(f"  ratio            {med['via'] / med['direct']:6.2f}x  (goal <= 2x; per round "
                  f"{' '.join(f'{r:.2f}' for r in ratios)})   Harmony CPU {med['cpu_get']:.3f} s")
            print(f"  files byte-identical: {same}")
            if rows["via_b"]:
                ratios = [v / d for v, d in zip(rows["via_b"], rows["direct"], strict=False)]
                print(f"  B ({args.ab or ''} {' '.join(args.ab_env)}): {med['via_b']:6.3f} s, ratio {med['via_b'] / med['direct']:.2f}x; "
                      f"per round {' '.join(f'{r:.2f}' for r in ratios)}; Harmony CPU {med['cpu_get_b']:.3f} s")
        if rows["wado"]:
            wado_mb = sum(p.stat().st_size for p in (work / "getscu-wado").iterdir()) / 1e6
            print(f"WADO-RS via the bridge {args.instances} x {args.wado_side}^2 ({wado_mb:.0f} MB of files, "
                  f"{wado_bytes / 1e6:.0f} MB multipart):")
            print(f"  getscu direct    {wado_mb / med['getscu']:6.1f} MB/s   rounds "
                  f"{' '.join(f'{wado_mb / v:.0f}' for v in rows['getscu'])}")
            print(f"  WADO bridge      {wado_mb / med['wado']:6.1f} MB/s   rounds "
                  f"{' '.join(f'{wado_mb / v:.0f}' for v in rows['wado'])}   Harmony CPU {med['cpu_wado']:.3f} s "
                  f"(reactor thread {med['reactor_wado']:.3f} s; all rounds {sum(rows['cpu_wado']):.2f} s, "
                  f"reactor {sum(rows['reactor_wado']):.2f} s)")
            print(f"  CPU per study: getscu path Orthanc {med['orthanc_getscu']:.3f} s + getscu "
                  f"{med['client_getscu']:.3f} s; bridge path Orthanc {med['orthanc_wado']:.3f} s + Harmony "
                  f"{med['cpu_wado']:.3f} s + client (python requests) {med['client_wado']:.3f} s")
            ratios = [g / w for w, g in zip(rows["wado"], rows["getscu"], strict=False)]
            print(f"  ratio            {med['getscu'] / med['wado']:6.2f}x  (goal >= 1.0x; per round "
                  f"{' '.join(f'{r:.2f}' for r in ratios)})")
            if rows["wado_b"]:
                ratios = [g / w for w, g in zip(rows["wado_b"], rows["getscu"], strict=False)]
                print(f"  B ({args.ab or ''} {' '.join(args.ab_env)}): {wado_mb / med['wado_b']:6.1f} MB/s, "
                      f"ratio {med['getscu'] / med['wado_b']:.2f}x; "
                      f"per round {' '.join(f'{r:.2f}' for r in ratios)}; Harmony CPU {med['cpu_wado_b']:.3f} s "
                      f"(reactor thread {med['reactor_wado_b']:.3f} s; all rounds {sum(rows['cpu_wado_b']):.2f} s, "
                      f"reactor {sum(rows['reactor_wado_b']):.2f} s)")
        print(f"Harmony RSS idle {rss_idle / 1e6:.0f} MB, peak during the rounds {sampler.peak / 1e6:.0f} MB")
        return 0
    finally:
        stop(harmony)
        stop(locals().get("other"))
        if orthanc is not None:
            orthanc.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
