"""harmony.middleware.jwks in memory: a key set fetched (through treq's StubTreq, a JWKS resource in
memory) and cached on a task.Clock, rotation refreshing at most once per min_refresh_secs, the last
good keys kept while the provider is down, and only usable signing keys taken from a set."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from jwt.algorithms import OKPAlgorithm
from treq.testing import StubTreq
from twisted.internet import task
from twisted.web.resource import Resource

from harmony.config.errors import OptionError
from harmony.middleware.jwks import JwksCache, JwksUnavailable, check_jwks_url, parse_jwks
from tests.memory import result_of


def _jwk(kid, **extra):
    doc = json.loads(OKPAlgorithm.to_jwk(ed25519.Ed25519PrivateKey.generate().public_key()))
    return {**doc, "kid": kid, **extra}


class Provider(Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.keys = [_jwk("k1")]
        self.status = 200
        self.hits = 0

    def render(self, request):
        self.hits += 1
        request.setResponseCode(self.status)
        return json.dumps({"keys": self.keys}).encode()


class InMemoryTreq:
    """treq's module API (what JwksCache calls) over a StubTreq: the one difference is ``persistent``,
    a pool choice of treq's module functions that an in-memory agent has no use for."""

    def __init__(self, resource):
        self.stub = StubTreq(resource)

    def get(self, url, persistent=None, **kwargs):
        return self.stub.get(url, **kwargs)

    def flush(self):
        self.stub.flush()


def _cache(**kwargs):
    provider, clock = Provider(), task.Clock()
    http = InMemoryTreq(provider)
    cache = JwksCache("https://idp.test/jwks", "EdDSA", clock, http=http, **kwargs)
    return cache, provider, clock, http


def _key(cache, stub, kid):
    d = cache.key_for(kid)
    stub.flush()
    return result_of(d)


def test_keys_are_fetched_once_and_cached_until_they_expire():
    cache, provider, clock, stub = _cache(cache_secs=300)
    assert _key(cache, stub, "k1") is not None and _key(cache, stub, None) is not None  # one key: no kid needed
    assert provider.hits == 1
    clock.advance(301)
    _key(cache, stub, "k1")
    assert provider.hits == 2


def test_an_unknown_kid_refreshes_at_most_once_per_interval():
    cache, provider, clock, stub = _cache(min_refresh_secs=10)
    _key(cache, stub, "k1")
    assert _key(cache, stub, "random-kid") is None and provider.hits == 1  # fetched just now: no refresh
    clock.advance(10)
    for _ in range(5):
        assert _key(cache, stub, "random-kid") is None
    assert provider.hits == 2  # one refresh for the rotation, not one per token
    provider.keys.append(_jwk("k2"))
    assert _key(cache, stub, "k2") is None
    clock.advance(10)
    assert _key(cache, stub, "k2") is not None and provider.hits == 3


def test_the_last_good_keys_stay_while_the_provider_is_down():
    cache, provider, clock, stub = _cache(cache_secs=1, min_refresh_secs=0)
    _key(cache, stub, "k1")
    provider.status = 503
    clock.advance(5)
    assert _key(cache, stub, "k1") is not None and provider.hits == 2


def test_only_usable_signing_keys_are_taken():
    keys = parse_jwks({"keys": [_jwk("sig"), _jwk("enc", use="enc"), _jwk("other", alg="ES256"),
                                {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}, {"kty": "OKP", "kid": "broken"}]},
                      "EdDSA")
    assert list(keys) == ["sig"]
    with pytest.raises(JwksUnavailable):
        parse_jwks({"no": "keys"}, "EdDSA")


@pytest.mark.parametrize("url, ok", [("https://idp.test/jwks", True), ("http://127.0.0.1:8080/jwks", True),
                                     ("http://localhost/jwks", True), ("http://idp.test/jwks", False),
                                     ("ftp://idp.test/jwks", False), ("/jwks", False)])
def test_keys_come_over_https_or_from_loopback(url, ok):
    if ok:
        assert check_jwks_url(url) == url
    else:
        with pytest.raises(OptionError):
            check_jwks_url(url)
