"""basic_auth and jwt_auth through a real Harmony on loopback.

Every rejection is checked as the client sees it: status, WWW-Authenticate,
a problem body that says why without echoing the token, and a backend that
was never called.  JWKS keys come from a real HTTP server on 127.0.0.1.
"""

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
import pytest_twisted
import treq
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.internet import task
from twisted.web.resource import Resource

from harmony.config import ConfigErrors
from harmony.middleware.jwks import JwksCache
from tests.harness import MINIMAL_MAIN, listen
from tests.middleware_harness import assert_option_error, build_pipeline, http_backend, start_pipeline

ISSUER = "https://idp.example.test"
AUDIENCE = "harmony-api"


def _pem_public(private):
    return private.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="session")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    made = {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "rsa_other": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ec": ec.generate_private_key(ec.SECP256R1()),
        "ed": ed25519.Ed25519PrivateKey.generate(),
    }
    out = {"dir": folder}
    for name, private in made.items():
        path = folder / f"{name}.pub.pem"
        path.write_bytes(_pem_public(private))
        out[name] = private
        out[f"{name}_pem"] = path
    (folder / "garbage.pem").write_text("-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n")
    return out


def claims(**overrides):
    now = int(time.time())
    c = {"sub": "dr-synthetic", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "nbf": now - 5,
         "exp": now + 300, "scope": "patient/*.read user/*.read", "roles": ["clinician", "reader"]}
    c.update(overrides)
    return {k: v for k, v in c.items() if v is not None}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header: dict, payload: dict, sign=None) -> str:
    """A token assembled by hand, for the forms no honest library will produce."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = sign(signing_input.encode()) if sign else b""
    return f"{signing_input}.{b64(signature)}"


JWT_MW = {"auth": f"""
type = "jwt_auth"
public_key_path = "{{rsa}}"
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
leeway_secs = 30
"""}


@pytest.fixture(scope="module")
def rs256(tmp_path_factory, keys):
    mw = {"auth": JWT_MW["auth"].format(rsa=keys["rsa_pem"])}
    running = pytest_twisted.blockon(start_pipeline(tmp_path_factory.mktemp("rs256"), mw))
    yield running
    pytest_twisted.blockon(running.stop())


async def call(running, token=None, path="/api/Patient", scheme="Bearer", **kw):
    headers = {"Authorization": f"{scheme} {token}"} if token is not None else {}
    resp = await treq.get(running.url(path), headers=headers, **kw)
    return resp, await resp.content()


def assert_rejected(resp, body, reason, token=None):
    assert resp.code == 401
    challenge = resp.headers.getRawHeaders("www-authenticate")[0]
    assert challenge.startswith('Bearer realm="Harmony", error="invalid_token"'), challenge
    assert resp.headers.getRawHeaders("content-type") == ["application/problem+json"]
    doc = json.loads(body)
    assert doc["status"] == 401 and reason in doc["detail"], doc
    assert "echo" not in doc  # the echo backend was never called
    if token:
        assert token.encode() not in body
        for part in token.split("."):
            assert len(part) < 8 or part.encode() not in body


@pytest_twisted.ensureDeferred
async def test_valid_rs256_token_passes_with_claims_in_metadata(rs256, keys):
    token = jwt.encode(claims(), keys["rsa"], algorithm="RS256")
    resp, body = await call(rs256, token)
    assert resp.code == 200, body
    meta = json.loads(body)["metadata"]
    assert meta["auth.method"] == "jwt"
    assert meta["auth.sub"] == "dr-synthetic"
    assert meta["auth.scope"] == "patient/*.read user/*.read"
    assert meta["auth.roles"] == "clinician reader"
    assert meta["auth.iss"] == ISSUER
    # jwt_auth forwards the bearer token by default (forward_token = true)
    assert json.loads(body)["headers"]["authorization"] == [f"Bearer {token}"]


@pytest_twisted.ensureDeferred
async def test_missing_token_is_401_without_error_code(rs256):
    for headers in ({}, {"Authorization": "Basic eDp5"}, {"Authorization": "Bearer"}):
        resp = await treq.get(rs256.url("/api/x"), headers=headers)
        body = await resp.content()
        assert resp.code == 401
        assert resp.headers.getRawHeaders("www-authenticate") == ['Bearer realm="Harmony"']
        assert "Bearer token is required" in json.loads(body)["detail"]


def _cases(keys):
    rsa_key, other = keys["rsa"], keys["rsa_other"]
    now = int(time.time())
    good = jwt.encode(claims(), rsa_key, algorithm="RS256")
    h, p, s = good.split(".")
    tampered_payload = b64(json.dumps(claims(sub="admin")).encode())
    public_pem = keys["rsa_pem"].read_bytes()
    return {
        "alg_none": (handmade({"alg": "none", "typ": "JWT"}, claims()), "algorithm is not accepted"),
        "alg_none_uppercase": (handmade({"alg": "NONE"}, claims()), "algorithm is not accepted"),
        "hs256_with_rsa_public_key_as_secret": (
            handmade({"alg": "HS256", "typ": "JWT"}, claims(),
                     lambda m: hmac.new(public_pem, m, hashlib.sha256).digest()),
            "algorithm is not accepted"),
        "other_asymmetric_algorithm": (jwt.encode(claims(), rsa_key, algorithm="RS512"), "algorithm is not accepted"),
        "expired": (jwt.encode(claims(exp=now - 120, iat=now - 600, nbf=now - 600), rsa_key, algorithm="RS256"),
                    "expired"),
        "not_yet_valid": (jwt.encode(claims(nbf=now + 600), rsa_key, algorithm="RS256"), "not yet valid"),
        "issued_in_future": (jwt.encode(claims(iat=now + 600), rsa_key, algorithm="RS256"), "not yet valid"),
        "wrong_issuer": (jwt.encode(claims(iss="https://evil.test"), rsa_key, algorithm="RS256"), "issuer"),
        "wrong_audience": (jwt.encode(claims(aud="other-api"), rsa_key, algorithm="RS256"), "audience"),
        "no_audience": (jwt.encode(claims(aud=None), rsa_key, algorithm="RS256"), "'aud'"),
        "no_expiry": (jwt.encode(claims(exp=None), rsa_key, algorithm="RS256"), "'exp'"),
        "tampered_payload": (f"{h}.{tampered_payload}.{s}", "signature does not verify"),
        "signed_by_another_key": (jwt.encode(claims(), other, algorithm="RS256"), "signature does not verify"),
        "garbage": ("not-a-jwt", "malformed"),
        "bad_base64": ("eyJhbGciOiJSUzI1NiJ9.!!!.???", "malformed"),
        "oversized": ("a" * 9000, "malformed"),
    }


CASES = ["alg_none", "alg_none_uppercase", "hs256_with_rsa_public_key_as_secret", "other_asymmetric_algorithm",
         "expired", "not_yet_valid", "issued_in_future", "wrong_issuer", "wrong_audience", "no_audience",
         "no_expiry", "tampered_payload", "signed_by_another_key", "garbage", "bad_base64", "oversized"]


@pytest.mark.parametrize("case", CASES)
@pytest_twisted.ensureDeferred
async def test_rejected_tokens(rs256, keys, case):
    token, reason = _cases(keys)[case]
    resp, body = await call(rs256, token)
    assert_rejected(resp, body, reason, token if len(token) < 10000 else None)


@pytest_twisted.ensureDeferred
async def test_leeway_accepts_recently_expired(rs256, keys):
    now = int(time.time())
    token = jwt.encode(claims(exp=now - 10, iat=now - 300, nbf=now - 300), keys["rsa"], algorithm="RS256")
    resp, body = await call(rs256, token)
    assert resp.code == 200, body


@pytest.mark.parametrize("kind, alg", [("ec", "ES256"), ("ed", "EdDSA")])
@pytest_twisted.ensureDeferred
async def test_key_type_selects_es256_and_eddsa(tmp_path, keys, kind, alg):
    mw = {"auth": f'type = "jwtauth"\npublic_key_path = "{keys[kind + "_pem"]}"\naudience = "{AUDIENCE}"'}
    running = await start_pipeline(tmp_path, mw)
    try:
        resp, body = await call(running, jwt.encode(claims(), keys[kind], algorithm=alg))
        assert resp.code == 200, body
        # An RS256 token is not accepted by an EC/Ed25519-configured middleware.
        resp, body = await call(running, jwt.encode(claims(), keys["rsa"], algorithm="RS256"))
        assert_rejected(resp, body, "algorithm is not accepted")
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_hs256_only_when_enabled_and_required_claims(tmp_path):
    secret = "s3cret-" * 10
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "secret.txt").write_text(secret + "\n")
    mw = {"auth": f'type = "jwt_auth"\nuse_hs256 = true\nhs256_secret_file = "secret.txt"\naudience = "{AUDIENCE}"\n'
                  'required_claims = ["exp", "sub", "tenant"]\nforward_token = false'}
    running = await start_pipeline(tmp_path, mw)
    try:
        resp, body = await call(running, jwt.encode(claims(tenant="north"), secret, algorithm="HS256"))
        assert resp.code == 200, body
        doc = json.loads(body)
        assert doc["metadata"]["auth.tenant"] == "north"
        assert "authorization" not in doc["headers"]
        resp, body = await call(running, jwt.encode(claims(), secret, algorithm="HS256"))
        assert_rejected(resp, body, "'tenant'")
        resp, body = await call(running, jwt.encode(claims(tenant="n"), "another-secret" * 3, algorithm="HS256"))
        assert_rejected(resp, body, "signature")
        resp, body = await call(running, jwt.encode(claims(tenant="n"), secret, algorithm="HS512"))
        assert_rejected(resp, body, "algorithm is not accepted")
    finally:
        await running.stop()


# --------------------------------------------------------------------------- JWKS


class JwksServer(Resource):
    """A real identity-provider key endpoint whose key set the test changes."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.keys = []
        self.hits = 0
        self.status = 200

    def render_GET(self, request):
        self.hits += 1
        request.setResponseCode(self.status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"keys": self.keys}).encode()


def jwk(private, kid, **extra):
    from jwt.algorithms import RSAAlgorithm
    d = json.loads(RSAAlgorithm.to_jwk(private.public_key()))
    d.update({"kid": kid, "use": "sig", **extra})
    return d


@pytest.fixture
def jwks_server():
    server = JwksServer()
    port = listen(server)
    server.url = f"http://127.0.0.1:{port.getHost().port}/jwks.json"
    yield server
    pytest_twisted.blockon(port.stopListening())


@pytest_twisted.ensureDeferred
async def test_jwks_unknown_kid_triggers_refresh(tmp_path, keys, jwks_server):
    jwks_server.keys = [jwk(keys["rsa"], "k1"), {"kty": "oct", "k": "c2VjcmV0", "kid": "k-hmac"},
                        jwk(keys["rsa_other"], "k-enc", use="enc")]
    mw = {"auth": f'type = "jwt_auth"\njwks_url = "{jwks_server.url}"\njwks_min_refresh_secs = 0\n'
                  f'issuer = "{ISSUER}"\naudience = "{AUDIENCE}"'}
    running = await start_pipeline(tmp_path, mw)
    try:
        t1 = jwt.encode(claims(), keys["rsa"], algorithm="RS256", headers={"kid": "k1"})
        for _ in range(3):
            resp, body = await call(running, t1)
            assert resp.code == 200, body
        assert jwks_server.hits == 1  # cached

        # The IdP rotates: k2 is signed with before we have seen it.
        t2 = jwt.encode(claims(sub="rotated"), keys["rsa_other"], algorithm="RS256", headers={"kid": "k2"})
        resp, body = await call(running, t2)
        assert_rejected(resp, body, "signing key is not known", t2)
        assert jwks_server.hits == 2  # it did look
        jwks_server.keys.append(jwk(keys["rsa_other"], "k2"))
        resp, body = await call(running, t2)
        assert resp.code == 200, body
        assert json.loads(body)["metadata"]["auth.sub"] == "rotated"
        assert jwks_server.hits == 3

        # Keys published for other uses or as symmetric secrets are never used.
        for kid in ("k-enc", "k-hmac"):
            t = jwt.encode(claims(), keys["rsa_other"], algorithm="RS256", headers={"kid": kid})
            resp, body = await call(running, t)
            assert_rejected(resp, body, "signing key is not known")
        forged = handmade({"alg": "HS256", "kid": "k-hmac"}, claims(),
                          lambda m: hmac.new(b"secret", m, hashlib.sha256).digest())
        resp, body = await call(running, forged)
        assert_rejected(resp, body, "algorithm is not accepted")
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_jwks_refresh_is_rate_limited_and_outage_keeps_keys(keys, jwks_server):
    from twisted.internet import reactor
    jwks_server.keys = [jwk(keys["rsa"], "k1")]
    clock = task.Clock()
    clock.advance(1000)
    cache = JwksCache(jwks_server.url, "RS256", clock, cache_secs=300, min_refresh_secs=10)
    assert await cache.key_for("k1") is not None
    assert await cache.key_for("nope") is None
    assert await cache.key_for("nope") is None
    assert jwks_server.hits == 1  # unknown kids within min_refresh_secs: no new fetch
    clock.advance(10)
    assert await cache.key_for("nope") is None
    assert jwks_server.hits == 2
    # The IdP fails; the cached keys outlive their cache time rather than locking everyone out.
    jwks_server.status = 500
    clock.advance(400)
    assert await cache.key_for("k1") is not None
    assert jwks_server.hits == 3
    # A single-key set also serves tokens that name no kid.
    assert await cache.key_for(None) is not None
    assert reactor.running


@pytest_twisted.ensureDeferred
async def test_jwks_unreachable_from_start_is_503_not_401(tmp_path, keys, jwks_server):
    jwks_server.status = 500
    mw = {"auth": f'type = "jwt_auth"\njwks_url = "{jwks_server.url}"\nissuer = "{ISSUER}"\naudience = "{AUDIENCE}"'}
    running = await start_pipeline(tmp_path, mw)
    try:
        token = jwt.encode(claims(), keys["rsa"], algorithm="RS256", headers={"kid": "k1"})
        resp, body = await call(running, token)
        assert resp.code == 503
        assert "signing keys are not available" in json.loads(body)["detail"]
        assert jwks_server.hits == 1
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_jwks_concurrent_lookups_share_one_fetch(keys, jwks_server):
    from twisted.internet import defer
    jwks_server.keys = [jwk(keys["rsa"], "k1")]
    cache = JwksCache(jwks_server.url, "RS256", task.Clock())
    results = await defer.gatherResults([cache.key_for("k1") for _ in range(5)])
    assert all(r is not None for r in results)
    assert jwks_server.hits == 1 and cache.fetches == 1


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("body, key, message", [
    ('type = "jwt_auth"', "public_key_path", "a verification key is required"),
    ('type = "jwt_auth"\npublic_key_path = "{dir}/garbage.pem"', "public_key_path", "is not a PEM public key"),
    ('type = "jwt_auth"\npublic_key_path = "{dir}/absent.pem"', "public_key_path", "cannot read"),
    ('type = "jwt_auth"\nhs256_secret = "{long}"', "use_hs256", "HS256 is only enabled explicitly"),
    ('type = "jwt_auth"\nuse_hs256 = true', "hs256_secret", "is required"),
    ('type = "jwt_auth"\nuse_hs256 = true\nhs256_secret = "short"', "hs256_secret", "at least 32 bytes"),
    ('type = "jwt_auth"\nuse_hs256 = true\nhs256_secret = "{long}"\npublic_key_path = "{dir}/rsa.pub.pem"',
     "use_hs256", "cannot be combined"),
    ('type = "jwt_auth"\npublic_key_path = "{dir}/rsa.pub.pem"\nalgorithm = "ES256"', "algorithm",
     "cannot be verified"),
    ('type = "jwt_auth"\npublic_key_path = "{dir}/rsa.pub.pem"\nalgorithm = "HS256"', "algorithm",
     "cannot be verified"),
    ('type = "jwt_auth"\njwks_url = "http://idp.example.test/jwks"', "jwks_url", "must use https"),
    ('type = "jwt_auth"\njwks_url = "https://idp.example.test/jwks"\nalgorithm = "HS256"', "algorithm",
     "must be one of"),
    ('type = "jwt_auth"\njwks_url = "https://idp.example.test/jwks"\npublic_key_path = "{dir}/rsa.pub.pem"',
     "jwks_url", "not both"),
])
def test_jwt_config_errors_name_the_key(tmp_path, keys, body, key, message):
    text = assert_option_error(tmp_path, {"auth": body.format(dir=keys["dir"], long="x" * 40)}, "auth", key, message)
    assert "main.toml" in text  # the file is named too


def test_jwt_config_accepts_certificate_and_small_rsa_is_refused(tmp_path):
    import datetime
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    (tmp_path / "small.pem").write_bytes(_pem_public(small))
    with pytest.raises(ConfigErrors, match="at least 2048 bits"):
        build_pipeline(tmp_path / "a", {"auth": f'type = "jwt_auth"\npublic_key_path = "{tmp_path}/small.pem"\n'
                                                'audience = "a"'})
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp.example.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    runtime = build_pipeline(tmp_path / "b", {"auth": f'type = "jwt_auth"\npublic_key_path = "{tmp_path}/cert.pem"\n'
                                                      'audience = "a"'})
    assert runtime.middleware["auth"].algorithm == "ES384"


# --------------------------------------------------------------------------- basic_auth


@pytest_twisted.ensureDeferred
async def test_basic_auth_through_http_backend(tmp_path, upstream):
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "pw").write_text("correct horse\n")
    mw = {"basic": 'type = "basic_auth"\nusername = "alice"\npassword_file = "pw"\nrealm = "Harmony \\"PACS\\""'}
    running = await start_pipeline(tmp_path, mw, backend=http_backend(upstream.url))
    try:
        for auth in (None, "Basic " + base64.b64encode(b"alice:wrong").decode(),
                     "Basic " + base64.b64encode(b"bob:correct horse").decode(),
                     "Basic " + base64.b64encode(b"alice:correct horse ").decode(),
                     "Basic !!!notbase64", "Bearer abc", "Basic " + base64.b64encode(b"nocolon").decode()):
            headers = {"Authorization": auth} if auth else {}
            resp = await treq.get(running.url("/api/Patient"), headers=headers)
            doc = json.loads(await resp.content())
            assert resp.code == 401, auth
            assert resp.headers.getRawHeaders("www-authenticate") == [
                'Basic realm="Harmony \\"PACS\\"", charset="UTF-8"']
            assert doc["status"] == 401
            assert "correct horse" not in json.dumps(doc)
        assert upstream.requests == []  # nothing rejected reached the upstream

        good = "Basic " + base64.b64encode(b"alice:correct horse").decode()
        resp = await treq.get(running.url("/api/Patient"), headers={"Authorization": good})
        assert resp.code == 200
        await resp.content()
        assert len(upstream.requests) == 1
        assert b"authorization" not in upstream.requests[0]["headers"]
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_basic_auth_forward_credentials_and_metadata(tmp_path):
    mw = {"basic": 'type = "basic_auth"\nusername = "alice"\npassword = "pw"\nforward_credentials = true'}
    running = await start_pipeline(tmp_path, mw)
    try:
        good = "Basic " + base64.b64encode(b"alice:pw").decode()
        resp = await treq.get(running.url("/api/x"), headers={"Authorization": good})
        doc = json.loads(await resp.content())
        assert resp.code == 200
        assert doc["headers"]["authorization"] == [good]
        assert doc["metadata"]["auth.sub"] == "alice" and doc["metadata"]["auth.method"] == "basic"
    finally:
        await running.stop()


@pytest.mark.parametrize("body, key, message", [
    ('type = "basic_auth"\npassword = "x"', "username", "is required"),
    ('type = "basic_auth"\nusername = "a:b"\npassword = "x"', "username", "without ':'"),
    ('type = "basic_auth"\nusername = "a"', "password", "is required"),
    ('type = "basic_auth"\nusername = "a"\npassword = ""', "password", "must not be empty"),
    ('type = "basic_auth"\nusername = "a"\npassword_file = "nope"', "password_file", "cannot read"),
    ('type = "basic_auth"\nusername = "a"\npassword = "x"\npassword_file = "y"', "password", "not both"),
])
def test_basic_auth_config_errors(tmp_path, body, key, message):
    assert_option_error(tmp_path, {"basic": body}, "basic", key, message)


def test_alias_and_unknown_option_warning(tmp_path, keys):
    runtime = build_pipeline(tmp_path, {"a": f'type = "jwtauth"\npublic_key_path = "{keys["rsa_pem"]}"\n'
                                             'audience = "a"\nissuer_typo = "x"'})
    assert type(runtime.middleware["a"]).__name__ == "JwtAuth"
    assert any("issuer_typo" in str(w) for w in runtime.warnings)
    assert MINIMAL_MAIN  # the shared harness stays the base of these configs


# --------------------------------------------------------------------------- audience and issuer (RFC 8725 3.9)


@pytest.mark.parametrize("body, key, message", [
    ('type = "jwt_auth"\npublic_key_path = "{dir}/rsa.pub.pem"', "audience", "is required"),
    ('type = "jwt_auth"\nuse_hs256 = true\nhs256_secret = "{long}"', "audience", "is required"),
    ('type = "jwt_auth"\njwks_url = "https://idp.example.test/jwks"\naudience = "a"', "issuer", "is required"),
    ('type = "jwt_auth"\npublic_key_path = "{dir}/rsa.pub.pem"\naudience = "a"\nverify_audience = false',
     "verify_audience", "drop one of them"),
    ('type = "jwt_auth"\npublic_key_path = "{dir}/rsa.pub.pem"\naudience = ""', "audience", "non-empty"),
])
def test_audience_and_jwks_issuer_are_required(tmp_path, keys, body, key, message):
    assert_option_error(tmp_path, {"auth": body.format(dir=keys["dir"], long="x" * 40)}, "auth", key, message)


@pytest_twisted.ensureDeferred
async def test_a_token_for_another_application_is_refused(tmp_path, keys):
    """The defect: with no audience configured, a token the shared identity
    provider minted for another application was accepted.  Now a config must
    name its audience, and that token gets a 401."""
    mw = {"auth": f'type = "jwt_auth"\npublic_key_path = "{keys["rsa_pem"]}"\naudience = "{AUDIENCE}"'}
    running = await start_pipeline(tmp_path, mw)
    try:
        resp, body = await call(running, jwt.encode(claims(aud="billing-app"), keys["rsa"], algorithm="RS256"))
        assert_rejected(resp, body, "audience")
        resp, body = await call(running, jwt.encode(claims(), keys["rsa"], algorithm="RS256"))
        assert resp.code == 200, body
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_explicit_opt_out_accepts_any_audience_and_check_names_the_pipeline(tmp_path, keys, capsys):
    from harmony.cli import main as harmony_main
    mw = {"auth": f'type = "jwt_auth"\npublic_key_path = "{keys["rsa_pem"]}"\nverify_audience = false'}
    running = await start_pipeline(tmp_path, mw)
    try:
        resp, body = await call(running, jwt.encode(claims(aud="billing-app"), keys["rsa"], algorithm="RS256"))
        assert resp.code == 200, body
        config_path = running.service.runtime.config.path
    finally:
        await running.stop()
    assert harmony_main(["check", "-c", str(config_path)]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "without checking token audience" in line]
    assert len(lines) == 1, out
    assert "[pipelines." in lines[0] and "verify_audience = false" in lines[0] and "'auth'" in lines[0], lines


def test_jwks_issuer_opt_out_is_listed_too(tmp_path):
    runtime = build_pipeline(tmp_path, {"auth": 'type = "jwt_auth"\njwks_url = "https://idp.example.test/jwks"\n'
                                                'audience = "a"\nverify_issuer = false'})
    assert runtime.middleware["auth"].unverified_claims == ("iss",)
    assert any("without checking token issuer (verify_issuer = false)" in str(w) for w in runtime.warnings)
