"""JMIX (JSON Medical Imaging Exchange) envelopes, usable without the proxy.

Build an envelope from one study's DICOM files, pack it as zip or tar.gz,
unpack untrusted ones safely, and validate them layer by layer::

    from harmony.jmix import BuildOptions, build_envelope, pack_zip, open_envelope

    result = build_envelope(["study/"], workdir, BuildOptions())
    pack_zip(result.root, Path(f"{result.envelope_id}.zip"))
    report = open_envelope(Path("received.zip"), scratch)
    assert report.ok, report.errors

The spec is aurabx/jmix 1.0-beta3; its JSON Schemas are vendored unmodified in
``harmony/jmix/schemas`` (CC BY-ND 4.0).  Where the spec is silent and the
reference libraries disagree, :mod:`harmony.jmix.profiles` fixes the choices.
"""

from harmony.jmix.archive import ArchiveError, Limits, extract, pack, pack_targz, pack_zip
from harmony.jmix.builder import (
                                  AssertionSpec,
                                  BuildError,
                                  BuildOptions,
                                  BuildResult,
                                  Entity,
                                  build_envelope,
                                  read_headers,
)
from harmony.jmix.crypto import CryptoError
from harmony.jmix.dicom import DicomInputError
from harmony.jmix.profiles import PROFILES, get_profile
from harmony.jmix.validate import Report, VerifyOptions, discard, open_envelope, validate

__all__ = ["ArchiveError", "AssertionSpec", "BuildError", "BuildOptions", "BuildResult", "CryptoError",
           "DicomInputError", "Entity", "Limits", "PROFILES", "Report", "VerifyOptions", "build_envelope",
           "discard", "extract", "get_profile", "open_envelope", "pack", "pack_targz", "pack_zip",
           "read_headers", "validate"]
