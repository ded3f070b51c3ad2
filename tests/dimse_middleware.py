"""A middleware for DIMSE tests: narrows every C-FIND to one patient by editing
the DICOM JSON identifier, as a site policy might."""

from harmony.middleware.base import Middleware


class OnlyPatient(Middleware):
    seen: list = []

    def on_request(self, request):
        OnlyPatient.seen.append(dict(request.metadata))
        if request.metadata.get("protocol") == "dimse" and request.metadata.get("dimse_op") == "C-FIND":
            request.normalized["00100020"] = {"vr": "LO", "Value": ["PAT002"]}
        return request
