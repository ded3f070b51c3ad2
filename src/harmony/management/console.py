"""The operator console's server side: sessions, CSRF, security headers,
the audit log, and the static assets shipped in the wheel.

A browser cannot be given the bearer token safely (script-readable storage
is one XSS away from leaking it), so the console exchanges the token once
for a server-side session behind an ``HttpOnly; SameSite=Strict`` cookie
(``Secure`` over TLS) that expires when idle.  Cookies ride along on
cross-site requests that SameSite does not stop (and on old browsers), so
every state-changing call with a session must also echo the session's CSRF
token in ``X-CSRF-Token``, which only a page of our own origin can read.
A strict Content-Security-Policy (scripts and styles from our origin only,
no inline code, no framing) makes an injected string inert even if some
page were to render one as HTML, which none does.

State (sessions, audit, traffic history) hangs on the HarmonyService, not on
an API object, so a reload that remounts the API keeps operators logged in.
"""

from __future__ import annotations

import collections
import hmac
import json
import mimetypes
import re
import secrets
import time
from importlib import resources
from pathlib import Path

import attr

from harmony import jsonutil
from harmony.envelope import ResponseEnvelope
from harmony.errors import NotFound
from harmony.log import get_logger

log = get_logger("harmony.management.console")

COOKIE = "harmony_console"
IDLE_SECONDS = 30 * 60
MAX_AGE_SECONDS = 12 * 3600
MAX_SESSIONS = 256
AUDIT_KEPT_IN_MEMORY = 5000

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
#: On every management response, API and console alike.
SECURITY_HEADERS = (
    (b"Content-Security-Policy", CSP.encode()),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"X-Frame-Options", b"DENY"),
    (b"Referrer-Policy", b"no-referrer"),
    (b"Cache-Control", b"no-store"),
    (b"Cross-Origin-Opener-Policy", b"same-origin"),
    (b"Cross-Origin-Resource-Policy", b"same-origin"),
)


# ------------------------------------------------------------------ tokens


def bearer_ok(request, token: str | None) -> bool:
    if token is None:
        return False
    value = request.getHeader(b"authorization") or b""
    scheme, _, given = value.partition(b" ")
    return scheme.lower() == b"bearer" and token_matches(given.strip().decode("utf-8", "replace"), token)


def token_matches(given: str, token: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8"))


def token_from_login(body: bytes) -> str:
    """The token from a login body: JSON ``{"token": ..., "operator": ...}``."""
    try:
        doc = jsonutil.loads(body or b"{}")
    except ValueError:
        doc = {}
    return str(doc.get("token", "")) if isinstance(doc, dict) else ""


def operator_from_login(body: bytes) -> str:
    """The self-declared operator name (audit only; the token is shared)."""
    try:
        doc = jsonutil.loads(body or b"{}")
    except ValueError:
        return ""
    name = str(doc.get("operator", "")) if isinstance(doc, dict) else ""
    return re.sub(r"[^\w .@-]", "", name)[:64].strip()


# ------------------------------------------------------------------ sessions


@attr.s(auto_attribs=True)
class Session:
    sid: str
    csrf: str
    who: str
    created: float
    last_seen: float

    def csrf_ok(self, request) -> bool:
        given = (request.getHeader(b"x-csrf-token") or b"").decode("utf-8", "replace")
        return bool(given) and hmac.compare_digest(given.encode(), self.csrf.encode())

    def expires_at(self) -> float:
        return min(self.last_seen + IDLE_SECONDS, self.created + MAX_AGE_SECONDS)

    def describe(self) -> dict:
        return {"who": self.who, "csrf": self.csrf, "expires_at": round(self.expires_at(), 3)}


class SessionStore:
    """Server-side sessions: idle and absolute expiry, bounded in number."""

    def __init__(self, clock=time.time):
        self.clock = clock
        self._sessions: collections.OrderedDict[str, Session] = collections.OrderedDict()

    def create(self, request, client: str, operator: str = "") -> Session:
        now = self.clock()
        self._expire(now)
        while len(self._sessions) >= MAX_SESSIONS:
            self._sessions.popitem(last=False)
        sid = secrets.token_urlsafe(32)
        who = f"{operator or 'operator'} (console session {sid[:6]}, {client})"
        session = Session(sid, secrets.token_urlsafe(32), who, now, now)
        self._sessions[sid] = session
        return session

    def from_request(self, request) -> Session | None:
        sid = request.getCookie(COOKIE.encode())
        if not sid:
            return None
        session = self._sessions.get(sid.decode("ascii", "replace"))
        now = self.clock()
        if session is None or session.expires_at() <= now:
            if session is not None:
                self.drop(session)
            return None
        session.last_seen = now
        self._sessions.move_to_end(session.sid)
        return session

    def drop(self, session: Session) -> None:
        self._sessions.pop(session.sid, None)

    def _expire(self, now):
        for sid in [s.sid for s in self._sessions.values() if s.expires_at() <= now]:
            del self._sessions[sid]

    def __len__(self):
        return len(self._sessions)


def set_cookie(request, session: Session, path: str) -> None:
    flags = f"; Path={path}; HttpOnly; SameSite=Strict; Max-Age={MAX_AGE_SECONDS}"
    if request.isSecure():
        flags += "; Secure"
    request.responseHeaders.addRawHeader(b"set-cookie", f"{COOKIE}={session.sid}{flags}".encode())


def clear_cookie(request, path: str) -> None:
    flags = f"; Path={path}; HttpOnly; SameSite=Strict; Max-Age=0"
    if request.isSecure():
        flags += "; Secure"
    request.responseHeaders.addRawHeader(b"set-cookie", f"{COOKIE}={flags}".encode())


class LoginThrottle:
    """At most ``limit`` failed logins per client address per ``window`` seconds:
    guessing the token from a script gets a 429, and the audit log a bounded
    number of entries, however fast it tries."""

    def __init__(self, limit: int = 10, window: float = 60.0, clock=time.monotonic):
        self.limit, self.window, self.clock = limit, window, clock
        self._failures: dict[str, collections.deque] = {}

    def _recent(self, client: str) -> collections.deque:
        now = self.clock()
        q = self._failures.get(client)
        if q is None:
            if len(self._failures) > 10_000:  # many addresses: forget the quiet ones
                for c in [c for c, f in self._failures.items() if not f or now - f[-1] > self.window]:
                    del self._failures[c]
            q = self._failures[client] = collections.deque(maxlen=self.limit)
        while q and now - q[0] > self.window:
            q.popleft()
        return q

    def blocked(self, client: str) -> bool:
        return len(self._recent(client)) >= self.limit

    def failed(self, client: str) -> None:
        self._recent(client).append(self.clock())


# ------------------------------------------------------------------ audit


class AuditLog:
    """Every operator action: who, what, on what, when, and the answer's status.

    Appended as JSON lines to ``<storage>/management-audit.jsonl`` (one short
    line per action, so it stays on the reactor thread), the newest entries
    kept in memory for the console's list; read back at start-up.
    """

    def __init__(self, path: Path | None, clock=time.time):
        self.path = path
        self.clock = clock
        self.entries: collections.deque = collections.deque(maxlen=AUDIT_KEPT_IN_MEMORY)
        if path is not None and path.exists():
            try:
                with path.open("r", encoding="utf-8") as f:
                    for line in collections.deque(f, maxlen=AUDIT_KEPT_IN_MEMORY):
                        try:
                            self.entries.append(json.loads(line))
                        except ValueError:
                            continue
            except OSError as e:
                log.warn("cannot read the audit log {path}: {error}", path=str(path), error=e.strerror)

    def record(self, who: str, action: str, subject: str, details: dict, status: int) -> dict:
        entry = {"at": round(self.clock(), 3), "who": who, "action": action, "subject": subject,
                 "details": details, "status": status, "ok": 200 <= status < 300}
        self.entries.append(entry)
        log.info("operator action {action} on {subject} by {who}: {status}", action=action, subject=subject,
                 who=who, status=status)
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(entry, separators=(",", ":")) + "\n")
            except OSError as e:
                log.error("cannot append to the audit log {path}: {error}", path=str(self.path), error=e.strerror)
        return entry

    def recent(self, limit: int) -> list[dict]:
        return list(reversed(self.entries))[:limit]


# ------------------------------------------------------------------ state


class ConsoleState:
    def __init__(self, service):
        from harmony.management.traffic import Traffic

        self.sessions = SessionStore()
        self.login_failures = LoginThrottle()
        #: A ``harmony check`` child process is running (one at a time).
        self.checking = False
        self.audit = AuditLog(service.runtime.config.storage_path / "management-audit.jsonl")
        self.traffic = Traffic()


def console_state(service) -> ConsoleState:
    """The service's console state, made on first use."""
    state = getattr(service, "_console_state", None)
    if state is None:
        state = service._console_state = ConsoleState(service)
    return state


# ------------------------------------------------------------------ assets

_ASSET = re.compile(r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*\.(html|js|css|svg|png|txt)$")
_TYPES = {"js": "text/javascript; charset=utf-8", "css": "text/css; charset=utf-8",
          "html": "text/html; charset=utf-8", "svg": "image/svg+xml", "png": "image/png",
          "txt": "text/plain; charset=utf-8"}
_cache: dict[str, bytes] = {}


def asset(name: str) -> ResponseEnvelope:
    """A console asset from the installed package (never a path outside it)."""
    if not _ASSET.match(name):
        raise NotFound(f"no console asset {name[:64]!r}")
    data = _cache.get(name)
    if data is None:
        ref = resources.files("harmony.management").joinpath("console", *name.split("/"))
        try:
            data = ref.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"no console asset {name[:64]!r}") from None
        _cache[name] = data
    ext = name.rsplit(".", 1)[1]
    response = ResponseEnvelope(200, body=data)
    response.headers.setRawHeaders(b"content-type", [(_TYPES.get(ext) or mimetypes.types_map.get("." + ext)
                                                      or "application/octet-stream").encode()])
    return response
