"""store_forward configured from TOML and run as Harmony runs it: ingest over
HTTP (Part-10 bodies), a real Orthanc as the forward target that is down at
first, a Harmony restart in between, delivery once it is back."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
import treq
from twisted.internet import threads

from harmony.config import ConfigErrors, load_config
from harmony.runtime import build_runtime
from harmony.storage.admin import queues_resource
from tests.dicom_data import UID_ROOT
from tests.harness import listen, start_harmony, write_config
from tests.peers import Orthanc
from tests.sf_helpers import PortHold, ingest_config, make_instances, sops_in


def config(folder, orthanc_url, *, min_free_mb=0, extra=""):
    return write_config(folder, ingest_config(orthanc_url, min_free_mb=min_free_mb, log_level="debug",
                                              sf_options="backoff_initial_seconds = 30\nmax_attempts = 1000\n" + extra))


def instance_files(folder, n, study=7):
    return make_instances(folder, n, study, patient_id="E2E")


async def post(harmony, path):
    return await treq.post(harmony.url("/ingest"), data=path.read_bytes(),
                           headers={"Content-Type": "application/dicom"})


def forward_of(harmony):
    return harmony.service.runtime.backends["sf"].forward


@pytest_twisted.ensureDeferred
async def test_outage_restart_then_delivery_exactly_once(tmp_path):
    orthanc = Orthanc(tmp_path / "orthanc")  # ports chosen, not started yet: the target is down
    hold = PortHold(orthanc.http_port)
    cfg = config(tmp_path / "h", orthanc.url)
    files = instance_files(tmp_path, 8)
    harmony = await start_harmony(cfg)
    try:
        for f in files:
            r = await post(harmony, f)
            assert r.code == 200, await r.content()
            assert json.loads(await r.content())["queued_for"] == ["orthanc"]
        await forward_of(harmony).idle()
        stats = await forward_of(harmony).stats()
        assert stats["orthanc"]["pending"] == 8 and stats["orthanc"]["delivered"] == 0
    finally:
        await harmony.stop()

    harmony = await start_harmony(cfg)  # a restart: the queue is read back from disk
    try:
        await forward_of(harmony).ready()
        after = (await forward_of(harmony).stats())["orthanc"]
        # Read back from disk: all 8 queued (a drainer may already be retrying some against the
        # target that is still down, so they count as delivering until that attempt fails).
        assert after["pending"] + after["delivering"] == 8 and after["delivered"] == 0, after
        hold.release()
        await threads.deferToThread(orthanc.start)
        admin = listen(queues_resource(harmony.service.runtime))
        url = f"http://127.0.0.1:{admin.getHost().port}/"
        try:
            woke = json.loads(await (await treq.post(url + "orthanc/wake")).content())
            assert woke["target"] == "orthanc" and 0 < woke["woken"] <= 8  # some may be in flight again
            await forward_of(harmony).idle()
            overview = json.loads(await (await treq.get(url)).content())["targets"]["orthanc"]
            assert overview["delivered"] == 8 and overview["pending"] == 0 and overview["dead"] == 0
        finally:
            await admin.stopListening()
        assert sorted(await threads.deferToThread(sops_in, orthanc)) == sorted(f"{UID_ROOT}7.1.1.{i}" for i in range(1, 9))
        # A crash after sending but before recording means a second delivery:
        # the target still holds each instance once.
        fwd = forward_of(harmony)
        await fwd.store.write(lambda c: c.execute("UPDATE queue SET state='pending', next_attempt_at=0"))
        fwd.wake()
        await fwd.idle()
        assert len(await threads.deferToThread(orthanc.instance_ids)) == 8
    finally:
        await harmony.stop()
        hold.release()
        await threads.deferToThread(orthanc.stop)


@pytest_twisted.ensureDeferred
async def test_refused_instances_are_not_acknowledged(tmp_path):
    cfg = config(tmp_path / "h", "http://127.0.0.1:9", min_free_mb=10**9)
    [f] = instance_files(tmp_path, 1, study=8)
    harmony = await start_harmony(cfg)
    try:
        full = await post(harmony, f)
        assert full.code == 507
        assert json.loads(await full.content())["type"].endswith("storage-full")
        harmony.service.runtime.backends["sf"].store.guard.min_free_bytes = 0  # room again
        junk = await treq.post(harmony.url("/ingest"), data=b"not dicom at all" * 100,
                               headers={"Content-Type": "application/dicom"})
        assert junk.code == 400
        stats = await forward_of(harmony).stats()
        assert sum(stats["orthanc"][s] for s in ("pending", "delivering", "delivered", "dead")) == 0
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.parser import text_string_to_metric_families
        from harmony.storage.metrics import register_runtime_metrics
        registry = CollectorRegistry()
        register_runtime_metrics(registry, harmony.service.runtime)
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for fam in text_string_to_metric_families(generate_latest(registry).decode()) for s in fam.samples}
        refused = "harmony_storage_instances_refused_total"
        assert samples[(refused, (("reason", "full"), ("store", "store")))] == 1
        assert samples[(refused, (("reason", "invalid"), ("store", "store")))] == 1
        assert samples[("harmony_storage_instances_stored_total", (("store", "store"),))] == 0
        store_root = tmp_path / "h" / "store"
        assert list((store_root / "instances").rglob("*.dcm")) == []
        assert list((store_root / "tmp").iterdir()) == []
    finally:
        await harmony.stop()


@pytest.mark.parametrize("extra,key,message", [
    ('forward_to_extra = 1\nper_target = { nosuch = { order = "fifo" } }', "per_target", "not in forward_to"),
    ('order = "random"', "order", "must be one of"),
    ('jitter = 2', "jitter", "between 0 and 1"),
])
def test_config_errors_name_the_key(tmp_path, extra, key, message):
    cfg = config(tmp_path / "h", "http://127.0.0.1:9", extra=extra)
    with pytest.raises(ConfigErrors) as e:
        build_runtime(load_config(cfg))
    text = str(e.value)
    assert f"backends.sf.options.{key}" in text and message in text


def test_forward_to_must_name_a_backend(tmp_path):
    cfg = config(tmp_path / "h", "http://127.0.0.1:9")
    cfg.write_text(cfg.read_text().replace('forward_to = ["orthanc"]', 'forward_to = ["nowhere"]'))
    with pytest.raises(ConfigErrors) as e:
        build_runtime(load_config(cfg))
    assert "backends.sf.options.forward_to" in str(e.value) and "nowhere" in str(e.value)
