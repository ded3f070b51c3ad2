"""A JWKS (RFC 7517 key set) fetched over HTTP and cached, for ``jwt_auth``.

Fetching uses treq, so the reactor never blocks on an identity provider.  Keys
are cached for ``cache_secs``; a token naming a ``kid`` the cache does not
know triggers one refresh (key rotation), but at most once per
``min_refresh_secs`` - otherwise anyone could make the proxy hammer the
identity provider by sending tokens with random ``kid``s.  Concurrent
lookups share one in-flight fetch.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

import treq
from jwt import PyJWK
from jwt.exceptions import PyJWTError
from twisted.internet import defer

from harmony import jsonutil
from harmony.config.errors import OptionError
from harmony.log import get_logger

log = get_logger("harmony.middleware.jwks")

#: JWK ``kty`` each pinned algorithm family needs.  Symmetric (``oct``) keys in
#: a published key set are never used: that is how key confusion starts.
KTY_FOR_ALG = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}
MAX_JWKS_BYTES = 1024 * 1024


class JwksUnavailable(Exception):
    """The key set could not be fetched or parsed (the token is not at fault)."""


def check_jwks_url(url: str, key: str = "jwks_url") -> str:
    """https, or http only to a loopback host: keys fetched in clear text from
    elsewhere could be swapped by anyone on the path."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise OptionError(key, f"must be an absolute https URL, got {url!r}")
    if parts.scheme == "http":
        host = parts.hostname
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise OptionError(key, "must use https (plain http is accepted for loopback hosts only)")
    return url


def parse_jwks(document, algorithm: str) -> dict:
    """Usable keys of a JWKS document for *algorithm*, as ``{kid: key}``.

    Keys for other algorithms, other uses (``use = "enc"``) or other key types
    are skipped rather than failing the whole set, as identity providers often
    publish several kinds side by side.
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise JwksUnavailable("the key set is not a JSON object with a 'keys' list")
    wanted_kty = KTY_FOR_ALG.get(algorithm[:2])
    keys = {}
    for jwk in document["keys"]:
        if not isinstance(jwk, dict) or jwk.get("kty") != wanted_kty:
            continue
        if jwk.get("use", "sig") != "sig" or jwk.get("alg", algorithm) != algorithm:
            continue
        try:
            key = PyJWK(jwk, algorithm=algorithm)
        except PyJWTError:
            continue
        keys[str(jwk.get("kid", ""))] = key.key
    return keys


class JwksCache:
    def __init__(self, url: str, algorithm: str, clock, *, cache_secs: float = 300.0,
                 min_refresh_secs: float = 10.0, timeout_secs: float = 10.0, http=treq):
        self.url = url
        self.algorithm = algorithm
        self.clock = clock
        self.cache_secs = cache_secs
        self.min_refresh_secs = min_refresh_secs
        self.timeout_secs = timeout_secs
        self.http = http
        self.keys: dict = {}
        self.fetched_at: float | None = None
        self.last_attempt: float | None = None
        self.fetches = 0
        self._fetching = False
        self._waiters: list = []

    def _fresh(self) -> bool:
        return self.fetched_at is not None and self.clock.seconds() - self.fetched_at < self.cache_secs

    def _may_fetch(self) -> bool:
        return self.last_attempt is None or self.clock.seconds() - self.last_attempt >= self.min_refresh_secs

    @defer.inlineCallbacks
    def key_for(self, kid: str | None):
        """Fire with the key for *kid* (None when the set has no such key).

        A token without ``kid`` is accepted only when the set has exactly one
        usable key, the common single-key identity provider setup.  When the
        provider is down, the last good keys stay in use.
        """
        stale = not self._fresh() or self._lookup(kid) is None
        if self._fetching or (stale and self._may_fetch()):
            yield self.refresh()
        return self._lookup(kid)

    def _lookup(self, kid):
        if kid is None:
            return next(iter(self.keys.values())) if len(self.keys) == 1 else None
        return self.keys.get(kid)

    def refresh(self) -> defer.Deferred:
        """Fetch the key set now (sharing a fetch already under way); never fails."""
        # Each caller waits on its own Deferred, so a client that goes away
        # (and cancels its request) cannot cancel the fetch others wait for.
        waiter: defer.Deferred[None] = defer.Deferred()
        self._waiters.append(waiter)
        if not self._fetching:
            self._fetching = True
            self._fetch().addBoth(self._fetched)
        return waiter

    def _fetched(self, _):
        self._fetching = False
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.called:
                w.callback(None)

    @defer.inlineCallbacks
    def _fetch(self):
        self.fetches += 1
        self.last_attempt = self.clock.seconds()
        try:
            # Not persistent: the set is fetched rarely, an idle connection is waste.
            response = yield self.http.get(self.url, timeout=self.timeout_secs, persistent=False,
                                           headers={"Accept": ["application/json"]})
            body = yield response.content()
            if response.code != 200:
                raise JwksUnavailable(f"the key set URL answered HTTP {response.code}")
            if len(body) > MAX_JWKS_BYTES:
                raise JwksUnavailable("the key set is too large")
            try:
                document = jsonutil.loads(body)
            except ValueError:
                raise JwksUnavailable("the key set is not valid JSON") from None
            keys = parse_jwks(document, self.algorithm)
        except JwksUnavailable as e:
            log.warn("JWKS {url} unusable: {error}", url=self.url, error=str(e))
            return None
        except Exception as e:  # noqa: BLE001 - network errors of any kind
            log.warn("JWKS {url} could not be fetched: {error}", url=self.url, error=f"{type(e).__name__}: {e}")
            return None
        self.keys = keys
        self.fetched_at = self.clock.seconds()
        log.info("JWKS {url}: {count} usable {alg} key(s)", url=self.url, count=len(keys), alg=self.algorithm)
        return None
