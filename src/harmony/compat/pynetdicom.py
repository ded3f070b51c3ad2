"""pynetdicom's private names Harmony relies on, and why each one.

setup.cfg bounds pynetdicom (``>=3.0,<4``); tests/compat/test_pynetdicom.py checks each
name below against the installed release.
"""

from __future__ import annotations

# pynetdicom's module-level switches (there is no public settings API): chunked C-STORE
# data sets to and from files, identifiers (PHI) kept out of its logs, and its per-PDU
# debug formatting turned off on the hot path.
from pynetdicom import _config as config

#: The switches harmony.dicom.net sets; each must exist, or setting it would silently
#: create a new attribute that pynetdicom never reads.
CONFIG_SWITCHES = ("STORE_RECV_CHUNKED_DATASET", "STORE_SEND_CHUNKED_DATASET", "LOG_REQUEST_IDENTIFIERS",
                   "LOG_RESPONSE_IDENTIFIERS", "LOG_HANDLER_LEVEL")


def set_config(**switches) -> None:
    """Set pynetdicom's module-level switches, refusing a name it does not have."""
    for name, value in switches.items():
        if not hasattr(config, name):
            raise AttributeError(f"pynetdicom._config.{name} is gone: see harmony.compat.pynetdicom")
        setattr(config, name, value)


def set_dul_loop_delay(dul, delay: float) -> bool:
    """How long pynetdicom's DUL thread sleeps between polls (``_run_loop_delay``);
    False when this release has no such knob (then nothing is changed)."""
    if dul is None or not hasattr(dul, "_run_loop_delay"):
        return False
    dul._run_loop_delay = delay
    return True
