"""``jwt_auth`` (alias ``jwtauth``): verify ``Authorization: Bearer <JWT>``.

Verification is PyJWT's; what this module adds is policy:

* The algorithm is pinned by configuration, never taken from the token: RS256
  by default, ES256/ES384/ES512 or EdDSA when the configured key is of that
  type, HS256 only with ``use_hs256 = true`` and a secret.  So ``alg: none``,
  an HS256 token "signed" with the RSA public key, or any other algorithm is
  refused before a signature is even looked at.
* The key comes from a PEM file read at start-up, or from a JWKS URL fetched
  without blocking the reactor (see :mod:`harmony.middleware.jwks`).
* ``exp`` is required unless ``required_claims`` says otherwise: a token that
  never expires is a password that cannot be changed.
* ``audience`` is required (and ``issuer`` with a JWKS URL), RFC 8725 §3.9:
  behind an identity provider shared by several applications, a token minted
  for another one verifies with the same keys, and only ``aud``/``iss`` tell
  them apart.  An operator who really has a private provider may opt out with
  ``verify_audience = false`` / ``verify_issuer = false``; the opt-out is
  visible: the middleware lists it in :attr:`JwtAuth.unverified_claims`,
  ``harmony check`` names the pipelines that run so, and a warning is logged
  when the service starts.
* Failures answer 401 with ``WWW-Authenticate: Bearer error="invalid_token"``
  and a reason in general terms; the token itself is never echoed or logged.

Verified claims are copied into the envelope metadata as ``auth.<claim>``
strings for later middleware and routing (``auth.sub``, ``auth.scope`` ...).
"""

from __future__ import annotations

import base64
import binascii
import json

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from cryptography.x509 import load_pem_x509_certificate

from harmony import jsonutil
from harmony.config.errors import OptionError
from harmony.errors import AuthenticationFailed, ServiceUnavailable
from harmony.log import get_logger
from harmony.middleware.base import Middleware
from harmony.middleware.basic_auth import quoted
from harmony.middleware.jwks import JwksCache, check_jwks_url

log = get_logger("harmony.middleware.jwt_auth")

RSA_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_ALGS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
ASYMMETRIC_ALGS = RSA_ALGS + tuple(EC_ALGS.values()) + ("EdDSA",)
MIN_HS256_SECRET = 32  # bytes: RFC 7518 3.2 wants a key at least as long as the hash
MAX_TOKEN = 8 * 1024  # far above any real token; bounds the work a stranger can ask for

#: PyJWT exception -> what the client is told (general terms, nothing echoed).
REASONS = [
    (jwt.ExpiredSignatureError, "the token has expired"),
    (jwt.ImmatureSignatureError, "the token is not yet valid"),
    (jwt.InvalidAudienceError, "the token is not meant for this audience"),
    (jwt.InvalidIssuerError, "the token comes from an unexpected issuer"),
    (jwt.MissingRequiredClaimError, None),
    (jwt.InvalidAlgorithmError, "the token's signing algorithm is not accepted"),
    (jwt.InvalidSignatureError, "the token's signature does not verify"),
    (jwt.InvalidIssuedAtError, "the token's issue time is invalid"),
    (jwt.DecodeError, "the token is malformed"),
]


def _reason(error: jwt.PyJWTError) -> str:
    for cls, text in REASONS:
        if isinstance(error, cls):
            if isinstance(error, jwt.MissingRequiredClaimError):
                return f"the token lacks the required '{error.claim}' claim"
            return text
    return "the token is invalid"


def load_public_key(path, key="public_key_path"):
    """A PEM public key or certificate -> (key object, default algorithm)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise OptionError(key, f"cannot read {path}: {e.strerror}") from None
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            public = load_pem_x509_certificate(data).public_key()
        else:
            public = load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise OptionError(key, f"{path} is not a PEM public key or certificate: {e}") from None
    if isinstance(public, rsa.RSAPublicKey):
        if public.key_size < 2048:
            raise OptionError(key, f"{path}: RSA keys must be at least 2048 bits, got {public.key_size}")
        return public, "RS256"
    if isinstance(public, ec.EllipticCurvePublicKey):
        alg = EC_ALGS.get(public.curve.name)
        if alg is None:
            raise OptionError(key, f"{path}: unsupported curve {public.curve.name}")
        return public, alg
    if isinstance(public, ed25519.Ed25519PublicKey):
        return public, "EdDSA"
    raise OptionError(key, f"{path}: unsupported key type {type(public).__name__}")


def _claim_policy(options, key: str, value, *, required: bool) -> bool:
    """Whether the *key* claim (``audience``/``issuer``) is verified.

    A required one must be configured, or explicitly waived with
    ``verify_<key> = false``; waiving it while also giving a value is a
    contradiction, refused rather than guessed at.
    """
    flag = f"verify_{key}"
    verify = options.bool(flag, True)
    if value is not None:
        if not verify:
            raise OptionError(flag, f"is false but {key} is set: drop one of them")
        return True
    if not verify:
        return False
    if required:
        why = ("a token minted for another application of the same identity provider would pass"
               if key == "audience" else "with a JWKS URL, any issuer publishing those keys would be trusted")
        raise OptionError(key, f"is required: {why} (RFC 8725 3.9); set {key}, or {flag} = false to "
                               f"accept any {key} knowingly")
    return True  # issuer with a pinned key: the key already names the issuer


def _compatible(key_alg: str, alg: str) -> bool:
    if key_alg == "RS256":
        return alg in RSA_ALGS
    return alg == key_alg


def claim_text(value) -> str:
    """A claim as a metadata string: text as is, lists of text space-joined
    (as OAuth scopes are), anything else compact JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return " ".join(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def bearer_token(value: str | None) -> str | None:
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def token_header(token: str) -> dict | None:
    """The JOSE header of a compact JWS, unverified; None when malformed.

    Only the header segment is decoded: PyJWT's ``get_unverified_header``
    decodes (and strictly validates) the whole token, which ``jwt.decode``
    then does again - twice the cost on the hot path for nothing.  PyJWT still
    validates every segment strictly when it verifies.
    """
    parts = token.split(".")
    if len(parts) != 3 or not parts[0]:
        return None
    segment = parts[0]
    try:
        header = jsonutil.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, binascii.Error):
        return None
    return header if isinstance(header, dict) else None


class JwtAuth(Middleware):
    def __init__(self, name, algorithm: str, *, key=None, jwks: JwksCache | None = None,
                 issuer=None, audience=None, leeway=0.0, required_claims=("exp",),
                 forward_token=True, realm="Harmony", unverified_claims=()):
        super().__init__(name)
        if (key is None) == (jwks is None):
            raise ValueError("exactly one of key and jwks")
        self.algorithm = algorithm
        self.key = key
        self.jwks = jwks
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway
        self.required_claims = list(required_claims)
        self.forward_token = forward_token
        self.realm = realm
        #: Claims an explicit opt-out leaves unchecked (``("aud",)``, ``("aud", "iss")``):
        #: read by ``harmony check`` and the service's start-up warnings.
        self.unverified_claims = tuple(unverified_claims)

    @property
    def waived_checks(self) -> list[str]:
        """Security checks configured away, in words, for the pipeline warnings."""
        names = {"aud": "token audience (verify_audience = false)", "iss": "token issuer (verify_issuer = false)"}
        return [names[c] for c in self.unverified_claims]

    @classmethod
    def from_config(cls, name, options, ctx):
        use_hs256 = options.bool("use_hs256", False)
        has_pem = "public_key_path" in options
        has_jwks = "jwks_url" in options
        has_secret = "hs256_secret" in options or "hs256_secret_file" in options
        if has_pem and has_jwks:
            raise OptionError("jwks_url", "give either 'public_key_path' or 'jwks_url', not both")
        kwargs = {}
        if use_hs256:
            if has_pem or has_jwks:
                raise OptionError("use_hs256", "HS256 cannot be combined with 'public_key_path' or 'jwks_url': "
                                               "one middleware verifies with one pinned algorithm")
            if not has_secret:
                raise OptionError("hs256_secret", "is required when use_hs256 = true (or hs256_secret_file)")
            secret = options.secret("hs256_secret")
            if len(secret.encode("utf-8")) < MIN_HS256_SECRET:
                key_name = "hs256_secret_file" if "hs256_secret_file" in options else "hs256_secret"
                raise OptionError(key_name, f"must be at least {MIN_HS256_SECRET} bytes long")
            algorithm = options.str("algorithm", "HS256", choices=("HS256",))
            kwargs["key"] = secret.encode("utf-8")
        elif has_secret:
            raise OptionError("use_hs256", "an hs256_secret is configured but use_hs256 is not true; "
                                           "HS256 is only enabled explicitly")
        elif has_pem:
            key, default_alg = load_public_key(options.path("public_key_path"))
            algorithm = options.str("algorithm", default_alg)
            if not _compatible(default_alg, algorithm):
                raise OptionError("algorithm", f"{algorithm!r} cannot be verified with the key in public_key_path "
                                               f"(its type calls for {default_alg})")
            kwargs["key"] = key
        elif has_jwks:
            url = check_jwks_url(options.str("jwks_url"))
            algorithm = options.str("algorithm", "RS256", choices=ASYMMETRIC_ALGS)
            kwargs["jwks"] = JwksCache(
                url, algorithm, ctx.reactor,
                cache_secs=options.number("jwks_cache_secs", 300.0, minimum=1),
                min_refresh_secs=options.number("jwks_min_refresh_secs", 10.0, minimum=0),
                timeout_secs=options.number("jwks_timeout_secs", 10.0, minimum=0.1))
        else:
            raise OptionError("public_key_path", "a verification key is required: set public_key_path or jwks_url "
                                                 "(or use_hs256 = true with hs256_secret)")
        audience = options.raw.get("audience")
        options.used.add("audience")
        if audience is not None and not (isinstance(audience, str) and audience or (
                isinstance(audience, list) and audience and all(isinstance(a, str) and a for a in audience))):
            raise OptionError("audience", "must be a non-empty string or list of strings")
        issuer = options.str("issuer", None)
        if issuer == "":
            raise OptionError("issuer", "must not be empty")
        unverified = []
        if not _claim_policy(options, "audience", audience, required=True):
            unverified.append("aud")
        if not _claim_policy(options, "issuer", issuer, required=has_jwks):
            unverified.append("iss")
        required = options.list("required_claims", ["exp"], of=str)
        return cls(name, algorithm, unverified_claims=unverified,
                   issuer=issuer, audience=audience,
                   leeway=options.number("leeway_secs", 0.0, minimum=0),
                   required_claims=required,
                   forward_token=options.bool("forward_token", True),
                   realm=options.str("realm", "Harmony"), **kwargs)

    # ------------------------------------------------------------------ request

    def _reject(self, reason: str, *, invalid=True):
        challenge = f'Bearer realm="{quoted(self.realm)}"'
        if invalid:
            challenge += f', error="invalid_token", error_description="{quoted(reason)}"'
        return AuthenticationFailed(reason, headers=[("WWW-Authenticate", challenge)])

    def on_request(self, request):
        token = bearer_token(request.header("authorization"))
        if token is None:
            raise self._reject("a Bearer token is required", invalid=False)
        if len(token) > MAX_TOKEN:
            raise self._reject("the token is malformed")
        header = token_header(token)
        if header is None:
            raise self._reject("the token is malformed")
        # Checked here as well as by PyJWT so the reason given is the right one,
        # and so a JWKS is never fetched on behalf of a token we would refuse.
        if header.get("alg") != self.algorithm:
            raise self._reject("the token's signing algorithm is not accepted")
        if self.jwks is None:
            return self._verify(request, token, self.key)
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise self._reject("the token is malformed")
        d = self.jwks.key_for(kid)
        d.addCallback(self._verify_with_jwks_key, request, token)
        return d

    def _verify_with_jwks_key(self, key, request, token):
        if key is None and not self.jwks.keys:
            # No keys at all: the identity provider is unreachable or publishes
            # nothing usable.  That is not the token's fault, so not a 401.
            raise ServiceUnavailable("the identity provider's signing keys are not available")
        if key is None:
            raise self._reject("the token's signing key is not known")
        return self._verify(request, token, key)

    def _verify(self, request, token, key):
        try:
            claims = jwt.decode(
                token, key=key, algorithms=[self.algorithm],
                audience=self.audience, issuer=self.issuer, leeway=self.leeway,
                options={"require": self.required_claims, "verify_aud": self.audience is not None,
                         "verify_iss": self.issuer is not None, "strict_aud": False})
        except jwt.PyJWTError as e:
            reason = _reason(e)
            log.debug("{name}: token refused: {reason}", name=self.name, reason=reason)
            raise self._reject(reason) from None
        for claim, value in claims.items():
            request.metadata[f"auth.{claim}"] = claim_text(value)
        request.metadata["auth.method"] = "jwt"  # after the claims: a claim must not forge it
        if not self.forward_token:
            request.headers.removeHeader(b"authorization")
        return request


__all__ = ["JwtAuth", "bearer_token", "claim_text", "load_public_key"]
