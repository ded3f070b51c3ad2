"""Each private pynetdicom name in harmony.compat.pynetdicom still exists and works."""

from __future__ import annotations

import pytest
from pynetdicom import AE
from pynetdicom.association import Association

from harmony.compat import pynetdicom as compat


@pytest.mark.parametrize("name", compat.CONFIG_SWITCHES)
def test_every_switch_we_set_exists(name):
    assert hasattr(compat.config, name)


def test_harmony_dicom_net_sets_them():
    import harmony.dicom.net  # noqa: F401 - sets the switches at import

    assert compat.config.LOG_REQUEST_IDENTIFIERS is False  # identifiers are PHI
    assert compat.config.LOG_HANDLER_LEVEL == "none"


def test_set_config_refuses_a_name_pynetdicom_does_not_have():
    with pytest.raises(AttributeError, match="harmony.compat.pynetdicom"):
        compat.set_config(NO_SUCH_SWITCH=True)
    assert not hasattr(compat.config, "NO_SUCH_SWITCH")


def test_the_dul_poll_delay_is_settable():
    dul = Association(AE(), "requestor").dul  # not started: no thread, no socket
    assert compat.set_dul_loop_delay(dul, 0.0002) is True
    assert dul._run_loop_delay == 0.0002
    assert compat.set_dul_loop_delay(None, 0.0002) is False
