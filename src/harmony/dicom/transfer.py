"""Transfer syntaxes: which ones Harmony accepts and proposes, and what it
sends when a peer refuses an instance's own.

Harmony passes the bytes a modality sent on unchanged whenever it can: a
JPEG-LS CT is forwarded as JPEG-LS, an MPEG-4 video as MPEG-4.  That needs,
per instance, a presentation context for *its* SOP class with *its* transfer
syntax (each context negotiates exactly one syntax).  No single association
can propose every storage class with every syntax (PS3.8 caps a request at 128
contexts), so senders propose the common pairs up front; a pair the pool does not
propose is learned and the instance sent on a fresh association proposing it
(plus the uncompressed fall-backs): see :mod:`harmony.backends.dicom_scu` and
:func:`harmony.dicom.net.requestor_contexts`.

When the peer refuses the stored syntax, the instance is decompressed (pydicom
with the pylibjpeg, -libjpeg, -openjpeg and -rle plug-ins: JPEG baseline,
extended and lossless, JPEG-LS, JPEG 2000, HTJ2K, RLE; and pyjpegls (CharLS),
which pydicom prefers for JPEG-LS: 3-6x faster than libjpeg's JPEG-LS on a
512x512 CT, measured with bench/dicomweb/transcode.py's data) to Explicit VR Little
Endian (pynetdicom re-encodes it as Implicit VR if that is all the peer took);
deflated data is inflated.  Video (MPEG-2/4, HEVC), JPEG 2000 Part 2 and big
endian data that the peer refuses cannot be converted here: that is
:class:`SyntaxRefused`, a failure status naming the syntax, never a silent
loss.  Everything here is blocking: call it from a DIMSE thread.
"""

from __future__ import annotations

import functools
import os
import tempfile

from pydicom import dcmread
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
    MPEGTransferSyntaxes,
    RLELossless,
)
from pynetdicom import build_context

from harmony.dicom import status as dimse

#: High-Throughput JPEG 2000 (lossless, lossless RPCL, lossy): by UID, as
#: pydicom names them differently across 3.x releases.
HTJ2K = [UID("1.2.840.10008.1.2.4.201"), UID("1.2.840.10008.1.2.4.202"), UID("1.2.840.10008.1.2.4.203")]
#: Native (not encapsulated) encodings, most preferred first.
UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian]
#: Every standard compressed (encapsulated) syntax an instance may be stored in.
COMPRESSED = ([UID(t) for t in JPEGTransferSyntaxes] + [UID(t) for t in JPEGLSTransferSyntaxes]
              + [UID(t) for t in JPEG2000TransferSyntaxes if t not in HTJ2K]
              + HTJ2K + [RLELossless] + [UID(t) for t in MPEGTransferSyntaxes])
#: What a storage SCP of Harmony's accepts (and so what a sender may have to send on).
STORAGE = UNCOMPRESSED + COMPRESSED
#: The fall-backs proposed next to a compressed syntax: decompressed data goes in one of these.
FALLBACK = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


class SyntaxRefused(Exception):
    """The peer accepted none of the syntaxes this instance can be sent in."""

    status = dimse.UNABLE_TO_PROCESS_TRANSFER_SYNTAX

    def __init__(self, sop_class: str, syntax: str, accepted):
        self.sop_class, self.syntax = str(sop_class), str(syntax)
        took = ", ".join(name(t) for t in accepted) or "nothing"
        if UID(self.syntax).is_compressed:
            how = "converting it failed" if can_decompress(syntax) else "Harmony has no decoder for it"
        else:
            how = "Harmony does not convert between byte orders"
        super().__init__(f"the peer refused {name(sop_class)} in {name(syntax)} (it accepted {took}) "
                         f"and {how}")
        #: What fits a DIMSE ErrorComment (LO, 64 characters): the syntax UID first.
        self.comment = f"{self.syntax} refused by the peer, not convertible"[:64]


def name(uid) -> str:
    """A UID's registered name (``JPEG-LS Lossless Image Compression``), or the UID."""
    uid = UID(str(uid))
    return uid.name if uid.name and uid.name != str(uid) else str(uid)


@functools.lru_cache(maxsize=None)
def can_decompress(syntax) -> bool:
    """True when pydicom (with the installed plug-ins) decodes pixel data in *syntax*."""
    syntax = UID(str(syntax))
    if not syntax.is_compressed:
        return True  # nothing to decode
    from pydicom.pixels import get_decoder
    try:
        return bool(get_decoder(syntax).is_available)
    except NotImplementedError:
        return False


def contexts_for(sop_class, syntax) -> list:
    """Presentation contexts that let one instance of *sop_class* stored in
    *syntax* go through as stored, or decompressed: one context per syntax, so
    the peer can accept the stored one without that hiding the fall-backs."""
    wanted = list(dict.fromkeys([UID(str(syntax))] + FALLBACK))
    return [build_context(sop_class, [ts]) for ts in wanted]


def explicit_copy(path, folder) -> str:
    """A new file in *folder*: the instance at *path* in Explicit VR Little
    Endian, decompressed if need be, same SOP Instance UID (what WADO-RS answers
    a client that did not ask for ``transfer-syntax=*``); blocking.

    :class:`NotConvertible` names the stored syntax when there is no decoder
    or decoding fails."""
    ds = dcmread(path)
    stored = UID(str(ds.file_meta.TransferSyntaxUID))
    if stored.is_compressed:
        if not can_decompress(stored):
            raise NotConvertible(stored, "Harmony has no decoder for it")
        try:
            ds.decompress(generate_instance_uid=False)  # pydicom would otherwise mint a new SOP Instance UID
        except Exception as e:  # noqa: BLE001 - any decoder failure
            raise NotConvertible(stored, f"decoding failed ({type(e).__name__})") from e
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    os.makedirs(folder, exist_ok=True)
    fd, out = tempfile.mkstemp(prefix="transcoded-", suffix=".dcm", dir=str(folder))
    os.close(fd)
    try:
        ds.save_as(out, enforce_file_format=True)
    except BaseException:
        os.unlink(out)
        raise
    return out


class NotConvertible(Exception):
    """An instance that cannot be given to a client in an uncompressed syntax."""

    def __init__(self, syntax, why: str):
        self.syntax = str(syntax)
        super().__init__(f"the instance is stored as {name(syntax)} ({syntax}) and {why}")


__all__ = ["COMPRESSED", "FALLBACK", "HTJ2K", "NotConvertible", "STORAGE", "SyntaxRefused", "UNCOMPRESSED",
           "can_decompress", "contexts_for", "explicit_copy", "name"]
