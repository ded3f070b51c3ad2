"""harmony.dicom.ul.proposal: real clients' A-ASSOCIATE-RQs decoded as pynetdicom decodes
them, and requests that differ only in their AE titles negotiated once.

The requests are DCMTK's own (storescu, getscu with its role selections, findscu,
echoscu, storescu with user identity), caught on a plain socket: the reference is
pynetdicom's decode of the same bytes, which the acceptor used until session 16.
"""

from __future__ import annotations

import pytest
from pynetdicom import pdu as pn_pdu
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation, UserIdentityNegotiation

from harmony.dicom.ul import pdu
from harmony.dicom.ul.association import ESTABLISHED
from harmony.dicom.ul.proposal import Proposal, decode_associate_rq
from tests.dicom.ul.memory import acceptor, connect
from tests.dicom_data import make_instance, save
from tests.peers import dcmtk_association_request


def caught_request(tool: str, *args: str, files: tuple[str, ...] = ()) -> bytes:
    """The body of the A-ASSOCIATE-RQ DCMTK's *tool* sends."""
    return dcmtk_association_request(tool, *args, files=files)[6:]


def pynetdicom_decode(body: bytes):
    rq = pn_pdu.A_ASSOCIATE_RQ()
    rq.decode(pdu.header(pdu.A_ASSOCIATE_RQ, len(body)) + body)
    return rq.to_primitive()


@pytest.fixture(scope="module")
def instance_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("proposal") / "ct.dcm"
    save(make_instance(), path)
    return str(path)


@pytest.fixture(scope="module")
def requests(instance_file):
    return {
        "storescu": caught_request("storescu", files=(instance_file,)),
        "getscu": caught_request("getscu", "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=1.2.3"),
        "findscu": caught_request("findscu", "-S", "-k", "QueryRetrieveLevel=STUDY"),
        "echoscu": caught_request("echoscu"),
        "storescu --user": caught_request("storescu", "--user", "tech", "--password", "secret",
                                          files=(instance_file,)),
    }


@pytest.mark.parametrize("tool", ["storescu", "getscu", "findscu", "echoscu", "storescu --user"])
def test_a_real_clients_request_decodes_as_pynetdicom_decodes_it(requests, tool):
    body = requests[tool]
    decode_associate_rq.cache_clear()
    ours, theirs = decode_associate_rq(body).primitive, pynetdicom_decode(body)
    assert ours.calling_ae_title == theirs.calling_ae_title == "CLIENT"
    assert ours.called_ae_title == theirs.called_ae_title == "HARMONY"
    assert ours.application_context_name == theirs.application_context_name
    # PresentationContext compares every attribute: ID, abstract syntax, transfer syntaxes, roles.
    assert ours.presentation_context_definition_list == theirs.presentation_context_definition_list
    assert len(ours.presentation_context_definition_list) >= 1
    assert [type(item) for item in ours.user_information] == [type(item) for item in theirs.user_information]
    assert [vars(item) for item in ours.user_information] == [vars(item) for item in theirs.user_information]
    for mine, reference in zip(ours.presentation_context_definition_list, theirs.presentation_context_definition_list,
                               strict=True):
        assert type(mine.abstract_syntax) is type(reference.abstract_syntax)
        assert all(type(a) is type(b) for a, b in zip(mine.transfer_syntax, reference.transfer_syntax, strict=True))


def test_the_requests_carry_what_the_comparison_is_about(requests):
    """The parametrised comparison above covers many contexts, role selections and user identity."""
    assert len(decode_associate_rq(requests["storescu"]).primitive.presentation_context_definition_list) > 100
    assert any(isinstance(item, SCP_SCU_RoleSelectionNegotiation)
               for item in decode_associate_rq(requests["getscu"]).primitive.user_information)
    identity = [item for item in decode_associate_rq(requests["storescu --user"]).primitive.user_information
                if isinstance(item, UserIdentityNegotiation)]
    assert identity and identity[0].primary_field == b"tech"


def with_ae_titles(body: bytes, called: bytes, calling: bytes) -> bytes:
    return body[:4] + called.ljust(16) + calling.ljust(16) + body[36:]


def test_requests_differing_only_in_ae_titles_share_one_proposal(requests):
    body = requests["storescu"]
    first = decode_associate_rq(with_ae_titles(body, b"HARMONY", b"CT_ROOM_1"))
    second = decode_associate_rq(with_ae_titles(body, b"HARMONY", b"MR_ROOM_2"))
    assert isinstance(first, Proposal)
    assert first.primitive.calling_ae_title == "CT_ROOM_1" and second.primitive.calling_ae_title == "MR_ROOM_2"
    assert first.key == second.key
    assert first.primitive.presentation_context_definition_list == second.primitive.presentation_context_definition_list
    assert first.ae_fields != second.ae_fields and first.ae_fields[16:] == b"CT_ROOM_1".ljust(16)
    # Other contexts are another proposal.
    assert decode_associate_rq(requests["findscu"]).key != first.key


def test_modalities_with_their_own_ae_titles_are_negotiated_once_and_answered_with_their_own(requests):
    """Sixty modalities sending one proposal: one negotiation and one A-ASSOCIATE-AC made, each
    answer echoing its request's AE title fields (PS3.8 Table 9-17).  Keyed by the whole
    request, every modality past the cache's 32 was negotiated again, on the reactor."""
    clock, factory = acceptor(require_called_aet=False)
    settings = factory.settings
    template = requests["storescu"]
    for n in range(60):
        calling = f"MODALITY_{n}".encode()
        body = with_ae_titles(template, b"HARMONY", calling)
        assoc, transport = connect(factory, port=41000 + n)
        assoc.dataReceived(pdu.header(pdu.A_ASSOCIATE_RQ, len(body)) + body)
        assert assoc.state == ESTABLISHED
        answer = transport.value()
        assert answer[0] == pdu.A_ASSOCIATE_AC
        assert answer[10:42] == body[4:36]
        ac = pn_pdu.A_ASSOCIATE_AC()
        ac.decode(answer)
        assert ac.to_primitive().calling_ae_title == calling.decode()
        assert assoc.calling_aet == calling.decode()
        assoc.abort()
    assert len(settings.negotiated._items) == 1
    assert len(settings.accept_pdus._items) == 1


@pytest.mark.parametrize("damage, why", [
    (lambda body: body[:60], "shorter than its fixed fields"),
    (lambda body: body + b"\x20\x00\xff\xff\x01", "an item longer than what holds it"),
    (lambda body: body + b"\x20\x00\x00\x02\x01\x00", "a context item without its ID"),
])
def test_a_malformed_request_is_refused(requests, damage, why):
    with pytest.raises(ValueError):
        decode_associate_rq(damage(requests["echoscu"]))


def context_item(context_id: int, abstract: bytes, *syntaxes: bytes, sub_type: int = 0x40) -> bytes:
    subs = pdu_item(0x30, abstract) + b"".join(pdu_item(sub_type, s) for s in syntaxes)
    return pdu_item(0x20, bytes([context_id, 0, 0, 0]) + subs)


def pdu_item(item_type: int, value: bytes) -> bytes:
    return bytes([item_type, 0]) + len(value).to_bytes(2, "big") + value


@pytest.mark.parametrize("item", [
    context_item(2, b"1.2.840.10008.1.1", b"1.2.840.10008.1.2"),                 # an even context ID
    context_item(1, b"1.2.840.10008.1.1", b"1." + b"2" * 70),                    # a UID over 64 characters
    context_item(1, b"1.2.840.10008.1.1", b"1.2.840.10008.1.2", sub_type=0x50),  # not a syntax sub-item
], ids=["even id", "long uid", "foreign sub-item"])
def test_a_request_pynetdicom_refuses_is_refused_too(requests, item):
    body = requests["echoscu"] + item
    with pytest.raises(Exception):   # noqa: B017 - pynetdicom raises assorted errors; the caller aborts on any
        pynetdicom_decode(body)
    with pytest.raises(ValueError):
        decode_associate_rq(body)


def test_a_nul_padded_uid_and_a_repeated_syntax_read_as_pynetdicom_reads_them(requests):
    body = requests["echoscu"] + context_item(3, b"1.2.840.10008.5.1.4.1.1.2\x00", b"1.2.840.10008.1.2\x00",
                                               b"1.2.840.10008.1.2.1", b"1.2.840.10008.1.2")
    ours = decode_associate_rq(body).primitive.presentation_context_definition_list
    assert ours == pynetdicom_decode(body).presentation_context_definition_list
    assert [str(ts) for ts in ours[-1].transfer_syntax] == ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"]
