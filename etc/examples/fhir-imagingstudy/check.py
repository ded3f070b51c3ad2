#!/usr/bin/env python3
"""Check the response-side spec of this sketch: run it (jolt-py 2.0.0, the
engine harmony.transform wraps) over the sample QIDO-RS study results and
validate the Bundle with fhir.resources' R4B models.

    python etc/examples/fhir-imagingstudy/check.py
"""

import json
import sys
from pathlib import Path

import pyjolt
from fhir.resources.R4B.bundle import Bundle

HERE = Path(__file__).resolve().parent


def main() -> int:
    spec = pyjolt.Chainr.from_spec(json.loads((HERE / "qido_studies_to_imagingstudy_bundle.json").read_text()))
    studies = json.loads((HERE / "sample_qido_studies.json").read_text())
    bundle = spec.apply(studies)
    Bundle.model_validate(bundle)
    first = bundle["entry"][0]["resource"]
    assert bundle["total"] == 2 and first["numberOfSeries"] == 2 and first["numberOfInstances"] == 7
    assert [m["code"] for m in first["modality"]] == ["CT", "SR"] and first["started"] == "2024-01-05"
    assert first["identifier"][0]["value"] == "urn:oid:1.2.826.0.1.3680043.8.498.1"
    empty = spec.apply([])
    Bundle.model_validate(empty)
    assert empty == {"resourceType": "Bundle", "type": "searchset", "total": 0}
    print(json.dumps(bundle, indent=2) if "-v" in sys.argv else "ok: valid R4B searchset Bundles (2 studies, none)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
