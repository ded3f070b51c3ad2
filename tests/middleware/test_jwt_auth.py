"""harmony.middleware.jwt_auth in memory: the pinned algorithm, the claims policy, what a refused
token is told, and the configuration it refuses.  Keys are made here with cryptography; the
end-to-end tests through a running Harmony are tests/middleware/test_jwt_auth_harmony.py."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from harmony.config.errors import OptionError
from harmony.errors import AuthenticationFailed
from harmony.middleware.jwt_auth import JwtAuth, bearer_token, claim_text, load_public_key, token_header
from tests.memory import build, request

SECRET = "0123456789abcdef0123456789abcdef"


def _claims(**overrides):
    # Parametrized tokens are made at collection: they must outlive the whole suite (23 min on a loaded machine).
    now = int(time.time())
    claims = {"sub": "alice", "aud": "harmony", "exp": now + 86400, "iat": now, "scope": ["read", "write"]}
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _hs256(**options):
    return build(JwtAuth, {"use_hs256": True, "hs256_secret": SECRET, "audience": "harmony", **options})


def _bearer(token):
    return request(headers={"Authorization": f"Bearer {token}"})


def _refusal(mw, req) -> str:
    with pytest.raises(AuthenticationFailed) as e:
        mw.on_request(req)
    challenge = dict(e.value.headers)["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="Harmony"')
    return e.value.detail + " | " + challenge


def test_a_valid_token_passes_with_its_claims_in_metadata():
    req = _hs256(forward_token=False).on_request(_bearer(jwt.encode(_claims(), SECRET, algorithm="HS256")))
    assert req.metadata["auth.sub"] == "alice" and req.metadata["auth.scope"] == "read write"
    assert req.metadata["auth.method"] == "jwt" and not req.headers.hasHeader(b"authorization")


def test_a_claim_cannot_forge_the_method():
    req = _hs256().on_request(_bearer(jwt.encode(_claims(method="basic"), SECRET, algorithm="HS256")))
    assert req.metadata["auth.method"] == "jwt" and req.headers.hasHeader(b"authorization")


@pytest.mark.parametrize("token, reason", [
    (jwt.encode(_claims(exp=int(time.time()) - 60), SECRET, algorithm="HS256"), "expired"),
    (jwt.encode(_claims(aud="other"), SECRET, algorithm="HS256"), "audience"),
    (jwt.encode(_claims(exp=None), SECRET, algorithm="HS256"), "'exp' claim"),
    (jwt.encode(_claims(), SECRET[::-1], algorithm="HS256"), "signature does not verify"),
    (jwt.encode(_claims(), SECRET * 2, algorithm="HS512"), "algorithm is not accepted"),
    ("e30." + base64.urlsafe_b64encode(json.dumps(_claims()).encode()).decode().rstrip("=") + ".",
     "algorithm is not accepted"),  # alg: none, by omission
    ("not-a-token", "malformed"),
    ("a." * 5000, "malformed"),
])
def test_refused_tokens_say_why_in_general_terms(token, reason):
    text = _refusal(_hs256(), _bearer(token))
    assert reason in text and 'error="invalid_token"' in text
    assert token[:20] not in text  # the token is never echoed


def test_no_token_is_a_challenge_without_an_error_code():
    text = _refusal(_hs256(), request())
    assert "invalid_token" not in text


def test_a_pinned_eddsa_key_from_a_pem_file(tmp_path):
    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "key.pem").write_bytes(pem)
    mw = build(JwtAuth, {"public_key_path": "key.pem", "audience": "harmony"}, base_dir=tmp_path)
    assert mw.algorithm == "EdDSA"
    assert mw.on_request(_bearer(jwt.encode(_claims(), private, algorithm="EdDSA"))).metadata["auth.sub"] == "alice"
    # an HS256 token "signed" with the public key bytes is refused before any signature check
    assert "algorithm" in _refusal(mw, _bearer(jwt.encode(_claims(), "x" * 32, algorithm="HS256")))


def test_weak_and_unreadable_keys_are_configuration_errors(tmp_path):
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    (tmp_path / "weak.pem").write_bytes(weak.public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(OptionError, match="at least 2048 bits"):
        load_public_key(tmp_path / "weak.pem")
    (tmp_path / "junk.pem").write_text("junk")
    with pytest.raises(OptionError, match="not a PEM"):
        load_public_key(tmp_path / "junk.pem")


@pytest.mark.parametrize("options, key", [
    ({}, "public_key_path"),
    ({"hs256_secret": SECRET, "audience": "a"}, "use_hs256"),                 # HS256 only explicitly
    ({"use_hs256": True, "hs256_secret": "short", "audience": "a"}, "hs256_secret"),
    ({"use_hs256": True, "hs256_secret": SECRET}, "audience"),               # audience is required
    ({"use_hs256": True, "hs256_secret": SECRET, "audience": "a", "verify_audience": False}, "verify_audience"),
    ({"use_hs256": True, "hs256_secret": SECRET, "audience": ""}, "audience"),
    ({"use_hs256": True, "hs256_secret": SECRET, "audience": "a", "issuer": ""}, "issuer"),
])
def test_configuration_errors_name_their_key(options, key):
    with pytest.raises(OptionError) as e:
        build(JwtAuth, options)
    assert e.value.key == key


def test_waiving_the_audience_is_visible():
    mw = build(JwtAuth, {"use_hs256": True, "hs256_secret": SECRET, "verify_audience": False})
    assert mw.unverified_claims == ("aud",) and "verify_audience = false" in mw.waived_checks[0]


def test_helpers():
    assert bearer_token("bearer  abc ") == "abc" and bearer_token("Basic abc") is None and bearer_token("") is None
    assert token_header(jwt.encode({}, SECRET, algorithm="HS256", headers={"kid": "k1"}))["kid"] == "k1"
    assert token_header("only.two") is None and token_header("!!!.a.b") is None
    assert [claim_text(v) for v in ("s", True, 3, ["a", "b"], {"b": 1, "a": [2]})] == \
        ["s", "true", "3", "a b", '{"a":[2],"b":1}']
