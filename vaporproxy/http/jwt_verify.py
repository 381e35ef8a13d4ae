"""
Checking one JWT against the configured issuer: L{JWTVerifier} (signature
and claims with PyJWT, time claims against the injected clock) and
L{looks_like_jwt} (which credentials are JWTs at all).

    - Only the configured C{algorithms} are accepted (C{none} never is;
      the config parser does not even allow it).
    - C{exp} is required; C{exp}, C{nbf} and C{iat} (when present) are
      checked against the injected clock with L{LEEWAY} seconds of leeway
      (C{iat} in the future means "not yet valid").
    - C{iss} must equal C{issuer} when one is configured.
    - C{aud} must contain C{audience} when one is configured.  With no
      audience configured, a token that carries an C{aud} claim is refused
      (PyJWT's rule: it was meant for someone else).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import jwt

from vaporproxy.config import JWTConfig
from vaporproxy.http.principal import Refused

#: Seconds of clock skew allowed on C{exp}, C{nbf} and C{iat}.
LEEWAY = 30.0

_JWS_RE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")
_SUB_LOG_MAX = 64

#: PyJWT's refusals, as the log line's reason.
_REASONS = (
    (jwt.InvalidAlgorithmError, "algorithm not allowed"),
    (jwt.InvalidSignatureError, "bad signature"),
    (jwt.InvalidIssuerError, "wrong issuer"),
    (jwt.InvalidKeyError, "key does not fit the algorithm"),
)


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


@dataclass(frozen=True)
class JWTVerifier:
    """
    The configured issuer's settings (C{auth.jwt}) and its loaded key.
    """

    config: JWTConfig
    key: Any

    def claims(self, credential: str, now: float) -> Mapping[str, Any]:
        """
        The verified claims of C{credential} at time C{now}.

        @raise Refused: with the reason for the log.
        """
        claims = self._decode(credential)
        if not isinstance(claims, dict):
            raise Refused("claims are not a JSON object")
        exp = _numeric_date(claims, "exp")
        if exp is None or exp <= now - LEEWAY:
            raise Refused("expired")
        nbf = _numeric_date(claims, "nbf")
        if nbf is not None and nbf > now + LEEWAY:
            raise Refused("not yet valid (nbf)")
        iat = _numeric_date(claims, "iat")
        if iat is not None and iat > now + LEEWAY:
            raise Refused("not yet valid (iat in the future)")
        return claims

    def _decode(self, credential: str) -> Any:
        config = self.config
        try:
            return jwt.decode(
                credential,
                key=self.key,
                algorithms=list(config.algorithms),
                issuer=config.issuer,
                audience=config.audience,
                # Time claims are checked by the caller against the injected clock.
                options={
                    "verify_signature": True,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "require": ["exp"],
                },
            )
        except jwt.MissingRequiredClaimError as e:
            raise Refused(f"missing {e.claim} claim") from None
        except jwt.InvalidAudienceError:
            raise Refused("wrong audience" if config.audience else "has an aud claim but auth.jwt.audience is not set") from None
        except jwt.PyJWTError as e:
            for kind, reason in _REASONS:
                if isinstance(e, kind):
                    raise Refused(reason) from None
            raise Refused(f"malformed ({type(e).__name__})") from None


def _numeric_date(claims: Mapping[str, Any], name: str) -> Optional[float]:
    """
    The NumericDate claim C{name}; C{None} when absent.

    @raise Refused: when it is present but not a number.
    """
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise Refused(f"{name} claim is not a number")
    return float(value)


def claimed_sub(credential: str) -> Optional[str]:
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
