#!/usr/bin/env python3
"""What the operator console costs: page load, live refresh, and the proxy's
throughput with a console open vs closed - in one run, on loopback.

Harmony (twistd, one process) proxies ``/`` to a static nginx upstream (the
bench/http_passthrough set-up) and serves the management API and console on
its own port.  Headless Chromium (Debian's, via selenium, as in the tests):

1. **Page load**: each page loaded from scratch (about:blank first) until its
   content is drawn; wall time, requests and bytes (Resource Timing).
2. **Live refresh**: Harmony's CPU time (``/proc/PID/stat``) over a quiet
   window with the console closed, open on Targets (polls every 2 s) and open
   on Traffic (every 2 s); the difference per poll is what a refresh costs.
3. **Passthrough**: wrk (``-t2 -c50``) through Harmony with the console closed
   and open on Targets, in interleaved rounds; the ratio open/closed.

    .venv/bin/python bench/console/run.py [--duration 5] [--rounds 3] [--idle 20]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from bench.common import (NGINX, TWISTD, WRK, Nginx, free_port, harmony_config, require, start_harmony,  # noqa: E402
                          stop, wrk)

TOKEN = "bench-console-token-0123456789"
PAGES = {"overview": ".pipeline-row svg", "targets": "tr.target", "queues": "#queue-overview table",
         "traffic": ".traffic-pipeline svg.chart", "config": "pre.config", "audit": "#page-audit table"}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for(driver, selector, timeout=20.0):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(driver, timeout, poll_frequency=0.02).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, selector))


def login(driver, admin):
    from selenium.webdriver.common.by import By
    driver.get(f"{admin}/ui/")
    wait_for(driver, "#login-token")
    driver.find_element(By.CSS_SELECTOR, "#login-token").send_keys(TOKEN)
    driver.find_element(By.CSS_SELECTOR, "#login-operator").send_keys("bench")
    driver.find_element(By.CSS_SELECTOR, "#login-submit").click()
    wait_for(driver, ".pipeline-row")


def page_loads(driver, admin, reps):
    out = {}
    for name, ready in PAGES.items():
        walls, counts, sizes = [], [], []
        for _ in range(reps):
            driver.get("about:blank")
            started = time.monotonic()
            driver.get(f"{admin}/ui/#/{name}")
            wait_for(driver, ready)
            walls.append((time.monotonic() - started) * 1000)
            entries = driver.execute_script(
                "return performance.getEntriesByType('navigation').concat(performance.getEntriesByType('resource'))"
                ".map(e => e.transferSize || 0)")
            counts.append(len(entries))
            sizes.append(sum(entries))
        out[name] = {"ms": statistics.median(walls), "requests": statistics.median(counts),
                     "kib": statistics.median(sizes) / 1024}
    return out


def idle_cpu(pid, driver, admin, page, seconds):
    if page is None:
        driver.get("about:blank")
    else:
        driver.get(f"{admin}/ui/#/{page}")
        wait_for(driver, PAGES[page])
        driver.execute_script("performance.clearResourceTimings()")
    before = cpu_seconds(pid)
    time.sleep(seconds)  # a measurement window, not synchronisation
    used = cpu_seconds(pid) - before
    polls = 0
    poll_bytes = 0
    if page is not None:
        entries = driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => [e.name, e.transferSize || 0])")
        polls = len(entries)
        poll_bytes = sum(size for _, size in entries)
    return {"cpu_ms_per_s": used * 1000 / seconds, "requests": polls, "bytes_per_s": poll_bytes / seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle", type=int, default=20, help="seconds per live-refresh CPU window")
    parser.add_argument("--loads", type=int, default=5, help="loads per page")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    require(NGINX, WRK, str(TWISTD), "/usr/bin/chromium", "/usr/bin/chromedriver",
            hint="apt-get install nginx-light wrk chromium chromium-driver; run with Harmony's venv python")
    from tests.browser import make_driver

    folder = Path(tempfile.mkdtemp(prefix="harmony-bench-console-"))
    report = {}
    www = folder / "www"
    www.mkdir()
    (www / "hello.txt").write_bytes(b"x" * 1024)
    os.chmod(folder, 0o755)
    up_port, port, admin_port = free_port(), free_port(), free_port()
    upstream = Nginx(folder / "upstream", f"server {{ listen 127.0.0.1:{up_port}; location / {{ root {www}; }} }}",
                     up_port).start()
    harmony = driver = None
    try:
        config = harmony_config(folder / "harmony", port, f"""
            [management]
            enabled = true
            bind_port = {admin_port}
            token = "{TOKEN}"

            [pipelines.pass]
            networks = ["default"]
            endpoints = ["all"]
            backends = ["up"]

            [endpoints.all]
            service = "http"
            path_prefix = "/"

            [backends.up]
            service = "http"
            base_url = "http://127.0.0.1:{up_port}"
            """)
        harmony = start_harmony(config, port)
        driver = make_driver(folder / "chromium")
        admin = f"http://127.0.0.1:{admin_port}/admin"
        login(driver, admin)
        url = f"http://127.0.0.1:{port}/hello.txt"
        wrk(url, 1)  # traffic for the charts

        report["page_load"] = page_loads(driver, admin, args.loads)
        print(f"page load (median of {args.loads}, from about:blank until drawn; load average "
              f"{os.getloadavg()[0]:.2f})")
        print(f"{'page':<9} {'ms':>7} {'requests':>8} {'KiB':>7}")
        for name, r in report["page_load"].items():
            print(f"{name:<9} {r['ms']:>7.0f} {r['requests']:>8.0f} {r['kib']:>7.1f}")

        report["live_refresh"] = {}
        for page in (None, "targets", "traffic"):
            report["live_refresh"][page or "closed"] = idle_cpu(harmony.pid, driver, admin, page, args.idle)
        closed = report["live_refresh"]["closed"]["cpu_ms_per_s"]
        print(f"\nlive refresh: Harmony CPU over {args.idle} s idle")
        print(f"{'console':<9} {'CPU ms/s':>9} {'API calls':>9} {'bytes/s':>8} {'CPU ms per call':>16}")
        for name, r in report["live_refresh"].items():
            per_call = (r["cpu_ms_per_s"] - closed) * args.idle / r["requests"] if r["requests"] else 0
            r["cpu_ms_per_call"] = per_call
            print(f"{name:<9} {r['cpu_ms_per_s']:>9.2f} {r['requests']:>9} {r['bytes_per_s']:>8.0f} {per_call:>16.2f}")

        runs = {"closed": [], "open": []}
        for _ in range(args.rounds):
            for state in ("closed", "open"):
                if state == "open":
                    driver.get(f"{admin}/ui/#/targets")
                    wait_for(driver, PAGES["targets"])
                else:
                    driver.get("about:blank")
                if args.warmup:
                    wrk(url, args.warmup)
                runs[state].append(wrk(url, args.duration))
        report["passthrough"] = {}
        print(f"\npassthrough through Harmony, wrk -t2 -c50 -d{args.duration}s, {args.rounds} interleaved rounds")
        for state, rs in runs.items():
            ordered = sorted(rs, key=lambda r: r["rps"])
            med = ordered[len(ordered) // 2]
            report["passthrough"][state] = {**med, "all_rps": [round(r["rps"]) for r in rs]}
            print(f"console {state:<6} {med['rps']:>8.0f} req/s  p50 {med['p50_ms']:.2f} ms  p99 {med['p99_ms']:.2f} ms"
                  f"  {[round(r['rps']) for r in rs]}")
        ratio = report["passthrough"]["open"]["rps"] / report["passthrough"]["closed"]["rps"]
        report["passthrough"]["open_over_closed"] = ratio
        print(f"open/closed req/s = {ratio:.1%}")
    finally:
        if driver is not None:
            driver.quit()
        if harmony is not None:
            stop(harmony)
        upstream.stop()
        shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
