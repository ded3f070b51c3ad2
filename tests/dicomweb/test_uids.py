"""harmony.dicomweb.uids: UIDs and AE titles from URLs are checked before they reach a path or a PACS."""

from __future__ import annotations

import pytest

from harmony.dicomweb.uids import check_aet, check_uid
from harmony.errors import BadRequest


def test_good_uids_and_aets_pass_unchanged():
    assert check_uid("1.2.840.10008.5.1.4.1.1.2") == "1.2.840.10008.5.1.4.1.1.2"
    assert check_uid("1.2.03.4") == "1.2.03.4"  # leading zeros: accepted on input (real modalities send them)
    assert check_aet("PACS_1-a.b") == "PACS_1-a.b"


@pytest.mark.parametrize("value", ["..", "1.2/../3", "1.2%2F3", "1..2", "1.2.", "a.b", "", "1" * 65, "1\\2"])
def test_bad_uids_are_a_400(value):
    with pytest.raises(BadRequest, match="StudyInstanceUID"):
        check_uid(value, "StudyInstanceUID")


@pytest.mark.parametrize("value", ["", "...", "A" * 17, "WITH SPACE", "A\\B", "A/B"])
def test_bad_aets_are_a_400(value):
    with pytest.raises(BadRequest):
        check_aet(value)
