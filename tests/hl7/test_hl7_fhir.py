"""v2 -> JSON -> FHIR and back, with the shipped example (etc/examples/hl7-to-fhir)
as it is, ports aside: python-hl7's ``mllp_send`` feeds ADT and ORU messages,
the FHIR test server gets transaction Bundles (validated by fhir.resources),
and a FHIR Patient PUT over HTTP arrives at python-hl7's MLLP server as ADT^A08."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import pytest_twisted
import treq

from tests.fhir_server import start_fhir_server
from tests.harness import start_harmony
from tests.hl7.peers import Receiver, adt, framed_file, mllp_send, oru

EXAMPLE = Path(__file__).resolve().parents[2] / "etc" / "examples" / "hl7-to-fhir"


@pytest.fixture
def receiver(tmp_path):
    r = Receiver(tmp_path).start()
    yield r
    r.stop()


def example_config(tmp_path, fhir_base, ris_port) -> Path:
    folder = tmp_path / "example"
    shutil.copytree(EXAMPLE, folder)
    main = folder / "harmony.toml"
    main.write_text(main.read_text().replace("bind_port = 8080", "bind_port = 0"))
    v2 = folder / "pipelines" / "v2-to-fhir.toml"
    text = re.sub(r"port = 257[56]", "port = 0", v2.read_text())
    v2.write_text(text.replace("http://127.0.0.1:8081/fhir", fhir_base))
    back = folder / "pipelines" / "fhir-to-v2.toml"
    back.write_text(back.read_text().replace("port = 6661", f"port = {ris_port}"))
    return main


async def started(config):
    h = await start_harmony(config)
    for name in ("adt_feed", "oru_feed"):
        await h.service.runtime.endpoints[name].listening
    return h


def acks_by_control_id(acks):
    out = {}
    for a in acks:
        msa = [line for line in a.split("\n") if line.startswith("MSA")][0].split("|")
        out[msa[2]] = (msa[1], a)
    return out


@pytest_twisted.ensureDeferred
async def test_adt_and_oru_become_fhir_resources(tmp_path, receiver):
    from fhir.resources.R4B.bundle import Bundle

    fhir = start_fhir_server()
    h = await started(example_config(tmp_path, fhir.base, receiver.port))
    eps = h.service.runtime.endpoints
    try:
        adt_acks = await mllp_send(eps["adt_feed"].bound_port, framed_file(
            tmp_path / "adt.hl7", [adt("ADT-1", "A01"), adt("ADT-2", "A08", given="Anne")]))
        oru_acks = await mllp_send(eps["oru_feed"].bound_port, framed_file(tmp_path / "oru.hl7", [oru("ORU-1")]))
    finally:
        await h.stop()
        await fhir.port.stopListening()
    codes = {k: v[0] for k, v in acks_by_control_id(adt_acks + oru_acks).items()}
    assert codes == {"ADT-1": "AA", "ADT-2": "AA", "ORU-1": "AA"}
    posted = [json.loads(r["body"]) for r in fhir.requests if r["method"] == b"POST"]
    assert len(posted) == 3
    for bundle in posted:
        Bundle.model_validate(bundle)  # valid FHIR R4B, as a third-party model reads it
    admit = posted[0]["entry"]
    patient, encounter = admit[0]["resource"], admit[1]["resource"]
    assert patient["resourceType"] == "Patient" and patient["name"][0] == {"family": "Testperson", "given": ["Anna"]}
    assert patient["birthDate"] == "1980-01-01" and patient["gender"] == "female"
    assert patient["identifier"][0]["value"] == "MRN0001"
    assert encounter["resourceType"] == "Encounter" and encounter["status"] == "in-progress"
    assert encounter["class"]["code"] == "IMP" and encounter["subject"]["reference"] == "Patient?identifier=MRN0001"
    assert posted[1]["entry"][0]["resource"]["name"][0]["given"] == ["Anne"]
    assert posted[1]["entry"][1]["resource"]["status"] == "unknown"    # A08: an update says nothing of the status
    results = posted[2]["entry"]
    assert [e["resource"]["resourceType"] for e in results] == ["DiagnosticReport", "Observation", "Observation"]
    assert results[0]["resource"]["status"] == "final"
    assert results[1]["resource"]["valueQuantity"] == {"value": 182.0, "unit": "mg/dL"}
    assert results[2]["resource"]["code"]["coding"][0] == {"code": "2571-8", "display": "Triglyceride",
                                                          "system": "http://loinc.org"}
    stored = {t for (t, _) in fhir.store}
    assert {"Patient", "Encounter", "DiagnosticReport", "Observation"} <= stored


@pytest_twisted.ensureDeferred
async def test_fhir_server_down_is_ae_so_the_sender_tries_again(tmp_path, receiver):
    fhir = start_fhir_server()
    base = fhir.base
    await fhir.port.stopListening()
    h = await started(example_config(tmp_path, base, receiver.port))
    try:
        acks = await mllp_send(h.service.runtime.endpoints["adt_feed"].bound_port,
                               framed_file(tmp_path / "adt.hl7", [adt("DOWN-1")]))
    finally:
        await h.stop()
    code, text = acks_by_control_id(acks)["DOWN-1"]
    assert code == "AE" and "207^Application internal error^HL70357" in text


@pytest_twisted.ensureDeferred
async def test_fhir_patient_becomes_adt_a08_over_mllp(tmp_path, receiver):
    fhir = start_fhir_server()
    h = await started(example_config(tmp_path, fhir.base, receiver.port))
    patient = {"resourceType": "Patient", "identifier": [{"system": "urn:oid:1.2.3", "value": "MRN9"}],
               "name": [{"family": "Testperson|Jr", "given": ["Zoë"]}], "birthDate": "1980-01-02",
               "gender": "female"}
    try:
        r = await treq.put(h.url("/hl7/Patient/1"), json.dumps(patient).encode(),
                           headers={"Content-Type": "application/fhir+json"})
        body = await r.content()
        r2 = await treq.post(h.url("/hl7/Patient"), json.dumps(patient).encode(),
                             headers={"Content-Type": "application/fhir+json"})
        await r2.content()
    finally:
        await h.stop()
        await fhir.port.stopListening()
    assert r.code == 200 and b"MSA|AA|" in body and r2.code == 200
    sent = receiver.messages()
    a08, a04 = sent[0]["text"].split("\r"), sent[1]["text"].split("\r")
    assert a08[0].split("|")[8] == "ADT^A08^ADT_A01" and a04[0].split("|")[8] == "ADT^A04^ADT_A01"
    assert a08[0].split("|")[17] == "UNICODE UTF-8"
    pid = [s for s in a08 if s.startswith("PID")][0].split("|")
    # the field separator in the name is escaped, the non-ASCII given name survives
    assert pid[3] == "MRN9^^^&urn:oid:1.2.3&ISO" and pid[5] == "Testperson\\F\\Jr^Zoë" and pid[7] == "19800102"


@pytest_twisted.ensureDeferred
async def test_latin1_message_becomes_unicode_fhir(tmp_path, receiver):
    """MSH-18 8859/1: the bytes are Latin-1 on the wire, the Patient's name is right in UTF-8 JSON."""
    fhir = start_fhir_server()
    h = await started(example_config(tmp_path, fhir.base, receiver.port))
    raw = adt("L1-1", charset="8859/1", family="Müller", given="Zoë")
    assert "Müller".encode("latin-1") in raw
    try:
        acks = await mllp_send(h.service.runtime.endpoints["adt_feed"].bound_port,
                               framed_file(tmp_path / "adt.hl7", [raw]))
    finally:
        await h.stop()
        await fhir.port.stopListening()
    assert acks_by_control_id(acks)["L1-1"][0] == "AA"
    [post] = [r for r in fhir.requests if r["method"] == b"POST"]
    name = json.loads(post["body"].decode("utf-8"))["entry"][0]["resource"]["name"][0]
    assert name == {"family": "Müller", "given": ["Zoë"]}
