"""
Revocation on SIGHUP (issue #11): removing or changing a credential revokes
what it no longer allows.

A token carries the identity of the credential that minted it
(C{Grant.key_id}).  L{Revocation.allows} answers, against the running
config, whether that credential still exists and still allows the token's
VM; L{RevokingTokenStore} refuses, at redemption, a token it no longer
allows; L{close_revoked} closes (4010) the live consoles it no longer
allows.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from vaporproxy.config import ApiKey, AuthConfig
from vaporproxy.console.events import ACCESS_REVOKED, SHARE_REVOKED
from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.http.console_info import key_allows
from vaporproxy.http.principal import key_id_of
from vaporproxy.http.shares import creator_allows
from vaporproxy.interfaces import SHARE_KEY_PREFIX, Grant, Redemption

log = Logger(namespace="vaporproxy.revocation")

#: How many revoked share ids a process remembers.  A token minted through
#: a share lives C{console.token_ttl} (seconds to minutes), so only the
#: shares revoked within that span matter; the oldest are forgotten first.
REVOKED_SHARES_KEPT = 10_000


class _VM(NamedTuple):
    """A grant's VM as L{creator_allows} reads it."""

    uuid: str
    name: Optional[str]


class Revocation:
    """
    The credentials of the running config, by identity.
    """

    def __init__(self, auth: AuthConfig):
        self._revoked_shares: "OrderedDict[str, None]" = OrderedDict()
        self.reload(auth)

    def revoke_share(self, share_id: str) -> None:
        """Refuse from now on what share C{share_id} granted (bounded memory)."""
        self._revoked_shares[share_id] = None
        self._revoked_shares.move_to_end(share_id)
        while len(self._revoked_shares) > REVOKED_SHARES_KEPT:
            self._revoked_shares.popitem(last=False)

    def reload(self, auth: AuthConfig) -> None:
        self._auth = auth
        self._keys: Dict[str, ApiKey] = {key_id_of(key): key for key in auth.api_keys}
        self._jwt = auth.jwt is not None

    def allows(self, grant: Grant) -> bool:
        """
        Whether the credential that minted C{grant} still exists and still
        allows its VM (by UUID, name, or the id the client used).  A JWT
        caller's VMs are its token's claims: its grants stand while JWTs are
        accepted at all.  A grant without an identity (minted before
        identities) stands.
        """
        key_id = grant.key_id
        if not key_id:
            return True
        if key_id.startswith("jwt:"):
            return self._jwt
        share_id = grant.share_id
        if share_id is not None:
            # Until the share is revoked, and while its creator may still
            # control the VM (a key removed or narrowed on SIGHUP).
            if share_id in self._revoked_shares:
                return False
            return creator_allows(self._auth, grant.user, _VM(grant.vm_uuid, grant.vm_name))
        key = self._keys.get(key_id)
        if key is None:
            return False
        return key_allows(key, grant.vm_uuid, grant.vm_name, grant.vm_ref)


class RevokingTokenStore:
    """
    A token store whose redemptions are refused (INVALID_TOKEN, "Token
    revoked") when the credential that minted the token no longer allows
    it; everything else is the wrapped store's.
    """

    def __init__(self, store: Any, revocation: Revocation):
        self.wrapped = store
        self.revocation = revocation

    @property
    def ttl(self) -> float:
        return self.wrapped.ttl

    @ttl.setter
    def ttl(self, value: float) -> None:
        self.wrapped.ttl = value

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)

    def issue(self, grant: Grant) -> Deferred:
        # (Not through __getattr__: every console info asks.)
        return self.wrapped.issue(grant)

    def redeem(self, token: str, vm_ref: str, client_ip: Optional[str]) -> Deferred:
        d = self.wrapped.redeem(token, vm_ref, client_ip)
        d.addCallback(self._still_allowed)
        return d

    def _still_allowed(self, redemption: Redemption) -> Redemption:
        grant = redemption.grant
        if not self.revocation.allows(grant):
            log.info("token of {user} for {vm_uuid} refused: its credential was revoked or narrowed",
                     user=grant.user, vm_uuid=grant.vm_uuid)  # fmt: skip
            raise ConsoleError(ErrorCode.INVALID_TOKEN, "Token revoked")
        return redemption


def terminate_share(registry: Any, token_store: Any, share_id: str) -> int:
    """
    Share C{share_id} was revoked: refuse the tokens minted through it
    (when C{token_store} is a L{RevokingTokenStore}) and close (4010) the
    consoles opened through it; answer how many.
    """
    revocation = getattr(token_store, "revocation", None)
    if revocation is not None:
        revocation.revoke_share(share_id)
    key_id = SHARE_KEY_PREFIX + share_id
    return close_revoked(registry, lambda grant: grant.key_id != key_id)


def grant_of(record: Any) -> Optional[Grant]:
    """
    The grant a live console was opened with (its owner's redemption).
    """
    grant = getattr(record, "grant", None)
    if grant is not None:
        return grant
    redemption = getattr(getattr(record, "owner", None), "_redemption", None)
    return getattr(redemption, "grant", None)


def revoked(records: Iterable[Any], allows: Callable[[Grant], bool]) -> List[Any]:
    """
    The records among C{records} whose grant C{allows} refuses.
    """
    found = []
    for record in records:
        grant = grant_of(record)
        if grant is not None and not allows(grant):
            found.append(record)
    return found


def close_revoked(registry: Any, allows: Callable[[Grant], bool]) -> int:
    """
    Close with 4010 SESSION_TERMINATED every live console of C{registry}
    whose credential no longer allows it; answer how many.  (It ends a
    console as C{ConsoleRegistry.terminate_vm} does; a registry method
    taking a predicate would be the cleaner home.)  Its browser reads why:
    a console opened through a share link reads L{SHARE_REVOKED} (the link
    was revoked, or its creator may no longer open the VM, which revokes it
    as well), any other L{ACCESS_REVOKED}.
    """
    doomed = revoked(registry.consoles(), allows)
    for record in doomed:
        grant = grant_of(record)
        share_id = getattr(grant, "share_id", None)
        log.info("console {console_id} of {user} on {vm_uuid} closed: {what} was revoked or narrowed",
                 console_id=record.console_id, user=getattr(grant, "user", "?"), vm_uuid=record.vm_id,
                 what=f"share {share_id}" if share_id else "its credential")  # fmt: skip
        record.owner.revoke(SHARE_REVOKED if share_id else ACCESS_REVOKED)
    return len(doomed)
