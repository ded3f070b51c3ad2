"""``[management]``: where the management API listens and who may use it.

Secure by default: off unless ``enabled = true``; on 127.0.0.1:9901 unless told
otherwise; and it refuses to start without a bearer token (``token`` or
``token_file``) unless it is bound to loopback *and* ``allow_unauthenticated =
true`` says that is deliberate.  ``create_token_file = true`` writes a random
token to ``token_file`` (mode 0600) when the file does not exist yet, so a
fresh installation is protected without a setup step.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from pathlib import Path

import attr

from harmony.config.errors import ConfigErrors, OptionError, Problem, unknown_key_problems
from harmony.config.options import Options

DEFAULT_PORT = 9901


@attr.s(auto_attribs=True, frozen=True)
class ManagementSettings:
    enabled: bool = False
    #: A Twisted endpoint description of its own listener, or None when mounted on ``network``.
    listen: str | None = None
    network: str | None = None
    base_path: str = "/admin"
    token: str | None = attr.ib(default=None, repr=False)
    allow_unauthenticated: bool = False

    @classmethod
    def from_config(cls, config) -> "ManagementSettings":
        """Validate ``config.management``; raise ConfigErrors naming file and key."""
        source = str(config.path)
        raw = config.management or {}
        o = Options(raw, base_dir=Path(config.base_dir))
        try:
            settings = cls._parse(o, config)
        except OptionError as e:
            raise ConfigErrors([Problem(source, f"management.{e.key}", e.message)]) from None
        unknown = unknown_key_problems(o.raw, o.used, source, "management", refused=True)
        if unknown:
            raise ConfigErrors(unknown)
        return settings

    @classmethod
    def _parse(cls, o: Options, config) -> "ManagementSettings":
        enabled = o.bool("enabled", False)
        base_path = o.str("base_path", "admin").strip("/")
        if not re.fullmatch(r"[A-Za-z0-9._~-]+(/[A-Za-z0-9._~-]+)*", base_path) or ".." in base_path.split("/"):
            raise OptionError("base_path", f"must be a plain path such as 'admin', got {base_path!r}")
        if o.bool("create_token_file", False):
            if "token_file" not in o.raw:
                raise OptionError("create_token_file", "needs token_file: where to keep the generated token")
            create_token_file(o.path("token_file"))
        token = o.secret("token", default=None)
        if token is not None and len(token) < 16:
            raise OptionError("token", "must be at least 16 characters (use a random one)")
        allow = o.bool("allow_unauthenticated", False)
        network = o.str("network", None)
        listen = o.str("listen", None)
        address = o.str("bind_address", "127.0.0.1")
        port = o.port("bind_port", DEFAULT_PORT)
        if network is not None:
            if listen is not None or "bind_port" in o.raw or "bind_address" in o.raw:
                raise OptionError("network", "mounts the API on a network's listener: drop listen/bind_* (or network)")
            net = config.networks.get(network)
            if net is None:
                raise OptionError("network", f"names unknown network {network!r}")
            if not net.listen:
                raise OptionError("network", f"network {network!r} has no HTTP listener")
            where = net.listen
            listen = None
        else:
            if listen is None:
                iface = address.replace(":", "\\:")
                listen = f"tcp:{port}:interface={iface}"
            where = listen
        if enabled and token is None:
            if not allow:
                raise OptionError("token", "is required: the management API will not start without a token "
                                           "(token or token_file; or bind it to loopback and set "
                                           "allow_unauthenticated = true)")
            if not is_loopback(where):
                raise OptionError("allow_unauthenticated", f"is only honoured on loopback; {where!r} is not")
        return cls(enabled=enabled, listen=listen, network=network, base_path="/" + base_path,
                   token=token, allow_unauthenticated=allow)


def check_routes(settings: ManagementSettings, runtime) -> None:
    """When mounted on a network, the API's base path must not shadow (or be shadowed by) a route."""
    if not settings.enabled or settings.network is None:
        return
    for route in runtime.routes.get(settings.network, []):
        if route.prefix == settings.base_path:
            raise ConfigErrors([Problem(str(runtime.config.path), "management.base_path",
                                        f"{settings.base_path!r} is also the prefix of endpoint {route.endpoint.name!r} "
                                        f"on network {settings.network!r}")])


def is_loopback(description: str) -> bool:
    """Whether a Twisted server endpoint description only accepts local connections."""
    kind = description.split(":", 1)[0]
    if kind == "unix":
        return True
    if kind not in ("tcp", "tcp6", "ssl"):
        return False  # systemd sockets etc.: cannot tell, so assume not
    m = re.search(r"(?:^|:)interface=((?:\\:|[^:])+)", description)
    if not m:
        return False  # all interfaces
    try:
        return ipaddress.ip_address(m.group(1).replace("\\:", ":")).is_loopback
    except ValueError:
        return m.group(1) == "localhost"


def create_token_file(path: Path) -> bool:
    """Write a random token to *path* unless it exists; only its owner may read it.

    Created with ``O_EXCL`` and mode 0600 (its folder 0700 when made here), so
    the token is never readable by anyone else, not even for a moment.
    Returns whether a token was written.
    """
    if path.exists():
        return False
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False  # another process made it first: use theirs
    except OSError as e:
        raise OptionError("token_file", f"cannot create {path}: {e.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    return True
