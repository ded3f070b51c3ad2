"""The store-and-forward queues through the real management API (own loopback
listener, bearer token): overview, dead letters, retry, purge with
confirmation, and the queue metrics on /admin/metrics - before and after a
reload that rebuilds the ``store_forward`` backend.

The target is a real HTTP server that permanently refuses one instance
(``ScriptedTarget``): no real PACS here can be told to do that.
"""

from __future__ import annotations

import json

import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread

from tests.harness import listen, start_harmony, write_config
from tests.sf_helpers import ScriptedTarget, ingest_config, make_instances

TOKEN = "queue-admin-token-0123456789"
MANAGEMENT = f"""
[management]
enabled = true
bind_port = 0
token = "{TOKEN}"
"""
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def sop(path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def admin(harmony, path):
    return f"http://127.0.0.1:{harmony.service.management.port.getHost().port}/admin{path}"


async def call(method, url, headers=AUTH):
    r = await treq.request(method, url, headers=headers)
    body = await r.content()
    return r.code, (json.loads(body) if body and r.headers.getRawHeaders("content-type", [""])[0].endswith("json")
                    else body)


def queue_metrics(text: bytes) -> dict:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        if family.name.startswith("harmony_store_forward") or family.name.startswith("harmony_storage"):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest_twisted.ensureDeferred
async def test_queues_through_the_management_api(tmp_path):
    files = make_instances(tmp_path / "in", 4, 91, patient_id="QADMIN")
    poison = sop(files[1])
    accept = {"poison": False}
    target = ScriptedTarget(lambda s, n: 409 if s == poison and not accept["poison"] else 200)
    port = listen(target)
    text = ingest_config(f"http://127.0.0.1:{port.getHost().port}",
                         sf_options="backoff_initial_seconds = 30\nmax_attempts = 3") + MANAGEMENT
    harmony = await start_harmony(write_config(tmp_path / "h", text))
    forward = harmony.service.runtime.backends["sf"].forward
    try:
        for f in files:
            r = await treq.post(harmony.url("/ingest"), data=f.read_bytes(), headers={"Content-Type": "application/dicom"})
            assert r.code == 200, await r.content()
        await forward.idle()

        # Every queue call needs the token, like the rest of the API.
        for method, path in (("GET", "/queues"), ("GET", "/queues/orthanc/dead"), ("POST", "/queues/orthanc/retry"),
                             ("DELETE", "/queues/orthanc/dead?confirm=orthanc")):
            status, doc = await call(method, admin(harmony, path), headers={})
            assert status == 401, (method, path)
            status, _ = await call(method, admin(harmony, path), headers={"Authorization": "Bearer wrong-token-000000"})
            assert status == 401

        status, doc = await call("GET", admin(harmony, "/queues"))
        assert status == 200
        overview = doc["targets"]["orthanc"]
        assert (overview["delivered"], overview["dead"], overview["pending"]) == (3, 1, 0)

        status, doc = await call("GET", admin(harmony, "/queues/orthanc/dead"))
        assert status == 200 and [e["sop_instance_uid"] for e in doc["entries"]] == [poison]
        assert "409" in doc["entries"][0]["last_error"]

        metrics = queue_metrics((await call("GET", admin(harmony, "/metrics")))[1])
        labels = (("state", "dead"), ("target", "orthanc"))
        assert metrics[("harmony_store_forward_queue_entries", labels)] == 1
        assert metrics[("harmony_store_forward_attempts_total", (("outcome", "delivered"), ("target", "orthanc")))] == 3
        assert metrics[("harmony_storage_instances_stored_total", (("store", "store"),))] == 4

        # A reload that rebuilds the store_forward backend: the API manages the new one.
        cfg = tmp_path / "h" / "harmony.toml"
        cfg.write_text(cfg.read_text().replace("max_attempts = 3", "max_attempts = 4"))
        status, doc = await call("POST", admin(harmony, "/reload"))
        assert status == 200 and doc["ok"], doc
        new_forward = harmony.service.runtime.backends["sf"].forward
        assert new_forward is not forward
        forward = new_forward
        await forward.idle()
        status, doc = await call("GET", admin(harmony, "/queues/orthanc/dead"))
        assert [e["sop_instance_uid"] for e in doc["entries"]] == [poison]

        # Replayed once the target takes it.
        accept["poison"] = True
        status, doc = await call("POST", admin(harmony, "/queues/orthanc/retry"))
        assert (status, doc) == (200, {"target": "orthanc", "retried": 1})
        await forward.idle()
        assert target.stored == {sop(f): 1 for f in files}
        status, doc = await call("GET", admin(harmony, "/queues"))
        assert (doc["targets"]["orthanc"]["delivered"], doc["targets"]["orthanc"]["dead"]) == (4, 0)
        metrics = queue_metrics((await call("GET", admin(harmony, "/metrics")))[1])  # the reloaded backend's
        assert metrics[("harmony_store_forward_queue_entries", (("state", "delivered"), ("target", "orthanc")))] == 4
        assert metrics[("harmony_store_forward_queue_entries", labels)] == 0

        # Purging needs the confirmation; unknown targets are 404, as problem+json.
        status, doc = await call("DELETE", admin(harmony, "/queues/orthanc/dead"))
        assert status == 400 and "confirm=orthanc" in doc["detail"]
        status, doc = await call("DELETE", admin(harmony, "/queues/orthanc/dead?confirm=orthanc"))
        assert (status, doc) == (200, {"target": "orthanc", "purged": 0})
        status, doc = await call("GET", admin(harmony, "/queues/nobody/dead"))
        assert status == 404
        status, _ = await call("PUT", admin(harmony, "/queues"))
        assert status == 405
    finally:
        await harmony.stop()
        await port.stopListening()
