"""C-STORE of a Part-10 file over an established association (SCU side).

Used for every instance Harmony sends: C-GET and C-MOVE sub-operations of the
SCP, and the SCU backend's C-STORE.  A file whose transfer syntax the peer
accepted for its SOP class is sent from disk unchanged -- its data set is
read in blocks and fragmented straight into P-DATA PDUs, never decoded.
Otherwise it is decoded on the DICOM thread pool and re-encoded for a syntax
the peer did accept (decompressed first when it only accepted uncompressed
ones); when no accepted context fits, the answer is a failure status, not a
silent drop.

Which syntaxes can be converted, and the status when none can (0xC003 with a
comment naming the syntax), are :mod:`harmony.dicom.transfer`'s rules; this
module applies them to an association.

A C-GET client may prefer a compressed syntax (``getscu +xr``, ``+xt``, ``+xv``):
the acceptor takes its preference when it is one Harmony can also *produce*
(:func:`can_compress`: the lossless RLE, JPEG-LS and JPEG 2000 encoders), so an
instance stored in it goes as stored and any other is compressed losslessly
for it -- never lossy, and never a syntax some instances could not be sent in.
"""

from __future__ import annotations

import functools
import zlib

from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from harmony.dicom import blocking, transfer
from harmony.dicom import status as dimse
from harmony.dicom.ul import commands
from harmony.dicom.ul.association import FileDataset
from harmony.log import get_logger

log = get_logger("harmony.dicom.ul.storage")

#: C-STORE failure when the peer accepted nothing for the SOP class (PS3.4 "refused: SOP class not supported").
SOP_CLASS_NOT_SUPPORTED = dimse.SOP_CLASS_NOT_SUPPORTED
#: The peer refused the stored syntax and it cannot be converted to one it took.
SYNTAX_REFUSED = dimse.UNABLE_TO_PROCESS_TRANSFER_SYNTAX
_UNCOMPRESSED = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))
#: Compressed syntaxes Harmony may produce itself: lossless, with an encoder in pydicom or a plug-in.
_LOSSLESS_ENCODED = (str(RLELossless), str(JPEGLSLossless), str(JPEG2000Lossless))


@functools.lru_cache(maxsize=None)
def can_compress(syntax) -> bool:
    """True when Harmony can encode pixel data losslessly in *syntax* (whatever the source)."""
    syntax = str(syntax)
    if syntax not in _LOSSLESS_ENCODED:
        return False
    from pydicom.pixels import get_encoder
    try:
        return bool(get_encoder(syntax).is_available)
    except (NotImplementedError, ValueError):
        return False


def accepts_as_stored(assoc, sop_class_uid: str, transfer_syntax: str) -> bool:
    return any(str(cx.abstract_syntax) == str(sop_class_uid) and str(cx.transfer_syntax[0]) == str(transfer_syntax)
               for cx in assoc.contexts.values())


def comment_for(status, instance) -> str | None:
    """The ErrorComment for a status :func:`c_store` chose itself."""
    if status == SYNTAX_REFUSED:
        return f"{instance.transfer_syntax_uid} refused by the peer, not convertible"[:64]
    if status == SOP_CLASS_NOT_SUPPORTED:
        return "the peer accepted no context for this SOP class"
    return None


def choose_context(assoc, sop_class_uid: str, transfer_syntax: str):
    """(context id, accepted syntax, exact) for sending an instance of *sop_class_uid*
    (worked out once per association and pair: a C-GET asks 200 times for the same)."""
    key = ("context", sop_class_uid, transfer_syntax)
    known = assoc.memo.get(key)
    if known is None:
        known = assoc.memo[key] = _choose_context(assoc, sop_class_uid, transfer_syntax)
    return known


def _choose_context(assoc, sop_class_uid: str, transfer_syntax: str):
    candidates = [(cid, str(cx.transfer_syntax[0])) for cid, cx in assoc.contexts.items()
                  if str(cx.abstract_syntax) == sop_class_uid]
    for cid, ts in candidates:
        if ts == transfer_syntax:
            return cid, ts, True
    compressed = UID(transfer_syntax).is_compressed if transfer_syntax else False
    for preferred in _UNCOMPRESSED:
        for cid, ts in candidates:
            if ts == preferred:
                return cid, ts, False
    for cid, ts in candidates:
        if can_compress(ts):   # the peer prefers a lossless syntax we can make
            return cid, ts, False
    if candidates and not compressed:
        return candidates[0][0], candidates[0][1], False
    return None, None, False


def transcode(path, target_syntax: str) -> bytes:
    """The data set of *path* encoded in *target_syntax* (decompressed first if needed); blocking."""
    ds = dcmread(path)
    source = UID(ds.file_meta.TransferSyntaxUID)
    target = UID(target_syntax)
    if source.is_compressed and not target.is_compressed:
        ds.decompress(generate_instance_uid=False)
    elif target.is_compressed and target != source:
        if not can_compress(target):
            raise ValueError(f"cannot compress to {target_syntax}")
        # Without pixel data an encapsulated syntax is explicit VR little endian throughout.
        if "PixelData" in ds:
            if source.is_compressed:
                ds.decompress(generate_instance_uid=False)
            ds.compress(target, generate_instance_uid=False)
    out = DicomBytesIO()
    out.is_little_endian = target.is_little_endian
    out.is_implicit_VR = target.is_implicit_VR
    write_dataset(out, ds)
    if target.is_deflated:
        packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        deflated = packer.compress(out.getvalue()) + packer.flush()
        # PS3.5 A.5: an odd-length deflate stream gets a trailing NUL byte.  DCMTK
        # receivers (Orthanc 1.10) refuse an odd one ("Odd Fragment Length").
        return deflated + b"\x00" if len(deflated) % 2 else deflated
    return out.getvalue()


async def c_store(assoc, instance, reactor, *, originator=None, priority: int = 0) -> int:
    """C-STORE *instance* (a :class:`~harmony.dicom.results.DicomInstance`); the peer's status.

    *originator*: ``(AE title, message ID)`` of the C-MOVE this sub-operation serves.
    """
    cid, syntax, exact = choose_context(assoc, instance.sop_class_uid, instance.transfer_syntax_uid)
    if cid is None:
        accepted = [cx.transfer_syntax[0] for cx in assoc.contexts.values()
                    if str(cx.abstract_syntax) == instance.sop_class_uid]
        if not accepted:
            return SOP_CLASS_NOT_SUPPORTED
        log.warn("C-STORE: {why}", why=str(transfer.SyntaxRefused(instance.sop_class_uid,
                                                                   instance.transfer_syntax_uid, accepted)))
        return SYNTAX_REFUSED
    if exact and UID(syntax).is_deflated:
        # Re-deflated (and padded to even length) rather than passed on as stored:
        # a stored deflate stream of odd length was refused by DCMTK receivers.
        exact = False
    if exact:
        # Where the data set starts is read from the file when it is opened to be sent
        # (144 bytes in the page cache: a thread hop would cost more than the read).
        dataset = FileDataset(instance.path, None)
    else:
        try:
            dataset = await blocking.run(reactor, transcode, instance.path, syntax)
        except Exception:  # noqa: BLE001 - no codec, corrupt pixel data, ...
            log.warn("C-STORE: {why}", why=str(transfer.SyntaxRefused(instance.sop_class_uid,
                                                                       instance.transfer_syntax_uid, [syntax])))
            return SYNTAX_REFUSED
    command = {"AffectedSOPClassUID": instance.sop_class_uid, "CommandField": commands.C_STORE_RQ,
               "Priority": priority, "AffectedSOPInstanceUID": instance.sop_instance_uid}
    if originator is not None:
        command["MoveOriginatorApplicationEntityTitle"] = originator[0]
        command["MoveOriginatorMessageID"] = originator[1]
    response = await assoc.request(cid, command, dataset)
    return response.command.get("Status", dimse.STORE_CANNOT_UNDERSTAND)


