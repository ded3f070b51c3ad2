"""Where a proxied C-FIND's time goes inside Harmony: this build and another side by side.

    .venv/bin/python bench/dimse/spans.py /tmp/main-build/src [N [ROUNDS]]

Two Harmony processes (this checkout's venv build, and the build in the folder given, as
``--ab`` takes it) in front of one Orthanc, N C-FINDs (bench/dimse/client.py) on each per
round, alternating; prints each one's CPU per C-FIND and p50, and the in-process spans of
spans_site/sitecustomize.py (medians, quartiles).  Bench-only; not part of Harmony."""
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SITE = str(Path(__file__).resolve().with_name("spans_site"))
other = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 500
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 6
for folder in (ROOT / "src", ROOT, ROOT / "bench" / "dimse"):
    sys.path.insert(0, str(folder))
import run as R  # noqa: E402
from tests.peers import free_port, peer_env, port_open, wait_for  # noqa: E402

work = Path(tempfile.mkdtemp(prefix="cfspan-"))
corpus = R.make_corpus(work / "corpus")
orthanc = R.Orthanc(work / "orthanc").start()
procs = {}
try:
    orthanc.upload([i.path for i in corpus])
    for aet in ("BENCH", "HARMONY_SCU"):
        orthanc.add_modality(aet.lower(), aet, free_port())
    for who, pp in (("this build", SITE), ("other", f"{SITE}:{other}")):
        scp, ing = free_port(), free_port()
        cfg = R.harmony_config(work / who.replace(" ", "-"), orthanc, scp, ing)
        env = peer_env()
        env["PYTHONPATH"] = pp
        env["CFSPAN_OUT"] = str(work / f"{who.replace(' ', '-')}.spans")
        log = open(cfg.parent / "harmony.log", "wb")
        p = subprocess.Popen([str(R.BIN / "twistd"), "-n", "--pidfile=", "harmony", "-c", str(cfg)],
                             cwd=cfg.parent, stdout=log, stderr=subprocess.STDOUT, env=env)
        wait_for(lambda port=scp: port_open(port), 30, "harmony", p)
        R.latencies(scp, "HARMONY", 10, 50)
        procs[who] = (p, scp, [], [])
    for r in range(rounds):
        order = list(procs) if r % 2 == 0 else list(reversed(procs))
        for who in order:
            p, scp, cpu, lat = procs[who]
            b = R.cpu_seconds(p.pid)
            res = R.latencies(scp, "HARMONY", 0, n)
            cpu.append((R.cpu_seconds(p.pid) - b) / n * 1000)
            lat.append(statistics.median(res["find"]) * 1000)
    for who, (p, _port, cpu, lat) in procs.items():
        p.send_signal(signal.SIGUSR2)
        p.wait(30)
        print(who, "cpu/C-FIND ms", round(statistics.median(cpu), 3), [round(c, 2) for c in cpu],
              "p50 ms", round(statistics.median(lat), 3))
        print((work / f"{who.replace(' ', '-')}.spans").read_text())
finally:
    for p, *_rest in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait(30)
    orthanc.stop()
    import shutil
    shutil.rmtree(work, ignore_errors=True)
