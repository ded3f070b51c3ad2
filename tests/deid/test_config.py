"""The documented configuration (docs/middleware/deidentify.md) is valid as written, and the options
table builds the de-identifier the middleware and the CLI share."""

import re
import tomllib
from pathlib import Path

import pytest

from harmony.config.errors import OptionError
from harmony.config.options import Options
from harmony.deid import generate_secret_file
from harmony.deid.config import build, pixel_policy

DOC = Path(__file__).resolve().parents[2] / "docs" / "middleware" / "deidentify.md"


def test_documented_example_builds(tmp_path):
    block = re.findall(r"```toml\n(.*?)```", DOC.read_text(), re.S)[0]
    options = tomllib.loads(block)["middleware"]["deid"]["options"]
    generate_secret_file(tmp_path / "deid.key")
    options["secret_file"] = str(tmp_path / "deid.key")
    deid, policy = build(Options(options))
    assert deid.profile.options.retain_long_modified_dates
    assert [r.name for r in policy.rules] == ["acme-us"] and policy.rules[0].rectangles == ((0, 0, 640, 40),)


@pytest.mark.parametrize("pixels, key", [
    ({"suspect": "maybe"}, "suspect"),
    ({"mask_rules": [{"rectangles": [[0, 0, 1]]}]}, "pixels.mask_rules[0].rectangles"),
    ({"mask_rules": [{"rectangles": [[0, 0, 1, 1]], "model": "("}]}, "pixels.mask_rules[0].model"),
    ({"mask_rules": [{"rectangles": [[0, 0, 1, 1]], "colour": "red"}]}, "pixels.mask_rules[0]"),
    ({"suspekt": "forward"}, "pixels"),
])
def test_pixel_policy_errors_name_their_key(pixels, key):
    with pytest.raises(OptionError) as e:
        pixel_policy(pixels)
    assert e.value.key == key
