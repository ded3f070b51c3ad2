#!/usr/bin/env python3
"""FHIR benchmark: Harmony's fhir endpoint + fhir backend next to the same
upstream reached directly and through nginx, in one run, on loopback.

The upstream is nginx serving static FHIR JSON (a searchset Bundle whose
links and fullUrls are the upstream's absolute URLs, as any FHIR server
writes them), so the upstream is never the bottleneck and every figure is the
proxy's cost.  The nginx peer proxies with ``sub_filter`` replacing the
upstream base by its own: the nearest off-the-shelf equivalent of Harmony's
URL rewrite (a blind byte substitution; Harmony rewrites only the FHIR paths).

1. Search: ``GET /fhir/Patient?name=Doe&_count=20`` with wrk, direct / nginx /
   Harmony (fhir endpoint + backend) / Harmony's plain http passthrough to the
   same upstream (what FHIR awareness costs): req/s, p50, p99 and the ratios.
2. Streaming: a 50 MB searchset Bundle fetched through each proxy while the
   proxy's peak RSS (VmHWM) is read; checks every fullUrl came back rewritten.

Run with the interpreter of the venv Harmony is installed in:

    .venv/bin/python bench/fhir/run.py [--duration 5] [--bundle-mb 50]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import (NGINX, TWISTD, WRK, Nginx, free_port, harmony_config, proxy_block, require,  # noqa: E402
                          start_harmony, status_kib, stop, wrk)

SEARCH = "/fhir/Patient?name=Doe&_count=20"
BIG = "/fhir/Observation?_count=100000"
FHIR_ACCEPT = ["Accept: application/fhir+json"]


# ------------------------------------------------------------------ data


def patient(i: int, base: str) -> dict:
    return {"fullUrl": f"{base}/Patient/p{i}", "search": {"mode": "match"}, "resource": {
        "resourceType": "Patient", "id": f"p{i}", "meta": {"versionId": "1", "lastUpdated": "2023-11-14T22:00:00Z"},
        "identifier": [{"system": "urn:oid:1.2.36.146.595.217.0.1", "value": f"MRN{i:06d}"}],
        "name": [{"family": "Doe", "given": ["Jane", f"Q{i}"]}], "gender": "female", "birthDate": "1970-01-01",
        "address": [{"line": [f"{i} Synthetic St"], "city": "Testville", "postalCode": "0000"}]}}


def observation(i: int, base: str) -> dict:
    return {"fullUrl": f"{base}/Observation/o{i}", "search": {"mode": "match"}, "resource": {
        "resourceType": "Observation", "id": f"o{i}", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
        "subject": {"reference": f"Patient/p{i % 500}"}, "effectiveDateTime": "2020-01-01T00:00:00Z",
        "valueQuantity": {"value": 72.50, "unit": "beats/minute", "system": "http://unitsofmeasure.org",
                          "code": "/min"},
        "note": [{"text": "synthetic \"quoted\" note \\ with escapes"}]}}


def write_data(www: Path, base: str, bundle_mb: int) -> int:
    (www / "fhir").mkdir(parents=True)
    search = {"resourceType": "Bundle", "type": "searchset", "total": 1000,
              "link": [{"relation": "self", "url": f"{base}/Patient?name=Doe&_count=20"},
                       {"relation": "next", "url": f"{base}?_getpages=abc&_getpagesoffset=20&_count=20"}],
              "entry": [patient(i, base) for i in range(20)]}
    (www / "fhir" / "search.json").write_text(json.dumps(search))
    n = 0
    with (www / "fhir" / "big.json").open("w") as f:
        f.write('{"resourceType":"Bundle","type":"searchset","link":[{"relation":"self","url":"%s%s"}],"entry":['
                % (base, BIG[len("/fhir"):]))
        size, first = 0, True
        while size < bundle_mb * 1024 * 1024:
            e = json.dumps(observation(n, base))
            f.write(e if first else "," + e)
            first = False
            size += len(e) + 1
            n += 1
        f.write("]}")
    return n


# ------------------------------------------------------------------ servers


def upstream_block(port: int, www: Path) -> str:
    return f"""
        server {{
            listen 127.0.0.1:{port};
            types {{ }}
            default_type application/fhir+json;
            location = /fhir/Patient {{ alias {www}/fhir/search.json; }}
            location = /fhir/Observation {{ alias {www}/fhir/big.json; }}
        }}"""


def nginx_proxy_block(port: int, up_port: int) -> str:
    return proxy_block(port, [up_port], location="/fhir", extra=f"""
                proxy_set_header Accept-Encoding "";
                proxy_buffering off;
                sub_filter_types application/fhir+json;
                sub_filter_once off;
                sub_filter "http://127.0.0.1:{up_port}/fhir" "http://127.0.0.1:{port}/fhir";""")


class Harmony:
    def __init__(self, folder: Path, port: int, up_port: int):
        self.folder = folder / "harmony"
        self.folder.mkdir(parents=True)
        self.port = port
        self.config = harmony_config(self.folder, port, f"""
            [pipelines.fhir]
            networks = ["default"]
            endpoints = ["fhir"]
            backends = ["up"]

            [endpoints.fhir]
            service = "fhir"
            [endpoints.fhir.options]
            path_prefix = "/fhir"

            [backends.up]
            service = "fhir"
            [backends.up.options]
            base_url = "http://127.0.0.1:{up_port}/fhir"
            public_base_url = "http://127.0.0.1:{port}/fhir"
            timeout_secs = 120

            # The same upstream through the plain http endpoint/backend: what
            # FHIR awareness (classification, negotiation, URL rewriting) costs.
            [pipelines.raw]
            networks = ["default"]
            endpoints = ["raw"]
            backends = ["raw_up"]

            [endpoints.raw]
            service = "http"
            [endpoints.raw.options]
            path_prefix = "/raw"

            [backends.raw_up]
            service = "http"
            [backends.raw_up.options]
            base_url = "http://127.0.0.1:{up_port}"
            """)
        self.proc = None

    def start(self):
        profile = ["--profile", os.environ["HARMONY_BENCH_PROFILE"], "--profiler", "cprofile", "--savestats"] \
            if os.environ.get("HARMONY_BENCH_PROFILE") else []
        self.proc = start_harmony(self.config, self.port, twistd_args=profile)
        return self

    def stop(self):
        stop(self.proc)


# ------------------------------------------------------------------ measurements


def fetch(port: int, path: str, expect_base: str) -> dict:
    """GET *path*, reading in 1 MiB pieces; counts fullUrls under *expect_base*."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("GET", path, headers={"Accept": "application/fhir+json"})
    resp = conn.getresponse()
    parts = []
    while True:
        data = resp.read(1024 * 1024)
        if not data:
            break
        parts.append(data)
    secs = time.monotonic() - started
    conn.close()
    body = b"".join(parts)
    if resp.status != 200:
        raise RuntimeError(f"GET {path} on :{port} answered {resp.status}: {body[:300]!r}")
    rewritten = body.count(f'"fullUrl": "{expect_base}/Observation/'.encode())
    return {"secs": secs, "bytes": len(body), "rewritten": rewritten}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--bundle-mb", type=int, default=50)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    require(NGINX, WRK, str(TWISTD))
    folder = Path(tempfile.mkdtemp(prefix="harmony-bench-fhir-"))
    os.chmod(folder, 0o755)
    report: dict = {"search": {}, "bundle": {}}
    up_port, ngx_port, h_port = free_port(), free_port(), free_port()
    up_base = f"http://127.0.0.1:{up_port}/fhir"
    procs = []
    try:
        entries = write_data(folder / "www", up_base, args.bundle_mb)
        big_size = (folder / "www" / "fhir" / "big.json").stat().st_size
        procs.append(Nginx(folder / "upstream", upstream_block(up_port, folder / "www"), up_port).start())
        proxy = Nginx(folder / "nginx-proxy", nginx_proxy_block(ngx_port, up_port), ngx_port).start()
        procs.append(proxy)
        harmony = Harmony(folder, h_port, up_port).start()
        procs.append(harmony)
        targets = {"direct": up_port, "nginx": ngx_port, "harmony": h_port}

        # sanity: the proxies rewrite, the upstream does not
        for name, port in targets.items():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", SEARCH)
            doc = json.loads(conn.getresponse().read())
            conn.close()
            want = f"http://127.0.0.1:{port}/fhir/Patient/p0"
            if doc["entry"][0]["fullUrl"] != want:
                raise RuntimeError(f"{name}: fullUrl {doc['entry'][0]['fullUrl']!r}, expected {want!r}")

        print(f"search {SEARCH} (Bundle of 20 Patients, {len((folder / 'www/fhir/search.json').read_bytes())} B), "
              f"wrk -t2 -c{args.connections} -d{args.duration}s, loopback, {os.cpu_count()} cores")
        print(f"{'target':<12} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
        urls = {name: f"http://127.0.0.1:{port}{SEARCH}" for name, port in targets.items()}
        urls["harmony-http"] = f"http://127.0.0.1:{h_port}/raw{SEARCH}"
        for name, url in urls.items():
            wrk(url, 1, connections=args.connections, headers=FHIR_ACCEPT)  # warm-up
            r = wrk(url, args.duration, connections=args.connections, headers=FHIR_ACCEPT)
            report["search"][name] = r
            print(f"{name:<12} {r['rps']:>9.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['errors']:>6}")
        s = report["search"]
        print(f"Harmony/direct req/s = {s['harmony']['rps'] / s['direct']['rps']:.1%}, "
              f"Harmony/nginx req/s = {s['harmony']['rps'] / s['nginx']['rps']:.1%}, "
              f"p50 Harmony/nginx = {s['harmony']['p50_ms'] / s['nginx']['p50_ms']:.1f}x, "
              f"fhir/http pipeline req/s = {s['harmony']['rps'] / s['harmony-http']['rps']:.1%}")

        print(f"\n{big_size / 2 ** 20:.1f} MiB searchset Bundle ({entries} entries) fetched once through each; "
              "peak RSS = VmHWM of the proxy process")
        print(f"{'target':<8} {'secs':>6} {'MiB/s':>7} {'base MiB':>9} {'peak MiB':>9} {'fullUrls rewritten':>19}")
        pids = {"nginx": proxy.workers()[0], "harmony": harmony.proc.pid}
        for name, port in targets.items():
            pid = pids.get(name)
            base = status_kib(pid, "VmRSS") / 1024 if pid else 0.0
            r = fetch(port, BIG, f"http://127.0.0.1:{port}/fhir")
            peak = status_kib(pid, "VmHWM") / 1024 if pid else 0.0
            r.update(base_mib=base, peak_mib=peak, entries=entries)
            report["bundle"][name] = r
            ok = f"{r['rewritten']}/{entries}"
            print(f"{name:<8} {r['secs']:>6.2f} {r['bytes'] / 2 ** 20 / r['secs']:>7.1f} "
                  f"{base if pid else float('nan'):>9.1f} {peak if pid else float('nan'):>9.1f} {ok:>19}")
        if report["bundle"]["harmony"]["rewritten"] != entries:
            raise RuntimeError("Harmony did not rewrite every fullUrl")
        b = report["bundle"]
        print(f"Harmony/nginx time = {b['harmony']['secs'] / b['nginx']['secs']:.1f}x, "
              f"Harmony peak RSS growth = {b['harmony']['peak_mib'] - b['harmony']['base_mib']:.1f} MiB "
              f"for a {big_size / 2 ** 20:.0f} MiB body")
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
