"""Enhanced-mode acknowledgements, TLS and failover between receivers on the
backend side, and configuration errors that name their key."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from harmony.cli import main
from tests.harness import MINIMAL_MAIN, start_harmony, write_config
from tests.hl7.peers import Receiver, adt, framed_file, mllp_send
from tests.hl7.test_mllp_hostile import Client, connect
from tests.hl7.test_mllp_relay import relay_config, running
from tests.peers import free_port
from tests.sf_helpers import PortHold
from tests.tls_certs import make_pki


@pytest.fixture
def receiver(tmp_path):
    r = Receiver(tmp_path).start()
    yield r
    r.stop()


async def frames(client: Client, n: int) -> list[bytes]:
    waited = 0.0
    while client.data.count(b"\x1c\r") < n:
        assert waited < 5, client.data
        await task.deferLater(reactor, 0.01, lambda: None)
        waited += 0.01
    return [f.strip(b"\x0b") for f in client.data.split(b"\x1c\r") if f]


@pytest_twisted.ensureDeferred
async def test_enhanced_mode_commit_then_application_ack(tmp_path, receiver):
    h, ep = await running(relay_config(tmp_path, receiver.port))
    try:
        c = await connect(ep.bound_port)
        c.transport.write(b"\x0b" + adt("ENH-1", msh15="AL", msh16="AL") + b"\x1c\r")
        both = await frames(c, 2)
        c.transport.write(b"\x0b" + adt("ENH-2", msh15="NE", msh16="AL") + b"\x1c\r")
        only_app = (await frames(c, 3))[2:]
        c.transport.write(b"\x0b" + adt("AR-ENH-3", msh15="ER", msh16="NE") + b"\x1c\r")
        error_only = (await frames(c, 4))[3:]
        c.transport.loseConnection()
    finally:
        await h.stop()
    assert b"MSA|CA|ENH-1" in both[0]
    assert b"MSA|AA|ENH-1" in both[1] and b"RECVAPP" in both[1].split(b"|")[2]   # the receiver's own ACK
    assert len(only_app) == 1 and b"MSA|AA|ENH-2" in only_app[0]
    assert len(error_only) == 1 and b"MSA|CR|AR-ENH-3" in error_only[0]


@pytest_twisted.ensureDeferred
async def test_backend_tls_with_client_certificate_to_a_tls_endpoint(tmp_path, receiver):
    """Harmony's mllp backend (TLS, client certificate) -> Harmony's mllp endpoint (TLS, certificate required)."""
    pki = make_pki(tmp_path / "pki")
    secure_port = free_port()
    cfg = write_config(tmp_path / "cfg", MINIMAL_MAIN, {"hl7": f"""
        [pipelines.outer]
        endpoints = ["feed"]
        backends = ["secure_hop"]
        [endpoints.feed]
        service = "mllp"
        [endpoints.feed.options]
        port = 0
        [backends.secure_hop]
        service = "mllp"
        [backends.secure_hop.options]
        host = "127.0.0.1"
        port = {secure_port}
        tls = true
        tls_ca = "{pki['ca']}"
        tls_cert = "{pki['client'][1]}"
        tls_key = "{pki['client'][0]}"
        [pipelines.inner]
        endpoints = ["secure_in"]
        backends = ["ris"]
        [endpoints.secure_in]
        service = "mllp"
        [endpoints.secure_in.options]
        port = {secure_port}
        tls_cert = "{pki['server'][1]}"
        tls_key = "{pki['server'][0]}"
        tls_ca = "{pki['ca']}"
        [backends.ris]
        service = "mllp"
        [backends.ris.options]
        host = "127.0.0.1"
        port = {receiver.port}
        """})
    h = await start_harmony(cfg)
    eps = h.service.runtime.endpoints
    await eps["feed"].listening
    await eps["secure_in"].listening
    try:
        acks = await mllp_send(eps["feed"].bound_port, framed_file(tmp_path / "in.hl7", [adt("TLS-HOP-1")]))
    finally:
        await h.stop()
    assert "MSA|AA|TLS-HOP-1" in acks[0].replace("\n", "\r")
    assert receiver.control_ids() == ["TLS-HOP-1"]


@pytest_twisted.ensureDeferred
async def test_failover_between_receivers_and_tcp_health_checks(tmp_path, receiver):
    down = PortHold()
    cfg = write_config(tmp_path / "cfg", MINIMAL_MAIN, {"hl7": f"""
        [pipelines.hl7]
        endpoints = ["feed"]
        backends = ["ris"]
        [endpoints.feed]
        service = "mllp"
        [endpoints.feed.options]
        port = 0
        [backends.ris]
        service = "mllp"
        targets = ["ris_down", "ris_up"]
        [backends.ris.options]
        retry_delay_secs = 0.01
        [backends.ris.options.health]
        interval_secs = 60
        unhealthy_threshold = 1
        [targets.ris_down]
        host = "127.0.0.1"
        port = {down.port}
        [targets.ris_up]
        host = "127.0.0.1"
        port = {receiver.port}
        """})
    h = await start_harmony(cfg)
    ep = h.service.runtime.endpoints["feed"]
    pool = h.service.runtime.backends["ris"].target_pool
    await ep.listening
    try:
        await pool.monitor.last_run
        health = {t.name: t.healthy for t in pool.targets}
        acks = await mllp_send(ep.bound_port, framed_file(tmp_path / "in.hl7", [adt(f"FO-{i}") for i in range(4)]))
    finally:
        await h.stop()
        down.release()
    assert health == {"ris_down": False, "ris_up": True}
    assert all("MSA|AA|" in a.replace("\n", "\r") for a in acks) and len(acks) == 4
    assert receiver.control_ids() == [f"FO-{i}" for i in range(4)]


def test_bad_options_name_their_keys(tmp_path, capsys):
    cfg = write_config(tmp_path / "cfg", MINIMAL_MAIN, {"hl7": """
        [pipelines.hl7]
        endpoints = ["feed"]
        backends = ["ris"]
        [endpoints.feed]
        service = "mllp"
        [endpoints.feed.options]
        default_charset = "KLINGON"
        allowed_sources = ["not-an-address"]
        [backends.ris]
        service = "mllp"
        [backends.ris.options]
        ack_timeout_secs = 5
        """})
    assert main(["check", "-c", str(cfg)]) == 1
    out = capsys.readouterr()
    text = out.out + out.err
    assert "endpoints.feed" in text and ("default_charset" in text or "allowed_sources" in text)
    assert "backends.ris" in text and "host" in text


@pytest_twisted.ensureDeferred
async def test_reload_keeps_an_unchanged_listener_and_its_connections(tmp_path, receiver):
    cfg = relay_config(tmp_path, receiver.port)
    h, ep = await running(cfg)
    try:
        c = await connect(ep.bound_port)
        c.transport.write(b"\x0b" + adt("RL-1") + b"\x1c\r")
        await frames(c, 1)
        cfg.parent.joinpath("pipelines", "hl7.toml").write_text(
            (cfg.parent / "pipelines" / "hl7.toml").read_text().replace("ack_timeout_secs = 0.5",
                                                                         "ack_timeout_secs = 5"))
        result = await h.service.reload()
        assert result["ok"] and result["changes"]["listeners_restarted"] == []
        assert h.service.runtime.endpoints["feed"] is ep
        assert h.service.runtime.backends["ris"].ack_timeout == 5
        c.transport.write(b"\x0b" + adt("RL-2") + b"\x1c\r")      # same connection, new backend
        acks = await frames(c, 2)
        c.transport.loseConnection()
        other = free_port()
        cfg.parent.joinpath("pipelines", "hl7.toml").write_text(
            (cfg.parent / "pipelines" / "hl7.toml").read_text().replace("port = 0", f"port = {other}", 1))
        result = await h.service.reload()
        new = h.service.runtime.endpoints["feed"]
        new_port, old_port = new.bound_port, ep.bound_port
    finally:
        await h.stop()
    assert b"MSA|AA|RL-2" in acks[1] and receiver.control_ids() == ["RL-1", "RL-2"]
    assert result["ok"] and result["changes"]["listeners_restarted"] == ["feed"]
    assert new is not ep and new_port == other and old_port is None
