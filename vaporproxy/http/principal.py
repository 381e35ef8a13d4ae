"""
Who an authenticated caller is: L{Principal}, its credential identity
(L{key_id_of}, L{jwt_key_id}), and how verified JWT claims become one
(L{principal_from_claims}).

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
    - With C{require_mfa: true}, the C{amr} claim (RFC 8176) must be a list
      holding at least one of L{MFA_AMR_VALUES}: C{mfa} (the IdP says
      several factors were used), C{otp} (one-time password), C{hwk}
      (proof of a hardware key), C{sc} (smart card).  IdPs add these only
      for a second factor; C{pwd}, C{swk}, C{kba} and the like do not count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple

from vaporproxy.config import ApiKey, api_key_id

#: C{amr} values (RFC 8176) that satisfy C{require_mfa}.
MFA_AMR_VALUES = frozenset({"mfa", "otp", "hwk", "sc"})

#: The role / scope that makes a JWT's subject an administrator.
ADMIN_ROLE = "vaporproxy:admin"


class Refused(Exception):
    """
    A JWT was refused; C{reason} is for the log only (the caller gets 401).
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


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
    #: The most this caller may have: "control", or "view" (an API key's
    #: C{access}, a JWT's C{vapor_access} claim).
    access: str = "control"


def key_id_of(api_key: ApiKey) -> str:
    """The identity of a configured API key (L{vaporproxy.config.api_key_id})."""
    return api_key_id(api_key)


def jwt_key_id(user: str) -> str:
    """
    The identity of a JWT caller: the issuer's tokens are one credential
    per user (C{sub}).
    """
    return "jwt:" + user


def principal_of_key(key: ApiKey) -> Principal:
    """The L{Principal} of a matched API key."""
    return Principal(user=key.user, vms=tuple(key.vms), admin=key.admin, method="api_key", key_id=key_id_of(key),
                     access=key.access)  # fmt: skip


def principal_from_claims(claims: Mapping[str, Any], require_mfa: bool = False) -> Principal:
    """
    The L{Principal} of verified JWT C{claims} (see the module docstring).

    @raise Refused: when a claim is missing or malformed, or MFA is
        required and absent.
    """
    user = claims.get("sub")
    if user is None or user == "":
        user = claims.get("preferred_username")
    if not isinstance(user, str) or not user.strip():
        raise Refused("no sub or preferred_username claim")
    if require_mfa:
        amr = claims.get("amr")
        if not isinstance(amr, list) or not any(isinstance(v, str) and v in MFA_AMR_VALUES for v in amr):
            raise Refused("multi-factor authentication required (amr)")
    vms = claims.get("vms", [])
    if not isinstance(vms, list) or not all(isinstance(v, str) and v for v in vms):
        raise Refused("vms claim is not a list of strings")
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
        # Anything but an explicit "control" from a token that says vapor_access is view-only.
        access="view" if claims.get("vapor_access", "control") != "control" else "control",
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
