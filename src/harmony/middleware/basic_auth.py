"""``basic_auth``: HTTP Basic credentials checked against one configured user.

The comparison is constant-time over the whole ``user:password`` pair so a
timing probe learns neither which half was wrong nor how much of it matched.
The client's ``Authorization`` header is dropped before the request goes on:
the upstream trusts the proxy, not the client's password, unless
``forward_credentials = true`` says otherwise.
"""

from __future__ import annotations

import base64
import binascii
import hmac

from harmony.config.errors import OptionError
from harmony.errors import AuthenticationFailed
from harmony.middleware.base import Middleware


def quoted(value: str) -> str:
    """*value* as the inside of an RFC 9110 quoted-string (challenge parameters)."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


def parse_basic(value: str | None) -> tuple[bytes, bytes] | None:
    """``'Basic dXNlcjpwdw=='`` -> ``(b'user', b'pw')``; None when absent or malformed."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "basic" or not token.strip():
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    if not sep:
        return None
    return user, password


class BasicAuth(Middleware):
    def __init__(self, name, username: str, password: str, *, realm: str = "Harmony",
                 forward_credentials: bool = False):
        super().__init__(name)
        self.username = username
        self.realm = realm
        self.forward_credentials = forward_credentials
        self._expected = username.encode("utf-8") + b":" + password.encode("utf-8")
        self._challenge = f'Basic realm="{quoted(realm)}", charset="UTF-8"'

    @classmethod
    def from_config(cls, name, options, ctx):
        username = options.str("username")
        if not username or ":" in username:
            raise OptionError("username", "must be a non-empty string without ':'")
        if "password" in options and "password_file" in options:
            raise OptionError("password", "give either 'password' or 'password_file', not both")
        if "password" not in options and "password_file" not in options:
            raise OptionError("password", "is required (or 'password_file')")
        password = options.secret("password")
        if not password:
            raise OptionError("password_file" if "password_file" in options else "password", "must not be empty")
        return cls(name, username, password, realm=options.str("realm", "Harmony"),
                   forward_credentials=options.bool("forward_credentials", False))

    def _reject(self, why: str):
        return AuthenticationFailed(why, headers=[("WWW-Authenticate", self._challenge)])

    def on_request(self, request):
        creds = parse_basic(request.header("authorization"))
        if creds is None:
            raise self._reject("Basic credentials are required")
        user, password = creds
        if not hmac.compare_digest(user + b":" + password, self._expected):
            raise self._reject("invalid username or password")
        request.metadata["auth.method"] = "basic"
        request.metadata["auth.sub"] = user.decode("utf-8", "replace")
        if not self.forward_credentials:
            request.headers.removeHeader(b"authorization")
        return request
