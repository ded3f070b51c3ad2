"""Test backends for the DIMSE endpoint: results on cue, for deterministic
cancellation tests (a fake of a slow PACS, because a real one answers too fast
to cancel reliably)."""

from pathlib import Path

from pydicom.dataset import Dataset
from twisted.internet import defer

from harmony.backends.base import Backend
from harmony.dicom.files import read_instance
from harmony.dicom.results import DicomInstance, ResultStream
from harmony.envelope import ResponseEnvelope


class OneThenWait(Backend):
    """Gives one result, then nothing until the consumer cancels.

    C-FIND: one match.  C-GET/C-MOVE: a copy of the file at ``options.file``
    (owned, so the endpoint must release it), announcing 5 sub-operations.
    """

    cancelled: list = []

    def __init__(self, name, file):
        super().__init__(name)
        self.file = file

    @classmethod
    def from_config(cls, name, options, ctx):
        return cls(name, options.path("file", None))

    def send(self, request):
        stream = ResultStream()

        def on_cancel():
            OneThenWait.cancelled.append(request.metadata["dimse_op"])
            stream.finish(0xFE00)
        stream.on_cancel = on_cancel
        if request.metadata["dimse_op"] == "C-FIND":
            ds = Dataset()
            ds.QueryRetrieveLevel = "STUDY"
            ds.PatientID = "PAT-ONE"
            stream.put(ds)
        else:
            copy = Path(str(self.file) + ".copy")
            copy.write_bytes(Path(self.file).read_bytes())
            stream.set_counts(4, 1)
            stream.put(read_instance(copy, owned=True))
        response = ResponseEnvelope()
        response.state.dicom_results = stream
        return defer.succeed(response)


__all__ = ["OneThenWait", "DicomInstance"]
