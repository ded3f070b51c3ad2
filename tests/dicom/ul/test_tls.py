"""harmony.dicom.ul.tls: TLS options for DICOM associations, proved by handshakes in memory
(tests.memory.tls_handshake) with a throwaway PKI (tests/tls_certs.py), and an association's
end over TLS (two of Harmony's associations joined by twisted.test.iosim)."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim

from harmony.dicom.ul.association import ESTABLISHED, Association
from harmony.dicom.ul.requestor import RequestorSettings, request_primitive
from harmony.dicom.ul.tls import client_options, server_options
from tests.dicom.ul.memory import CONTEXTS, EchoStoreHandler, acceptor
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


def test_a_release_over_tls_ends_with_close_notify_not_the_grace_cut(tmp_path):
    """Harmony's associations on both ends of a TLS connection: after A-RELEASE-RP the
    requestor closes (close_notify) and the acceptor answers it, so the connection ends
    at once.  While an association's push producer stayed registered, TLS held its
    close_notify back and both sides waited for the grace period's cut (a reset)."""
    pki = make_pki(tmp_path)
    (skey, scert), (ckey, ccert) = pki["server"], pki["client"]
    clock, factory = acceptor()
    client = Association(RequestorSettings(local_aet="SCU"), EchoStoreHandler(), clock,
                         requestor=request_primitive("SCU", "HARMONY", CONTEXTS))
    server_side = TLSMemoryBIOFactory(server_options(scert, skey, pki["ca"]), False, factory, clock=clock)
    client_side = TLSMemoryBIOFactory(client_options("127.0.0.1", ccert, ckey, pki["ca"]), True,
                                      Factory.forProtocol(lambda: client), clock=clock)
    server = server_side.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    wrapped_client = client_side.buildProtocol(None)
    pump = iosim.connect(server, iosim.makeFakeServer(server), wrapped_client, iosim.makeFakeClient(wrapped_client),
                         greet=False, clock=clock)
    pump.flush()
    assert client.state == ESTABLISHED and factory.settings.connections == 1
    released = client.release()
    pump.flush()
    assert released.called and client.closed.called
    assert factory.settings.connections == 0           # the listener's connection is gone, not waiting
