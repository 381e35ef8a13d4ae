"""
Tests for L{vaporproxy.http.auth}: API keys and JWT bearer tokens.

Every key is generated at run time.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from typing import Any, Dict, List, Optional

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from vaporproxy.http.auth import (
    key_id_of,
    LEEWAY,
    Authenticator,
    Principal,
    bearer_credential,
    load_jwt_key,
    looks_like_jwt,
)
from vaporproxy.config import ApiKey, AuthConfig, ConfigError, JWTConfig
from vaporproxy.errors import ConsoleError, ErrorCode

NOW = 1705314300.0
ISSUER = "https://sso.example.com"
AUDIENCE = "vaporproxy"
API_KEY = "api-key-3c9f1e77d2"
HS_SECRET = b"0123456789abcdef0123456789abcdef-hs256-secret"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_EC = ec.generate_private_key(ec.SECP256R1())
_ED = ed25519.Ed25519PrivateKey.generate()


def _public_pem(private: Any) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _private_pem(private: Any) -> bytes:
    return private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class JWTCase(SynchronousTestCase):
    """
    Helpers: key files in a temporary directory, an authenticator on a
    L{Clock} at L{NOW}, and a log catcher.
    """

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="vapor-auth-")
        self.addCleanup(self._remove_dir)
        self.clock = Clock()
        self.clock.advance(NOW)
        self.events: List[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def _remove_dir(self) -> None:
        for name in os.listdir(self.dir):
            os.remove(os.path.join(self.dir, name))
        os.rmdir(self.dir)

    def key_file(self, data: bytes, name: str = "key.pem") -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def jwt_config(self, algorithms: tuple = ("RS256",), data: Optional[bytes] = None, **kw: Any) -> JWTConfig:
        data = _public_pem(_RSA) if data is None else data
        return JWTConfig(algorithms=algorithms, key_file=self.key_file(data), **kw)

    def authenticator(self, jwt_config: Optional[JWTConfig] = None, api_keys: tuple = ()) -> Authenticator:
        return Authenticator(AuthConfig(api_keys=api_keys, jwt=jwt_config), self.clock)

    def claims(self, **overrides: Any) -> Dict[str, Any]:
        claims: Dict[str, Any] = {
            "sub": "carol",
            "iss": ISSUER,
            "aud": AUDIENCE,
            "iat": int(NOW) - 10,
            "exp": int(NOW) + 300,
            "vms": ["web-*"],
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def token(self, claims: Optional[Dict[str, Any]] = None, key: Any = _RSA, algorithm: str = "RS256") -> str:
        return jwt.encode(self.claims() if claims is None else claims, key, algorithm=algorithm)

    def assertRefused(self, auth: Authenticator, credential: str, reason: Optional[str] = None) -> None:
        """
        C{credential} is refused with a 401; with C{reason}, the last log
        event gives that reason (or why).
        """
        del self.events[:]
        error = self.assertRaises(ConsoleError, auth.authenticate, f"Bearer {credential}")
        self.assertIs(error.code, ErrorCode.UNAUTHORIZED)
        self.assertEqual(error.http_status, 401)
        if reason is not None:
            last = self.events[-1]
            self.assertEqual(last.get("reason", last.get("why")), reason)

    def logged(self) -> str:
        return "\n".join(formatEvent(e) + " " + repr(e) for e in self.events)


class ApiKeyTests(JWTCase):
    def test_known_key(self) -> None:
        """When a configured API key is presented, its user, patterns, admin flag and identity (no secret) are answered."""
        api_key = ApiKey("alice", _sha(API_KEY), ("web-*",), True)
        auth = self.authenticator(api_keys=(api_key,))
        principal = auth.authenticate(b"Bearer " + API_KEY.encode())
        self.assertEqual(principal, Principal(user="alice", vms=("web-*",), admin=True, method="api_key",
                                              key_id=key_id_of(api_key)))  # fmt: skip
        self.assertTrue(principal.key_id.startswith("key:"))
        self.assertNotIn(principal.key_id[4:], _sha(API_KEY) + API_KEY)

    def test_upper_case_hash_and_same_caller(self) -> None:
        """When a key's hash is configured in upper case it still matches, and each request gets the same caller."""
        auth = self.authenticator(api_keys=(ApiKey("alice", _sha(API_KEY).upper()), ApiKey("bob", _sha("bob-key-00001"))))
        first = auth.authenticate("Bearer " + API_KEY)
        self.assertEqual((first.user, first.method), ("alice", "api_key"))
        self.assertIs(auth.authenticate("Bearer " + API_KEY), first)
        self.assertEqual(auth.authenticate("Bearer bob-key-00001").user, "bob")

    def test_unknown_and_missing(self) -> None:
        """When the key is unknown, absent, empty or not Bearer, the answer is 401 and the key is not logged."""
        auth = self.authenticator(api_keys=(ApiKey("alice", _sha(API_KEY)),))
        for header in (None, "Bearer ", "Basic " + API_KEY, "Bearer wrong-key-1234", b"Bearer \xff"):
            error = self.assertRaises(ConsoleError, auth.authenticate, header)
            self.assertEqual(error.http_status, 401)
        self.assertNotIn("wrong-key-1234", self.logged())

    def test_reload(self) -> None:
        """When reloaded, a removed key is refused and a new one accepted."""
        auth = self.authenticator(api_keys=(ApiKey("alice", _sha(API_KEY)),))
        auth.reload(AuthConfig(api_keys=(ApiKey("bob", _sha("bob-key-00001")),)))
        self.assertRefused(auth, API_KEY)
        self.assertEqual(auth.authenticate("Bearer bob-key-00001").user, "bob")

    def test_jwt_shape_without_jwt_config(self) -> None:
        """When JWT is off, a JWT is only an unknown API key."""
        auth = self.authenticator(api_keys=(ApiKey("alice", _sha(API_KEY)),))
        self.assertFalse(auth.jwt_enabled)
        self.assertRefused(auth, self.token())

    def test_helpers(self) -> None:
        """When a header is parsed, the Bearer credential is found and JWT shapes are told from keys."""
        self.assertEqual(bearer_credential(b"bearer  abc "), "abc")
        self.assertEqual(bearer_credential("Token abc"), "")
        self.assertIsNone(bearer_credential(None))
        self.assertTrue(looks_like_jwt(self.token()))
        self.assertFalse(looks_like_jwt(API_KEY))
        self.assertFalse(looks_like_jwt("a.b.c"))


class JWTAcceptTests(JWTCase):
    def test_valid_rs256(self) -> None:
        """When a valid RS256 token is presented, its sub and vms claims make the principal."""
        auth = self.authenticator(self.jwt_config(issuer=ISSUER, audience=AUDIENCE))
        principal = auth.authenticate("Bearer " + self.token())
        self.assertEqual(principal, Principal(user="carol", vms=("web-*",), admin=False, method="jwt", key_id="jwt:carol"))

    def test_valid_es256_and_eddsa(self) -> None:
        """When ES256 and EdDSA tokens are signed with the configured key, they are accepted."""
        for private, algorithm in ((_EC, "ES256"), (_ED, "EdDSA")):
            auth = self.authenticator(self.jwt_config((algorithm,), _public_pem(private), audience=AUDIENCE))
            principal = auth.authenticate("Bearer " + self.token(key=private, algorithm=algorithm))
            self.assertEqual(principal.user, "carol")

    def test_valid_hs256(self) -> None:
        """When an HS256 token is signed with the configured secret (file with a trailing newline), it is accepted."""
        auth = self.authenticator(self.jwt_config(("HS256",), HS_SECRET + b"\n", audience=AUDIENCE))
        principal = auth.authenticate("Bearer " + self.token(key=HS_SECRET, algorithm="HS256"))
        self.assertEqual(principal.user, "carol")

    def test_certificate_key_file(self) -> None:
        """When the key file is an X.509 certificate, its public key verifies tokens."""
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.x509.oid import NameOID

        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sso")])
        start = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(_RSA.public_key())
            .serial_number(1).not_valid_before(start).not_valid_after(start + datetime.timedelta(days=30))
            .sign(_RSA, hashes.SHA256())
        )  # fmt: skip
        auth = self.authenticator(self.jwt_config(data=cert.public_bytes(serialization.Encoding.PEM), audience=AUDIENCE))
        self.assertEqual(auth.authenticate("Bearer " + self.token()).user, "carol")

    def test_preferred_username(self) -> None:
        """When there is no sub, preferred_username names the user."""
        auth = self.authenticator(self.jwt_config(audience=AUDIENCE))
        token = self.token(self.claims(sub=None, preferred_username="dave"))
        self.assertEqual(auth.authenticate("Bearer " + token).user, "dave")

    def test_no_vms_claim(self) -> None:
        """When the vms claim is absent, the principal may reach no VM."""
        auth = self.authenticator(self.jwt_config(audience=AUDIENCE))
        self.assertEqual(auth.authenticate("Bearer " + self.token(self.claims(vms=None))).vms, ())

    def test_admin_claims(self) -> None:
        """When admin is true, or roles or scope hold vaporproxy:admin, the principal is an admin; otherwise not."""
        auth = self.authenticator(self.jwt_config(audience=AUDIENCE))
        cases = [
            ({"admin": True}, True),
            ({"roles": ["user", "vaporproxy:admin"]}, True),
            ({"scope": "openid vaporproxy:admin"}, True),
            ({"scope": ["vaporproxy:admin"]}, True),
            ({"admin": "true"}, False),
            ({"roles": "vaporproxy:admin"}, False),
            ({"scope": "openid vaporproxy:admins"}, False),
            ({}, False),
        ]
        for extra, admin in cases:
            principal = auth.authenticate("Bearer " + self.token(self.claims(**extra)))
            self.assertEqual(principal.admin, admin, extra)

    def test_mfa_present(self) -> None:
        """When MFA is required and amr holds mfa, otp, hwk or sc, the token is accepted."""
        auth = self.authenticator(self.jwt_config(audience=AUDIENCE, require_mfa=True))
        for amr in (["pwd", "mfa"], ["otp"], ["hwk", "pwd"], ["sc"]):
            self.assertEqual(auth.authenticate("Bearer " + self.token(self.claims(amr=amr))).user, "carol")

    def test_leeway(self) -> None:
        """When exp passed less than the leeway ago, the token is still accepted."""
        auth = self.authenticator(self.jwt_config(audience=AUDIENCE))
        token = self.token(self.claims(exp=int(NOW) - int(LEEWAY) + 5))
        self.assertEqual(auth.authenticate("Bearer " + token).user, "carol")

    def test_reload_reads_key_again(self) -> None:
        """When reloaded with a new key file, tokens of the old key are refused and of the new one accepted."""
        auth = self.authenticator(self.jwt_config(audience=AUDIENCE))
        auth.reload(AuthConfig(jwt=self.jwt_config(("ES256",), _public_pem(_EC), audience=AUDIENCE)))
        self.assertRefused(auth, self.token(), "algorithm not allowed")
        self.assertEqual(auth.authenticate("Bearer " + self.token(key=_EC, algorithm="ES256")).user, "carol")

    def test_failed_reload_keeps_old(self) -> None:
        """When a reload fails (unreadable key file), the old keys and JWT settings stay."""
        auth = self.authenticator(self.jwt_config(audience=AUDIENCE), api_keys=(ApiKey("alice", _sha(API_KEY)),))
        bad = JWTConfig(("RS256",), os.path.join(self.dir, "missing.pem"))
        self.assertRaises(ConfigError, auth.reload, AuthConfig(api_keys=(), jwt=bad))
        self.assertEqual(auth.authenticate("Bearer " + API_KEY).user, "alice")
        self.assertEqual(auth.authenticate("Bearer " + self.token()).user, "carol")


class JWTRefuseTests(JWTCase):
    def setUp(self) -> None:
        super().setUp()
        self.auth = self.authenticator(
            self.jwt_config(issuer=ISSUER, audience=AUDIENCE), api_keys=(ApiKey("alice", _sha(API_KEY)),)
        )

    def test_expired(self) -> None:
        """When exp is past by more than the leeway on the injected clock, the token is refused."""
        token = self.token()
        self.assertEqual(self.auth.authenticate("Bearer " + token).user, "carol")
        self.clock.advance(300 + LEEWAY)
        self.assertRefused(self.auth, token, "expired")

    def test_exp_required(self) -> None:
        """When there is no exp claim, or it is not a number, the token is refused."""
        self.assertRefused(self.auth, self.token(self.claims(exp=None)), "missing exp claim")
        self.assertRefused(self.auth, self.token(self.claims(exp="2099-01-01")), "exp claim is not a number")

    def test_not_yet_valid(self) -> None:
        """When nbf or iat lie beyond the leeway in the future, the token is refused until then."""
        for claim, reason in (("nbf", "not yet valid (nbf)"), ("iat", "not yet valid (iat in the future)")):
            token = self.token(self.claims(**{claim: int(NOW) + 120}))
            self.assertRefused(self.auth, token, reason)
        self.clock.advance(120)
        self.assertEqual(self.auth.authenticate("Bearer " + token).user, "carol")

    def test_wrong_issuer(self) -> None:
        """When iss differs from the configured issuer or is missing, the token is refused."""
        self.assertRefused(self.auth, self.token(self.claims(iss="https://evil.example.com")), "wrong issuer")
        self.assertRefused(self.auth, self.token(self.claims(iss=None)), "missing iss claim")

    def test_wrong_audience(self) -> None:
        """When aud does not hold the configured audience or is missing, the token is refused."""
        self.assertRefused(self.auth, self.token(self.claims(aud="other-service")), "wrong audience")
        self.assertRefused(self.auth, self.token(self.claims(aud=None)), "missing aud claim")

    def test_aud_without_configured_audience(self) -> None:
        """When no audience is configured, a token that carries aud is refused."""
        auth = self.authenticator(self.jwt_config())
        self.assertRefused(auth, self.token(), "has an aud claim but auth.jwt.audience is not set")
        self.assertEqual(auth.authenticate("Bearer " + self.token(self.claims(aud=None))).user, "carol")

    def test_alg_none(self) -> None:
        """When the token is unsigned (alg none), it is refused."""
        token = jwt.encode(self.claims(), None, algorithm="none")
        self.assertTrue(looks_like_jwt(token))
        self.assertRefused(self.auth, token, "algorithm not allowed")
        header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
        self.assertRefused(self.auth, header + "." + _b64(json.dumps(self.claims()).encode()) + ".", "algorithm not allowed")

    def test_other_algorithm(self) -> None:
        """When the token uses an algorithm not configured (ES256 for RS256), it is refused."""
        self.assertRefused(self.auth, self.token(key=_EC, algorithm="ES256"), "algorithm not allowed")

    def test_hmac_with_public_key_confusion(self) -> None:
        """When a token is HS256-signed with the RSA public key as secret, it is refused."""
        payload = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "." + _b64(json.dumps(self.claims()).encode())
        import hmac as hmac_module

        signature = hmac_module.new(_public_pem(_RSA), payload.encode(), hashlib.sha256).digest()
        self.assertRefused(self.auth, payload + "." + _b64(signature), "algorithm not allowed")

    def test_bad_signature(self) -> None:
        """When the token is signed by another key or its payload was altered, it is refused."""
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.assertRefused(self.auth, self.token(key=other), "bad signature")
        head, _, signature = self.token().split(".")
        forged = _b64(json.dumps(self.claims(admin=True)).encode())
        self.assertRefused(self.auth, f"{head}.{forged}.{signature}", "bad signature")

    def test_garbage(self) -> None:
        """When the credential is garbage, JWT-shaped or not, it is refused."""
        header = _b64(b'{"alg":"RS256"}')
        for junk in ("x.y.z", f"{header}.!!!.abc", f"{header}.e30.", f"{header}.{_b64(b'[1]')}.AAAA", "a" * 20000):
            self.assertRefused(self.auth, junk)

    def test_missing_mfa(self) -> None:
        """When MFA is required and amr is missing or holds only pwd/swk, the token is refused."""
        auth = self.authenticator(self.jwt_config(issuer=ISSUER, audience=AUDIENCE, require_mfa=True))
        for amr in (None, ["pwd"], ["swk", "pwd"], "mfa"):
            self.assertRefused(auth, self.token(self.claims(amr=amr)), "multi-factor authentication required (amr)")

    def test_bad_claims(self) -> None:
        """When sub is missing or vms is not a list of strings, the token is refused."""
        self.assertRefused(self.auth, self.token(self.claims(sub=None)), "no sub or preferred_username claim")
        self.assertRefused(self.auth, self.token(self.claims(vms="web-*")), "vms claim is not a list of strings")
        self.assertRefused(self.auth, self.token(self.claims(vms=[1])), "vms claim is not a list of strings")

    def test_not_an_api_key(self) -> None:
        """When JWT is on, a JWT-shaped credential is never matched against API keys."""
        token = self.token(key=_EC, algorithm="ES256")
        auth = self.authenticator(self.jwt_config(), api_keys=(ApiKey("alice", _sha(token)),))
        self.assertRefused(auth, token, "algorithm not allowed")
        self.assertRefused(auth, API_KEY, "unknown credential")

    def test_token_not_logged(self) -> None:
        """When a JWT is refused, the log has its sub and reason but not the token."""
        token = self.token(self.claims(iss="https://evil.example.com"))
        self.assertRefused(self.auth, token)
        text = self.logged()
        self.assertNotIn(token, text)
        self.assertNotIn(token.split(".")[2], text)
        self.assertIn("carol", text)
        self.assertIn("wrong issuer", text)
        self.assertIn(hashlib.sha256(token.encode()).hexdigest()[:12], text)


class KeyLoadTests(JWTCase):
    def assertConfigError(self, config: JWTConfig, *fragments: str) -> None:
        error = self.assertRaises(ConfigError, load_jwt_key, config)
        text = str(error)
        self.assertNotIn("\n", text)
        for fragment in fragments:
            self.assertIn(fragment, text)

    def test_mixed_hmac_and_public(self) -> None:
        """When HS256 and RS256 are configured together, the config is refused."""
        self.assertConfigError(self.jwt_config(("HS256", "RS256")), "auth.jwt.algorithms", "mixes HS*")

    def test_hmac_with_public_key_file(self) -> None:
        """When HS256 is configured with a PEM public key file, the config is refused."""
        self.assertConfigError(self.jwt_config(("HS256",)), "auth.jwt.key_file", "not a shared secret")

    def test_short_secret(self) -> None:
        """When an HMAC secret is shorter than its hash, the config is refused."""
        self.assertConfigError(self.jwt_config(("HS256",), b"short-secret\n"), "12-byte", "at least 32")
        self.assertConfigError(self.jwt_config(("HS512",), HS_SECRET), "at least 64")

    def test_private_key(self) -> None:
        """When the key file holds a private key, the config is refused."""
        self.assertConfigError(self.jwt_config(data=_private_pem(_RSA)), "private key")

    def test_key_does_not_fit(self) -> None:
        """When the public key does not fit an algorithm (type, curve or size), the config is refused."""
        self.assertConfigError(self.jwt_config(("ES256",), _public_pem(_RSA)), "does not fit ES256")
        self.assertConfigError(self.jwt_config(("RS256", "ES256"), _public_pem(_RSA)), "does not fit ES256")
        self.assertConfigError(self.jwt_config(("ES384",), _public_pem(_EC)), "secp256r1")
        small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        self.assertConfigError(self.jwt_config(("RS256",), _public_pem(small)), "1024 bits")
        self.assertConfigError(self.jwt_config(("EdDSA",), _public_pem(_EC)), "Ed25519")

    def test_not_pem(self) -> None:
        """When the key file is not PEM, or cannot be read, the config is refused."""
        self.assertConfigError(self.jwt_config(data=b"hello"), "not a PEM public key")
        self.assertConfigError(JWTConfig(("RS256",), os.path.join(self.dir, "nope.pem")), "cannot be read")

    def test_none_algorithm(self) -> None:
        """When none is configured (bypassing the parser), the config is refused."""
        self.assertConfigError(self.jwt_config(("none",)), "'none'")
