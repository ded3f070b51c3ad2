"""Issue 12, defect 8: a QIDO-RS search with no match answered 204 made
Orthanc's DICOMweb client report "Bad file format"; the default is now an
answer it reads (200 with ``[]``), from the archive and through the bridge.
"""

from __future__ import annotations

import pytest

from tests.interop.support import call


@pytest.mark.parametrize("shape", ["archive", "router"])
@pytest.mark.parametrize("path", ["/studies", "/series", "/instances"])
def test_orthanc_qido_without_matches(shape, path, request):
    stack = request.getfixturevalue(shape)
    status, body = call(stack.client.url, "POST", "/dicom-web/servers/harmony/qido",
                        {"Uri": path, "Arguments": {"PatientID": "NOBODY-HERE"}})
    assert (status, body) == (200, []), body
