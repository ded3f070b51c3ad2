"""harmony.backends.target_tls: per-target trust and client certificates for https upstreams,
proved by handshakes in memory (tests.memory.tls_handshake); configuration errors name the key."""

from __future__ import annotations

import pytest

from harmony.backends.target_tls import PerTargetTLSPolicy, client_options
from harmony.config.errors import ConfigErrors
from harmony.dicom.ul.tls import server_options
from harmony.targets.target import Target
from tests.memory import tls_handshake
from tests.tls_certs import make_pki


def _target(tmp_path, url="https://127.0.0.1:8443", **options):
    return Target("pacs", url=url, options=options, source=str(tmp_path / "harmony.toml"))


def test_a_pinned_ca_and_a_client_certificate(tmp_path):
    pki = make_pki(tmp_path)
    skey, scert = pki["server"]  # the client's certificate and key are read from the target's files
    target = _target(tmp_path, tls_ca_file="ca.crt", tls_cert_file="client.crt", tls_key_file="client.key")
    policy = PerTargetTLSPolicy([target])
    creator = policy.creatorForNetloc(b"127.0.0.1", 8443)
    received, lost = tls_handshake(server_options(scert, skey, pki["ca"]), creator)
    assert received == b"hello" and lost is None
    # another host keeps the default, browser-like policy (which does not trust the test CA)
    assert policy.creatorForNetloc(b"elsewhere.test", 443) is not creator


def test_a_server_outside_the_pinned_ca_is_refused(tmp_path):
    pki, other = make_pki(tmp_path / "ours"), make_pki(tmp_path / "theirs")
    skey, scert = other["server"]
    target = _target(tmp_path / "ours", tls_ca_file="ca.crt")
    received, lost = tls_handshake(server_options(scert, skey), client_options(target))
    assert received == b"" and lost is not None
    assert pki["ca"].exists()


def test_no_tls_keys_no_options(tmp_path):
    assert client_options(_target(tmp_path)) is None


@pytest.mark.parametrize("url, options, key, message", [
    ("http://127.0.0.1:8080", {"tls_ca_file": "ca.crt"}, "tls_ca_file", "only applies to https"),
    ("https://x.test", {"tls_ca_file": "missing.crt"}, "tls_ca_file", "cannot read"),
    ("https://x.test", {"tls_key_file": "client.key"}, "tls_key_file", "needs tls_cert_file"),
    ("https://x.test", {"tls_ca_file": "client.key"}, "tls_ca_file", "not a PEM certificate"),
])
def test_configuration_errors_name_the_targets_key(tmp_path, url, options, key, message):
    make_pki(tmp_path)
    with pytest.raises(ConfigErrors) as e:
        client_options(_target(tmp_path, url, **options))
    assert f"[targets.pacs.{key}]" in e.value.render() and message in e.value.render()
