"""harmony.dicom.ul.tls: TLS options for DICOM associations, proved by handshakes in memory
(tests.memory.tls_handshake) with a throwaway PKI (tests/tls_certs.py)."""

from __future__ import annotations

from harmony.dicom.ul.tls import client_options, server_options
from tests.memory import tls_handshake
from tests.tls_certs import make_pki


def test_a_verified_association_with_client_certificates(tmp_path):
    pki = make_pki(tmp_path)
    (skey, scert), (ckey, ccert) = pki["server"], pki["client"]
    received, lost = tls_handshake(server_options(scert, skey, pki["ca"]),
                                   client_options("127.0.0.1", ccert, ckey, pki["ca"]), b"A-ASSOCIATE-RQ")
    assert received == b"A-ASSOCIATE-RQ" and lost is None


def test_a_server_requiring_client_certificates_refuses_a_client_without_one(tmp_path):
    pki = make_pki(tmp_path)
    skey, scert = pki["server"]
    received, lost = tls_handshake(server_options(scert, skey, pki["ca"]), client_options("127.0.0.1", ca=pki["ca"]))
    assert received == b"" and lost is not None


def test_a_client_refuses_a_server_its_ca_did_not_sign_unless_told_not_to_verify(tmp_path):
    pki, other = make_pki(tmp_path / "a"), make_pki(tmp_path / "b")
    skey, scert = pki["server"]
    received, lost = tls_handshake(server_options(scert, skey), client_options("127.0.0.1", ca=other["ca"]))
    assert received == b"" and lost is not None
    received, lost = tls_handshake(server_options(scert, skey), client_options("127.0.0.1", verify=False))
    assert received == b"hello" and lost is None
