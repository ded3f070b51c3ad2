"""The console's configuration page: the running files with secrets redacted,
and ``harmony check`` of an edited copy.

Redaction works on the parsed TOML (tomlkit keeps comments and layout), so
a secret is hidden whatever its quoting; keys that name secrets (``token``,
``password``, ``*_secret`` ...) and passwords inside URLs are replaced,
while ``*_file`` keys - paths, not secrets - stay.  The check runs the real
``harmony check`` in a child process on a copy written next to the running
file (so relative paths resolve the same), and never touches the running
configuration: applying a change is an edit on disk and a reload.
"""

from __future__ import annotations

import os
import re
import secrets
import sys

import tomlkit
from twisted.internet import utils

from harmony.errors import BadRequest

REDACTED = "<redacted>"
_SECRET_KEY = re.compile(r"(token|password|passwd|secret|passphrase|credential|private_key|api_key|"
                         r"auth_header_value)$", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]*)@", re.IGNORECASE)
CHECK_TIMEOUT = 30.0


def secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(key)) and not key.endswith("_file")


def _redact(node):
    if isinstance(node, dict):
        for key in list(node.keys()):
            value = node[key]
            if secret_key(str(key)) and isinstance(value, (str, int)):
                node[key] = REDACTED
            else:
                _redact(value)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            if isinstance(value, str):
                node[i] = _URL_PASSWORD.sub(rf"\g<scheme>\g<user>:{REDACTED}@", value)
            else:
                _redact(value)
    return node


def redact_text(text: str) -> str:
    try:
        doc = tomlkit.parse(text)
    except Exception:  # the running file was valid when loaded; if it changed since, show nothing of it
        return "# (the file no longer parses as TOML; not shown)\n"
    _redact(doc)
    out = tomlkit.dumps(doc)
    return _URL_PASSWORD.sub(rf"\g<scheme>\g<user>:{REDACTED}@", out)


def running(config) -> dict:
    files = []
    for path in config.files:
        try:
            text = redact_text(path.read_text(encoding="utf-8"))
        except OSError as e:
            text = f"# cannot read: {e.strerror}\n"
        files.append({"path": str(path), "text": text})
    return {"path": str(config.path), "files": files}


def unredact(text: str, running_path) -> str:
    """Put the running file's values back where the edited copy still says
    ``<redacted>`` (same table and key), so a check sees the real secrets."""
    if REDACTED not in text:
        return text
    try:
        edited = tomlkit.parse(text)
    except Exception as e:
        raise BadRequest(f"the edited copy is not valid TOML: {e}") from None
    try:
        original = tomlkit.parse(running_path.read_text(encoding="utf-8"))
    except Exception:
        original = tomlkit.document()
    missing = []

    def same_url(value, there) -> bool:
        """*value* is *there* as redact_text shows it (a URL with its password hidden)."""
        return isinstance(value, str) and isinstance(there, str) and REDACTED in value \
            and _URL_PASSWORD.sub(rf"\g<scheme>\g<user>:{REDACTED}@", there) == value

    def walk(node, orig, where):
        if isinstance(node, dict):
            for key in list(node.keys()):
                value, there = node[key], orig.get(key) if isinstance(orig, dict) else None
                if isinstance(value, str) and value == REDACTED:
                    if there is None or there == REDACTED:
                        missing.append(".".join(where + [str(key)]))
                    else:
                        node[key] = there
                elif same_url(value, there):
                    node[key] = there
                else:
                    walk(value, there, where + [str(key)])
        elif isinstance(node, list) and isinstance(orig, list):
            for i, value in enumerate(node):
                there = orig[i] if i < len(orig) else None
                if same_url(value, there):
                    node[i] = there
                else:
                    walk(value, there, where + [str(i)])

    walk(edited, original, [])
    if missing or REDACTED in tomlkit.dumps(edited):
        raise BadRequest("put real values back for " + (", ".join(missing) or f"the {REDACTED} placeholders"))
    return tomlkit.dumps(edited)


async def check(config, text: str) -> dict:
    """Run ``harmony check`` on *text* as if it were the main configuration file."""
    if not text.strip():
        raise BadRequest("send the configuration text to check as the request body")
    text = unredact(text, config.path)
    folder = config.path.parent
    copy = folder / f".harmony-console-check-{secrets.token_hex(6)}.toml"
    try:
        fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        out, err, code = await utils.getProcessOutputAndValue(
            sys.executable, ["-m", "harmony.cli", "check", "-c", str(copy)], env=dict(os.environ), path=str(folder))
    finally:
        try:
            copy.unlink()
        except FileNotFoundError:
            pass
    output = (out + err).decode("utf-8", "replace").replace(str(copy), str(config.path.name) + " (edited copy)")
    return {"ok": code == 0, "exit_code": code, "output": output}
