"""harmony.management.configview: the console shows the running files with every secret redacted,
and an edited copy gets its secrets back only where it still says <redacted>."""

from __future__ import annotations

import types

import pytest

from harmony.errors import BadRequest
from harmony.management.configview import REDACTED, redact_text, running, secret_key, unredact

RUNNING = """\
# the lab's proxy
[management]
token = "admin-token-0123456789"
token_file = "/etc/harmony/admin.token"

[backends.pacs.options]
base_url = "https://svc:hunter2@pacs.test/dicom-web"
password = 'single-quoted'
mirrors = ["https://u:pw@mirror.test/x"]
"""


def test_secrets_and_url_passwords_are_redacted_and_comments_kept():
    text = redact_text(RUNNING)
    for secret in ("admin-token-0123456789", "hunter2", "single-quoted", ":pw@"):
        assert secret not in text
    assert "# the lab's proxy" in text and "/etc/harmony/admin.token" in text  # a *_file key is a path
    assert f"https://svc:{REDACTED}@pacs.test/dicom-web" in text
    assert redact_text("[broken").startswith("# (the file no longer parses")


def test_secret_key_names():
    assert secret_key("hs256_secret") and secret_key("auth_header_value") and secret_key("Password")
    assert not secret_key("token_file") and not secret_key("tokenizer_mode")


def test_running_lists_every_file(tmp_path):
    main = tmp_path / "harmony.toml"
    main.write_text(RUNNING)
    config = types.SimpleNamespace(path=main, files=[main, tmp_path / "gone.toml"])
    view = running(config)
    assert view["path"] == str(main) and REDACTED in view["files"][0]["text"]
    assert view["files"][1]["text"].startswith("# cannot read")


def test_an_edited_copy_gets_the_running_secrets_back(tmp_path):
    main = tmp_path / "harmony.toml"
    main.write_text(RUNNING)
    edited = redact_text(RUNNING).replace("# the lab's proxy", "# edited")
    restored = unredact(edited, main)
    assert 'token = "admin-token-0123456789"' in restored and "# edited" in restored
    assert "https://svc:hunter2@pacs.test/dicom-web" in restored  # a URL left as shown gets its password back
    assert "https://u:pw@mirror.test/x" in restored
    assert unredact("no placeholders", main) == "no placeholders"


def test_a_placeholder_with_nothing_behind_it_is_refused(tmp_path):
    main = tmp_path / "harmony.toml"
    main.write_text(RUNNING)
    with pytest.raises(BadRequest, match="new_table.password"):
        unredact(f'[new_table]\npassword = "{REDACTED}"\n', main)
    moved = redact_text(RUNNING).replace("pacs.test", "other-pacs.test")  # a changed URL needs its password typed
    with pytest.raises(BadRequest, match="placeholders"):
        unredact(moved, main)
    with pytest.raises(BadRequest, match="not valid TOML"):
        unredact(f"[broken {REDACTED}", main)
