"""The real peers the suite depends on start and hold the synthetic corpus."""

import subprocess

from tests.peers import DCMTK, Dcmqrscp, peer_env


def test_orthanc_holds_corpus(orthanc, corpus):
    # Other tests may store extra studies of their own in the shared Orthanc;
    # the corpus itself must all be there.
    assert len(corpus) == 22
    found = {orthanc.rest("GET", f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.instance_ids()}
    assert {i.sop_uid for i in corpus} <= found


def test_dcmtk_echo_against_orthanc(orthanc):
    r = subprocess.run([DCMTK["echoscu"], "-aec", orthanc.aet, "127.0.0.1", str(orthanc.dicom_port)],
                       capture_output=True, env=peer_env())
    assert r.returncode == 0, r.stderr


def test_dcmqrscp_answers_find(tmp_path, corpus):
    server = Dcmqrscp(tmp_path).start(i.path for i in corpus[:3])
    try:
        r = subprocess.run([DCMTK["findscu"], "-v", "-S", "-aec", server.aet, "-k", "QueryRetrieveLevel=STUDY",
                            "-k", "StudyInstanceUID", "127.0.0.1", str(server.port)],
                           capture_output=True, env=peer_env())
        assert r.returncode == 0, r.stderr
        assert corpus[0].study_uid.encode() in r.stderr
    finally:
        server.stop()
