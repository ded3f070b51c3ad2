"""A Harmony for the console's tests: two health-checked HTTP upstreams (one
pipeline, its description an XSS payload), an ingest -> store_forward
pipeline to a scripted target that refuses one instance until told to (a
dead letter), synthetic instances in the store (one patient named with an
XSS payload), and the management API with a token on its own loopback port.
"""

from __future__ import annotations

import json

import treq
from pydicom import dcmread

from tests.dicom_data import UID_ROOT, make_instance, save
from tests.harness import listen, start_harmony, write_config
from tests.sf_helpers import ScriptedTarget, ingest_config
from tests.upstreams import KillableUpstream, lb_pipeline

TOKEN = "console-token-0123456789abcdef"
XSS = "<img src=x onerror=alert(1)>"
HEALTH = """[backends.up.health]
path = "/healthz"
interval_secs = 0.2
timeout_secs = 0.5
healthy_threshold = 1
unhealthy_threshold = 1"""


class ConsoleRig:
    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.upstreams = []
        self.accept_poison = False
        self.poison = None
        self.target = ScriptedTarget(lambda sop, n: 409 if sop == self.poison and not self.accept_poison else 200)
        self.target_port = None
        self.harmony = None
        self.files = []

    async def start(self):
        self.upstreams = [KillableUpstream(n).start() for n in ("pacs-a", "pacs-b")]
        self.target_port = listen(self.target)
        main = ingest_config(f"http://127.0.0.1:{self.target_port.getHost().port}",
                             sf_options="backoff_initial_seconds = 30\nmax_attempts = 2")
        main += f'\n[management]\nenabled = true\nbind_port = 0\ntoken = "{TOKEN}"\n'
        pipes = {"lb": lb_pipeline(self.upstreams, health=HEALTH, description=XSS)}
        self.config_path = write_config(self.tmp_path / "h", main, pipes)
        self.harmony = await start_harmony(self.config_path)
        # Synthetic instances: a normal patient (3 instances, one refused by the
        # target), and a patient whose name is an XSS payload.
        data = self.tmp_path / "data"
        for i in range(1, 4):
            ds = make_instance(patient_id="CONSOLE1", patient_name="DOE^JANE", study_uid=f"{UID_ROOT}61.1",
                               series_uid=f"{UID_ROOT}61.1.1", sop_uid=f"{UID_ROOT}61.1.1.{i}", instance_number=i,
                               rows=32, cols=32, seed=i)
            self.files.append(save(ds, data / f"a{i}.dcm"))
        ds = make_instance(patient_id="XSS1", patient_name=XSS, study_uid=f"{UID_ROOT}62.1",
                           series_uid=f"{UID_ROOT}62.1.1", sop_uid=f"{UID_ROOT}62.1.1.1", rows=32, cols=32, seed=9,
                           study_description=XSS)
        self.files.append(save(ds, data / "xss.dcm"))
        self.poison = str(dcmread(self.files[1], stop_before_pixels=True).SOPInstanceUID)
        for f in self.files:
            r = await treq.post(self.harmony.url("/ingest"), data=f.read_bytes(),
                                headers={"Content-Type": "application/dicom"})
            assert r.code == 200, await r.content()
        await self.forward.idle()
        return self

    @property
    def forward(self):
        return self.harmony.service.runtime.backends["sf"].forward

    @property
    def admin_port(self) -> int:
        return self.harmony.service.management.port.getHost().port

    def admin(self, path="") -> str:
        return f"http://127.0.0.1:{self.admin_port}/admin{path}"

    async def stop(self):
        if self.harmony is not None:
            await self.harmony.stop()
        for u in self.upstreams:
            await u.kill()
        if self.target_port is not None:
            await self.target_port.stopListening()


async def call(method, url, *, headers=None, data=None, allow_redirects=False):
    r = await treq.request(method, url, headers=headers or {}, data=data, allow_redirects=allow_redirects)
    body = await r.content()
    ctype = (r.headers.getRawHeaders("content-type") or [""])[0]
    return r, (json.loads(body) if body and "json" in ctype else body)
