"""
The JWT verification key, read and checked when the configuration is
loaded or reloaded (never per request): L{load_jwt_key}.

    - For C{HS256}/C{HS384}/C{HS512} the file holds the raw shared secret
      (a trailing line break is dropped); it must be at least as long as
      the hash (32, 48, 64 bytes; RFC 7518 3.2) and must not be a PEM or
      SSH key.
    - For C{RS*}/C{PS*}/C{ES*}/C{EdDSA} it holds a PEM public key or an
      X.509 certificate (PEM); a private key is refused (the proxy never
      needs one), RSA keys must have at least 2048 bits and EC keys must be
      on the curve of every configured C{ES*} algorithm.
    - A configuration mixing C{HS*} with any public-key algorithm is
      refused: one key file cannot be both, and mixing them is the classic
      algorithm-confusion hole.  C{none} is never an algorithm.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from vaporproxy.config import ConfigError, JWTConfig

_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
_EC_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
_RSA_MIN_BITS = 2048

PublicKey = Union[
    rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey, ed448.Ed448PublicKey
]


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
