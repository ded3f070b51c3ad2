"""DIMSE C-ECHO health check for DIMSE targets (``host``/``port``/``aet``).

pynetdicom blocks, so each echo runs in the reactor's thread pool; its own
timeouts are set to the check's so a dead peer cannot hold a thread longer
than one check.  Kept apart so HTTP-only configs never import pynetdicom.
"""

from __future__ import annotations

from twisted.internet.threads import deferToThread

from harmony.dicom import status as dimse


class EchoFailed(Exception):
    pass


def echo(host: str, port: int, called_aet: str, calling_aet: str, timeout: float) -> int:
    """One association with one C-ECHO; returns the DIMSE status or raises EchoFailed."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    assoc = ae.associate(host, port, ae_title=called_aet)
    if not assoc.is_established:
        if assoc.is_rejected:
            raise EchoFailed(f"association rejected by {called_aet}")
        raise EchoFailed(f"no association with {called_aet}@{host}:{port}")
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if not status or "Status" not in status:
        raise EchoFailed("no C-ECHO response")
    if status.Status != dimse.SUCCESS:
        raise EchoFailed(f"C-ECHO status 0x{status.Status:04X}")
    return status.Status


class EchoCheck:
    def __init__(self, settings):
        self.settings = settings

    def __call__(self, target):
        s = self.settings
        d = deferToThread(echo, target.host, target.port, target.aet, s.calling_aet, s.timeout_secs)
        return d.addCallback(lambda _: True)
