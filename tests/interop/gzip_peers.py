"""The compressing upstreams of the gzip interop tests, and the Harmony in
front of them: Orthanc with its own HTTP compression on, nginx with ``gzip
on`` (chunked, keep-alive) in front of Orthanc and of static FHIR answers, and
a Harmony node with a FHIR proxy (rewriting and not), an HTTP passthrough and
two DICOMweb proxies (to Orthanc, to nginx)."""

from __future__ import annotations

import json

from bench.common import Nginx
from tests.dicom_data import make_corpus
from tests.interop.support import Node, web_pipeline
from tests.peers import Orthanc, free_port

#: nginx compresses every JSON-ish answer, however small, and proxies keep-alive.
GZIP = """
    gzip on;
    gzip_min_length 0;
    gzip_proxied any;
    gzip_types application/json application/dicom+json application/fhir+json text/plain;
"""


def fhir_bundle(base: str) -> dict:
    """A searchset as a FHIR server writes it: its own absolute URLs throughout."""
    return {"resourceType": "Bundle", "type": "searchset", "total": 2,
            "link": [{"relation": "self", "url": f"{base}/Patient?family=Interop"},
                     {"relation": "next", "url": f"{base}?_getpages=page2&_getpagesoffset=2"}],
            "entry": [{"fullUrl": f"{base}/Patient/{n}",
                       "resource": {"resourceType": "Patient", "id": str(n),
                                    "name": [{"family": "Interop", "given": [f"Πέτρος{n}"]}]}}
                      for n in (1, 2)]}


def start_upstreams(root):
    """Orthanc (compression on, holding one study) and nginx with gzip in front
    of it (``/dicom-web/``) and of static FHIR answers (``/fhir/``)."""
    orthanc = Orthanc(root / "orthanc", extra_config={"HttpCompressionEnabled": True})
    port = free_port()
    www = root / "www" / "fhir"
    www.mkdir(parents=True)
    base = f"http://127.0.0.1:{port}/fhir"
    (www / "Patient").write_text(json.dumps(fhir_bundle(base)) + " " * 4096)  # worth compressing
    (www / "notes.txt").write_text("interop " * 2000)
    nginx = Nginx(root / "nginx", f"""
        server {{
            listen 127.0.0.1:{port};
            {GZIP}
            location /fhir/ {{ root {root / "www"}; default_type application/fhir+json; }}
            location /dicom-web/ {{
                proxy_pass http://127.0.0.1:{orthanc.http_port};
                proxy_http_version 1.1;
                proxy_set_header Connection "";
                proxy_set_header Accept-Encoding "";
            }}
        }}""", port)
    try:
        orthanc.start()
        corpus = make_corpus(root / "corpus")
        orthanc.upload(i.path for i in corpus if i.patient_id == "PAT002")
        nginx.start()
        yield {"orthanc": orthanc, "nginx": f"http://127.0.0.1:{port}", "fhir_base": base,
               "corpus": [i for i in corpus if i.patient_id == "PAT002"]}
    finally:
        nginx.stop()
        orthanc.stop()


def proxy_toml(upstreams) -> str:
    fhir, orthanc, nginx = upstreams["fhir_base"], upstreams["orthanc"].dicomweb_url, upstreams["nginx"]
    return "".join([
        web_pipeline("fhir", "fhir", "/fhir", {"base_url": fhir}),
        web_pipeline("fhir_raw", "fhir", "/fhir-raw", {"base_url": fhir, "rewrite_urls": False}),
        web_pipeline("pass", "http", "/pass", {"base_url": nginx}),
        web_pipeline("dw_orthanc", "dicomweb", "/dw-orthanc", {"base_url": orthanc}),
        web_pipeline("dw_nginx", "dicomweb", "/dw-nginx", {"base_url": nginx + "/dicom-web"}),
    ])


def start_proxy(folder, upstreams) -> Node:
    return Node(folder, proxy_toml(upstreams)).start()
