"""De-identification toolkit: DICOM PS3.15 Annex E on pydicom Datasets and Part-10 files.

Why a toolkit apart from the middleware: the same engine serves the
``deidentify`` middleware (every DIMSE and DICOMweb path), the
``harmony deidentify`` command and the benchmarks, so a file de-identified on
the command line and one forwarded by the proxy come out byte-for-byte alike.

Public API (everything else is internal):

- :class:`ProfileOptions` / :class:`Profile`: the standard's options by name, compiled;
- :class:`Keyring` (+ :func:`read_secret`, :func:`generate_secret_file`) and
  :class:`LookupTable`: keyed pseudonyms and a project's own Patient ID pseudonyms;
- :class:`Deidentifier`: ``dataset(ds)`` for instances, ``identifier(ds)`` for C-FIND answers;
- :class:`PixelPolicy` / :func:`deidentify_file`: burned-in pixel decisions and whole files.
"""

from harmony.deid.files import Outcome, deidentify_file
from harmony.deid.keys import Keyring, LookupTable, generate_secret_file, read_secret
from harmony.deid.pixels import MaskRule, PixelPolicy
from harmony.deid.profile import Change, Deidentifier, Profile, ProfileError, ProfileOptions

__all__ = ["Change", "Deidentifier", "Keyring", "LookupTable", "MaskRule", "Outcome", "PixelPolicy", "Profile",
           "ProfileError", "ProfileOptions", "deidentify_file", "generate_secret_file", "read_secret"]
