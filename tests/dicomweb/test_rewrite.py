"""harmony.dicomweb.rewrite: an upstream's own URLs in DICOM JSON point at the proxy instead."""

from __future__ import annotations

from harmony.dicomweb.rewrite import UrlRewriter

REWRITER = UrlRewriter("http://pacs:8042/dicom-web", "https://harmony.test/dicomweb/")


def test_urls_under_the_upstream_base_move_whatever_their_host():
    assert REWRITER.url("http://pacs:8042/dicom-web/studies/1?x=2") == "https://harmony.test/dicomweb/studies/1?x=2"
    assert REWRITER.url("http://127.0.0.1/dicom-web/studies/1") == "https://harmony.test/dicomweb/studies/1"
    assert REWRITER.url("http://pacs:8042/other/studies/1") == "http://pacs:8042/other/studies/1"
    assert REWRITER.url("http://pacs:8042/dicom-webx/1") == "http://pacs:8042/dicom-webx/1"  # segment boundary
    assert REWRITER.url("urn:oid:1.2.3") == "urn:oid:1.2.3" and REWRITER.url(42) == 42


def test_retrieve_urls_and_bulk_data_anywhere_in_the_document():
    doc = [{"00081190": {"vr": "UR", "Value": ["http://pacs:8042/dicom-web/studies/1"]},
            "7FE00010": {"vr": "OB", "BulkDataURI": "http://pacs:8042/dicom-web/studies/1/bulk/7FE00010"},
            "00081199": {"vr": "SQ", "Value": [
                {"00081190": {"vr": "UR", "Value": ["http://pacs:8042/dicom-web/studies/1/series/2"]}}]},
            "00100010": {"vr": "PN", "Value": [{"Alphabetic": "http://pacs:8042/dicom-web/not-a-url-field"}]}}]
    out = REWRITER.dicom_json(doc)[0]
    assert out["00081190"]["Value"] == ["https://harmony.test/dicomweb/studies/1"]
    assert out["7FE00010"]["BulkDataURI"] == "https://harmony.test/dicomweb/studies/1/bulk/7FE00010"
    assert out["00081199"]["Value"][0]["00081190"]["Value"] == ["https://harmony.test/dicomweb/studies/1/series/2"]
    assert out["00100010"]["Value"][0]["Alphabetic"].startswith("http://pacs")  # only UR values are URLs
