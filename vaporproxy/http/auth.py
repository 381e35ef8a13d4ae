"""
Who is calling the HTTP API: L{Authenticator} turns an C{Authorization}
header into a L{Principal} or refuses it with C{ConsoleError(UNAUTHORIZED)}
(HTTP 401).

Two kinds of Bearer credential are accepted:

    - B{API keys} (C{auth.api_keys}): the key's SHA-256 is compared with
      every configured hash with L{hmac.compare_digest} (all of them, every
      time, so the time taken does not say which key nearly matched).
    - B{JWTs} (C{auth.jwt}), checked with PyJWT.  A credential that looks
      like a compact JWS (three base64url parts whose first part is a JSON
      object) is checked as a JWT when C{auth.jwt} is set and never as an
      API key; anything else is checked as an API key.

JWT verification
================

    - The key is read from C{key_file} when the configuration is loaded or
      reloaded (never per request).  For C{HS256}/C{HS384}/C{HS512} the file
      holds the raw shared secret (a trailing line break is dropped); it
      must be at least as long as the hash (32, 48, 64 bytes; RFC 7518
      3.2) and must not be a PEM or SSH key.  For C{RS*}/C{PS*}/C{ES*}/
      C{EdDSA} it holds a PEM public key or an X.509 certificate (PEM);
      a private key is refused (the proxy never needs one), RSA keys must
      have at least 2048 bits and EC keys must be on the curve of every
      configured C{ES*} algorithm.  A configuration mixing C{HS*} with any
      public-key algorithm is refused: one key file cannot be both, and
      mixing them is the classic algorithm-confusion hole.
    - Only the configured C{algorithms} are accepted (C{none} never is;
      the config parser does not even allow it).
    - C{exp} is required; C{exp}, C{nbf} and C{iat} (when present) are
      checked against the injected clock with L{LEEWAY} seconds of leeway
      (C{iat} in the future means "not yet valid").
    - C{iss} must equal C{issuer} when one is configured.
    - C{aud} must contain C{audience} when one is configured.  With no
      audience configured, a token that carries an C{aud} claim is refused
      (PyJWT's rule: it was meant for someone else).
    - With C{require_mfa: true}, the C{amr} claim (RFC 8176) must be a list
      holding at least one of L{MFA_AMR_VALUES}: C{mfa} (the IdP says
      several factors were used), C{otp} (one-time password), C{hwk}
      (proof of a hardware key), C{sc} (smart card).  IdPs add these only
      for a second factor; C{pwd}, C{swk}, C{kba} and the like do not count.

JWT claims read
===============

    - C{sub}: the user name; when absent or empty, C{preferred_username}.
      Neither (or not a string) refuses the token.
    - C{vms}: a list of VM name/UUID patterns (C{fnmatch}, like an API
      key's C{vms}); absent means no VM at all.  Anything but a list of
      strings refuses the token.
    - admin: C{"admin": true} (the JSON boolean, not a string), or a
      C{roles} list containing C{vaporproxy:admin}, or a C{scope} (a
      space-separated string or a list) containing C{vaporproxy:admin}.

Logging: a credential is never logged, only the first 12 hex digits of
its SHA-256, with the claimed C{sub} and the reason it was refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from vaporproxy.config import ApiKey, AuthConfig, ConfigError, JWTConfig
from vaporproxy.errors import ConsoleError, ErrorCode

#: Seconds of clock skew allowed on C{exp}, C{nbf} and C{iat}.
LEEWAY = 30.0

#: C{amr} values (RFC 8176) that satisfy C{require_mfa}.
MFA_AMR_VALUES = frozenset({"mfa", "otp", "hwk", "sc"})

#: The role / scope that makes a JWT's subject an administrator.
ADMIN_ROLE = "vaporproxy:admin"

#: Longest credential looked at (a header this long is not a key or a sane JWT).
MAX_CREDENTIAL_LENGTH = 16 * 1024

_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
_EC_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
_RSA_MIN_BITS = 2048
_JWS_RE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")
_SUB_LOG_MAX = 64

PublicKey = Union[
    rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey, ed448.Ed448PublicKey
]

#: Module level: a Logger on a class takes the class's own name as namespace.
log = Logger(namespace="vaporproxy.auth.Authenticator")


@dataclass(frozen=True)
class Principal:
    """
    An authenticated caller.

    @ivar user: the user name (an API key's C{user}, a JWT's C{sub}).
    @ivar vms: the VM name/UUID patterns it may open consoles of.
    @ivar admin: whether it may use the admin routes.
    @ivar method: C{"api_key"} or C{"jwt"}.
    @ivar key_id: the credential's identity for limits and revocation
        (L{key_id_of}): tokens carry it.
    @ivar amr: a JWT's C{amr} claim (how the user signed in), for step-up.
    @ivar auth_time: a JWT's C{auth_time} claim (when), for step-up.
    """

    user: str
    vms: Tuple[str, ...] = ()
    admin: bool = False
    method: str = "api_key"
    key_id: str = ""
    amr: Tuple[str, ...] = ()
    auth_time: Optional[float] = None


def key_id_of(api_key: ApiKey) -> str:
    """
    The identity of a configured API key: its stored SHA-256's first 16
    hex digits (the SHA-256 of a hash: no secret).
    """
    return "key:" + hashlib.sha256(api_key.sha256.encode("ascii")).hexdigest()[:16]


def jwt_key_id(user: str) -> str:
    """
    The identity of a JWT caller: the issuer's tokens are one credential
    per user (C{sub}).
    """
    return "jwt:" + user


def credential_hash(credential: Union[str, bytes]) -> str:
    """
    The log-safe short hash of a credential: 12 hex digits of its SHA-256.
    """
    data = credential.encode("utf-8") if isinstance(credential, str) else credential
    return hashlib.sha256(data).hexdigest()[:12]


def bearer_credential(header: Optional[Union[str, bytes]]) -> Optional[str]:
    """
    The credential of an C{Authorization: Bearer …} header value; C{None}
    when there is no header, C{""} when it is not a usable Bearer one.
    """
    if header is None:
        return None
    if isinstance(header, bytes):
        try:
            header = header.decode("ascii")
        except UnicodeDecodeError:
            return ""
    scheme, _, credential = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return ""
    return credential.strip()


def looks_like_jwt(credential: str) -> bool:
    """
    Whether C{credential} has the shape of a compact JWS: three base64url
    parts, the first a JSON object (the JOSE header).
    """
    if not _JWS_RE.match(credential):
        return False
    head = credential.split(".", 1)[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, binascii.Error, RecursionError):
        return False
    return isinstance(header, dict)


# ---------------------------------------------------------------------------
# Key loading (at configuration time)
# ---------------------------------------------------------------------------


def _key_error(config: JWTConfig, what: str) -> ConfigError:
    return ConfigError(f"auth.jwt.key_file: {config.key_file!r} {what}")


def load_jwt_key(config: JWTConfig) -> Union[bytes, PublicKey]:
    """
    Read and check the verification key of C{config}: the raw secret for
    C{HS*}, a public key for the other algorithms.

    @raise ConfigError: one line naming C{auth.jwt.key_file} or
        C{auth.jwt.algorithms}, when the file cannot be read or does not
        fit the algorithms.
    """
    algorithms = tuple(config.algorithms)
    if not algorithms:
        raise ConfigError("auth.jwt.algorithms: [] is not a list of algorithms (expected at least one)")
    if any(a.lower() == "none" for a in algorithms):
        raise ConfigError("auth.jwt.algorithms: 'none' is not a JWT algorithm (expected a signature algorithm)")
    hmac_algs = [a for a in algorithms if a.startswith("HS")]
    if hmac_algs and len(hmac_algs) != len(algorithms):
        raise ConfigError(
            f"auth.jwt.algorithms: {list(algorithms)!r} mixes HS* with public-key algorithms"
            " (expected only HS* with a shared secret, or only RS*/PS*/ES*/EdDSA with a public key)"
        )
    try:
        with open(config.key_file, "rb") as f:
            data = f.read()
    except OSError as e:
        raise _key_error(config, f"cannot be read ({e.strerror or e})") from None
    if hmac_algs:
        return _load_secret(config, data, hmac_algs)
    return _load_public_key(config, data, algorithms)


def _load_secret(config: JWTConfig, data: bytes, algorithms: Sequence[str]) -> bytes:
    secret = data[:-2] if data.endswith(b"\r\n") else data[:-1] if data.endswith(b"\n") else data
    head = secret.lstrip()
    if head.startswith(b"-----BEGIN") or head.startswith((b"ssh-", b"ecdsa-sha2-")):
        raise _key_error(
            config,
            "holds a PEM/SSH key, not a shared secret (expected the raw HMAC secret for "
            + ", ".join(algorithms) + "; use RS*/ES*/EdDSA for a public key)",
        )
    needed = max(_HMAC_MIN_BYTES[a] for a in algorithms)
    if len(secret) < needed:
        raise _key_error(
            config, f"holds a {len(secret)}-byte secret (expected at least {needed} bytes for {', '.join(algorithms)})"
        )
    return secret


def _load_public_key(config: JWTConfig, data: bytes, algorithms: Sequence[str]) -> PublicKey:
    if b"PRIVATE KEY-----" in data:
        raise _key_error(config, "holds a private key (expected only the public key, or a certificate)")
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key: Any = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = load_pem_public_key(data)
    except (ValueError, TypeError):
        raise _key_error(config, "is not a PEM public key or certificate (expected e.g. openssl pkey -pubout output)") from None
    for algorithm in algorithms:
        problem = _key_mismatch(key, algorithm)
        if problem:
            raise _key_error(config, f"does not fit {algorithm} ({problem})")
    return key


def _key_mismatch(key: Any, algorithm: str) -> Optional[str]:
    """
    Why C{key} cannot verify C{algorithm}, or C{None} when it can.
    """
    if algorithm[:2] in ("RS", "PS"):
        if not isinstance(key, rsa.RSAPublicKey):
            return "expected an RSA public key"
        if key.key_size < _RSA_MIN_BITS:
            return f"the RSA key has {key.key_size} bits; expected at least {_RSA_MIN_BITS}"
        return None
    if algorithm in _EC_CURVES:
        if not isinstance(key, ec.EllipticCurvePublicKey):
            return "expected an EC public key"
        if key.curve.name != _EC_CURVES[algorithm]:
            return f"the key is on {key.curve.name}; expected {_EC_CURVES[algorithm]}"
        return None
    if algorithm == "EdDSA":
        if not isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            return "expected an Ed25519 or Ed448 public key"
        return None
    return "unsupported algorithm"


# ---------------------------------------------------------------------------
# The authenticator
# ---------------------------------------------------------------------------


class _Refused(Exception):
    """
    A JWT was refused; C{reason} is for the log only.
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class _JWTVerifier:
    config: JWTConfig
    key: Any


class Authenticator:
    """
    Authenticate API callers by API key or JWT; see the module docstring.

    @ivar clock: the time source for JWT C{exp}/C{nbf}/C{iat}.
    """


    def __init__(self, auth: AuthConfig, clock: IReactorTime):
        """
        @raise ConfigError: when the JWT key cannot be loaded.
        """
        self.clock = clock
        self._api_keys: Tuple[ApiKey, ...] = ()
        self._jwt: Optional[_JWTVerifier] = None
        self.reload(auth)

    def reload(self, auth: AuthConfig) -> None:
        """
        Take new API keys and JWT settings (the key file is read again).
        On error nothing changes.

        @raise ConfigError: when the JWT key cannot be loaded.
        """
        verifier = _JWTVerifier(auth.jwt, load_jwt_key(auth.jwt)) if auth.jwt is not None else None
        self._api_keys = tuple(auth.api_keys)
        self._jwt = verifier

    @property
    def jwt_enabled(self) -> bool:
        return self._jwt is not None

    def authenticate(self, header: Optional[Union[str, bytes]]) -> Principal:
        """
        The caller presenting the C{Authorization} header value C{header}.

        @raise ConsoleError: UNAUTHORIZED (401) when there is no credential
            or it is not valid.
        """
        credential = bearer_credential(header)
        if credential is None:
            self._refuse("no credential")
        if not credential:
            self._refuse("not a Bearer credential")
        if len(credential) > MAX_CREDENTIAL_LENGTH:
            self._refuse("credential too long", token_hash=credential_hash(credential))
        verifier = self._jwt
        if verifier is not None and looks_like_jwt(credential):
            return self._authenticate_jwt(verifier, credential)
        key = self._match_key(credential)
        if key is None:
            self._refuse("unknown credential", token_hash=credential_hash(credential))
        return Principal(user=key.user, vms=tuple(key.vms), admin=key.admin, method="api_key", key_id=key_id_of(key))

    def _refuse(self, why: str, **fields: Any) -> Any:
        log.info("rejected API request: {why}", why=why, **fields)
        raise ConsoleError(ErrorCode.UNAUTHORIZED)

    def _match_key(self, credential: str) -> Optional[ApiKey]:
        """
        The configured key whose SHA-256 matches C{credential}, comparing
        with every key in constant time per key.
        """
        digest = hashlib.sha256(credential.encode("utf-8")).hexdigest()
        found: Optional[ApiKey] = None
        for key in self._api_keys:
            if hmac.compare_digest(digest, key.sha256.lower()) and found is None:
                found = key
        return found

    # -- JWT -----------------------------------------------------------------

    def _authenticate_jwt(self, verifier: _JWTVerifier, credential: str) -> Principal:
        try:
            claims = self._verify(verifier, credential)
            principal = principal_from_claims(claims, require_mfa=verifier.config.require_mfa)
        except _Refused as e:
            log.info(
                "rejected JWT {token_hash} claiming sub {sub!r}: {reason}",
                reason=e.reason,
                sub=_claimed_sub(credential),
                token_hash=credential_hash(credential),
            )
            raise ConsoleError(ErrorCode.UNAUTHORIZED) from None
        log.debug(
            "JWT accepted for {sub} (admin: {admin})",
            sub=principal.user,
            admin=principal.admin,
            token_hash=credential_hash(credential),
        )
        return principal

    def _verify(self, verifier: _JWTVerifier, credential: str) -> Mapping[str, Any]:
        config = verifier.config
        try:
            claims = jwt.decode(
                credential,
                key=verifier.key,
                algorithms=list(config.algorithms),
                issuer=config.issuer,
                audience=config.audience,
                # Time claims are checked below against the injected clock.
                options={
                    "verify_signature": True,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "require": ["exp"],
                },
            )
        except jwt.InvalidAlgorithmError:
            raise _Refused("algorithm not allowed") from None
        except jwt.InvalidSignatureError:
            raise _Refused("bad signature") from None
        except jwt.MissingRequiredClaimError as e:
            raise _Refused(f"missing {e.claim} claim") from None
        except jwt.InvalidIssuerError:
            raise _Refused("wrong issuer") from None
        except jwt.InvalidAudienceError:
            raise _Refused("wrong audience" if config.audience else "has an aud claim but auth.jwt.audience is not set") from None
        except jwt.InvalidKeyError:
            raise _Refused("key does not fit the algorithm") from None
        except jwt.PyJWTError as e:
            raise _Refused(f"malformed ({type(e).__name__})") from None
        if not isinstance(claims, dict):
            raise _Refused("claims are not a JSON object")
        now = self.clock.seconds()
        exp = _numeric_date(claims, "exp")
        if exp is None or exp <= now - LEEWAY:
            raise _Refused("expired")
        nbf = _numeric_date(claims, "nbf")
        if nbf is not None and nbf > now + LEEWAY:
            raise _Refused("not yet valid (nbf)")
        iat = _numeric_date(claims, "iat")
        if iat is not None and iat > now + LEEWAY:
            raise _Refused("not yet valid (iat in the future)")
        return claims


def _numeric_date(claims: Mapping[str, Any], name: str) -> Optional[float]:
    """
    The NumericDate claim C{name}; C{None} when absent.

    @raise _Refused: when it is present but not a number.
    """
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise _Refused(f"{name} claim is not a number")
    return float(value)


def _claimed_sub(credential: str) -> Optional[str]:
    """
    The C{sub} a (possibly forged) JWT claims, cut short, for the log;
    C{None} when it cannot be read.
    """
    try:
        claims = jwt.decode(credential, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    sub = claims.get("sub") if isinstance(claims, dict) else None
    if not isinstance(sub, str):
        sub = claims.get("preferred_username") if isinstance(claims, dict) else None
    return sub[:_SUB_LOG_MAX] if isinstance(sub, str) else None


def principal_from_claims(claims: Mapping[str, Any], require_mfa: bool = False) -> Principal:
    """
    The L{Principal} of verified JWT C{claims} (see the module docstring).

    @raise _Refused: when a claim is missing or malformed, or MFA is
        required and absent.
    """
    user = claims.get("sub")
    if user is None or user == "":
        user = claims.get("preferred_username")
    if not isinstance(user, str) or not user.strip():
        raise _Refused("no sub or preferred_username claim")
    if require_mfa:
        amr = claims.get("amr")
        if not isinstance(amr, list) or not any(isinstance(v, str) and v in MFA_AMR_VALUES for v in amr):
            raise _Refused("multi-factor authentication required (amr)")
    vms = claims.get("vms", [])
    if not isinstance(vms, list) or not all(isinstance(v, str) and v for v in vms):
        raise _Refused("vms claim is not a list of strings")
    amr = claims.get("amr")
    auth_time = claims.get("auth_time")
    return Principal(
        user=user,
        vms=tuple(vms),
        admin=_is_admin(claims),
        method="jwt",
        key_id=jwt_key_id(user),
        amr=tuple(v for v in amr if isinstance(v, str)) if isinstance(amr, list) else (),
        auth_time=float(auth_time) if isinstance(auth_time, (int, float)) and not isinstance(auth_time, bool) else None,
    )


def _is_admin(claims: Mapping[str, Any]) -> bool:
    if claims.get("admin") is True:
        return True
    roles = claims.get("roles")
    if isinstance(roles, list) and ADMIN_ROLE in roles:
        return True
    scope = claims.get("scope")
    if isinstance(scope, str):
        scope = scope.split()
    return isinstance(scope, list) and ADMIN_ROLE in scope
