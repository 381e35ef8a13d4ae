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

The JWT's key is loaded by L{vaporproxy.http.jwt_keys}, the token checked
by L{vaporproxy.http.jwt_verify}, and its claims read by
L{vaporproxy.http.principal} (whose names this module also exports, for
its callers).

Logging: a credential is never logged, only the first 12 hex digits of
its SHA-256, with the claimed C{sub} and the reason it was refused.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any, Optional, Tuple, Union

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from vaporproxy.config import AuthConfig
from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.http.jwt_keys import load_jwt_key
from vaporproxy.http.jwt_verify import LEEWAY, JWTVerifier, claimed_sub, looks_like_jwt
from vaporproxy.http.principal import (
    ADMIN_ROLE,
    MFA_AMR_VALUES,
    Principal,
    Refused,
    jwt_key_id,
    key_id_of,
    principal_from_claims,
    principal_of_key,
)

__all__ = [
    "ADMIN_ROLE", "LEEWAY", "MAX_CREDENTIAL_LENGTH", "MFA_AMR_VALUES", "Authenticator", "Principal",
    "bearer_credential", "credential_hash", "jwt_key_id", "key_id_of", "load_jwt_key", "looks_like_jwt",
    "principal_from_claims",
]  # fmt: skip

#: Longest credential looked at (a header this long is not a key or a sane JWT).
MAX_CREDENTIAL_LENGTH = 16 * 1024

#: Module level: a Logger on a class takes the class's own name as namespace.
log = Logger(namespace="vaporproxy.auth.Authenticator")


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
        #: Each configured key's lower-case SHA-256 and its caller (a
        #: frozen L{Principal}, made once per reload, not per request).
        self._api_keys: Tuple[Tuple[str, Principal], ...] = ()
        self._jwt: Optional[JWTVerifier] = None
        self.reload(auth)

    def reload(self, auth: AuthConfig) -> None:
        """
        Take new API keys and JWT settings (the key file is read again).
        On error nothing changes.

        @raise ConfigError: when the JWT key cannot be loaded.
        """
        verifier = JWTVerifier(auth.jwt, load_jwt_key(auth.jwt)) if auth.jwt is not None else None
        self._api_keys = tuple((key.sha256.lower(), principal_of_key(key)) for key in auth.api_keys)
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
        principal = self._match_key(credential)
        if principal is None:
            self._refuse("unknown credential", token_hash=credential_hash(credential))
        return principal

    def authenticate_admin(self, header: Optional[Union[str, bytes]]) -> Principal:
        """
        The caller presenting C{header}, who must be an administrator.

        @raise ConsoleError: UNAUTHORIZED (401) as L{authenticate}, or 403
            when the caller is not an administrator.
        """
        principal = self.authenticate(header)
        if not principal.admin:
            raise ConsoleError(ErrorCode.UNAUTHORIZED, "Administrator access required", http_status=403)
        return principal

    def _refuse(self, why: str, **fields: Any) -> Any:
        log.info("rejected API request: {why}", why=why, **fields)
        raise ConsoleError(ErrorCode.UNAUTHORIZED)

    def _match_key(self, credential: str) -> Optional[Principal]:
        """
        The caller of the configured key whose SHA-256 matches
        C{credential}, comparing with every key in constant time per key.
        """
        digest = hashlib.sha256(credential.encode("utf-8")).hexdigest()
        found: Optional[Principal] = None
        for sha256, principal in self._api_keys:
            if hmac.compare_digest(digest, sha256) and found is None:
                found = principal
        return found

    # -- JWT -----------------------------------------------------------------

    def _authenticate_jwt(self, verifier: JWTVerifier, credential: str) -> Principal:
        try:
            claims = verifier.claims(credential, self.clock.seconds())
            principal = principal_from_claims(claims, require_mfa=verifier.config.require_mfa)
        except Refused as e:
            log.info(
                "rejected JWT {token_hash} claiming sub {sub!r}: {reason}",
                reason=e.reason,
                sub=claimed_sub(credential),
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
