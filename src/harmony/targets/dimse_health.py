"""DIMSE C-ECHO health check for DIMSE targets (``host``/``port``/``aet``).

One association with one C-ECHO, carried by the reactor
(:mod:`harmony.dicom.ul`): a dead peer costs a socket and a timer, not a
thread, and every timeout of the exchange is the check's own.
"""

from __future__ import annotations

from pynetdicom import build_context
from pynetdicom.sop_class import Verification
from twisted.internet import defer

from harmony.dicom import status as dimse
from harmony.dicom.ul import commands
from harmony.dicom.ul.association import AssociationAborted, AssociationRejected
from harmony.dicom.ul.requestor import RequestorSettings, associate



class EchoFailed(Exception):
    pass


async def echo(reactor, host: str, port: int, called_aet: str, calling_aet: str, timeout: float,
               tls_context=None) -> int:
    """One association with one C-ECHO; returns the DIMSE status or raises EchoFailed."""
    settings = RequestorSettings(local_aet=calling_aet, acse_timeout=timeout, dimse_timeout=timeout,
                                 network_timeout=timeout, connect_timeout=timeout)
    try:
        assoc = await associate(reactor, host, port, settings, called_aet, [build_context(Verification)],
                                tls_context=tls_context)
    except AssociationRejected:
        raise EchoFailed(f"association rejected by {called_aet}") from None
    except Exception:  # noqa: BLE001 - refused, unreachable, timed out, aborted
        raise EchoFailed(f"no association with {called_aet}@{host}:{port}") from None
    try:
        response = await assoc.request(next(iter(assoc.contexts)), {
            "AffectedSOPClassUID": str(Verification), "CommandField": commands.C_ECHO_RQ})
    except (AssociationAborted, StopIteration):
        raise EchoFailed("no C-ECHO response") from None
    finally:
        if assoc.state == "established":
            assoc.release()
    status = response.command.get("Status")
    if status != dimse.SUCCESS:
        raise EchoFailed(f"C-ECHO status 0x{status:04X}" if isinstance(status, int) else "no C-ECHO status")
    return status


class EchoCheck:
    def __init__(self, settings, reactor=None):
        self.settings = settings
        self.reactor = reactor

    def __call__(self, target):
        from twisted.internet import reactor as default_reactor
        s = self.settings
        d = defer.ensureDeferred(echo(self.reactor or default_reactor, target.host, target.port, target.aet,
                                      s.calling_aet, s.timeout_secs))
        return d.addCallback(lambda _: True)
