"""
Share links (SPEC.md "Share links"): a secret that lets whoever holds it
get console info for one VM, in the share's mode, up to C{max_uses} times
until it expires or is revoked.

Secrets are 256-bit, written as 64 hex characters like tokens; only their
SHA-256 is stored.  Each share also has a public id (for lists, revocation
and logs) that reveals nothing of the secret.  A share can never grant
more than its creator has: the API caps the mode at the creator's.

L{MemoryShareStore} keeps them in this process; a Redis store keeps the
same records under the same rules so that every node sees them.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional

from twisted.internet.defer import Deferred, fail, succeed

from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.stores.tokens import is_well_formed, new_token, token_hash

__all__ = ["MODES", "MemoryShareStore", "Share"]

MODES = ("view", "control")


@dataclass(frozen=True)
class Share:
    """
    One share link (never its secret).

    @ivar uses_left: how many more times it can get console info.
    """

    share_id: str
    vm_uuid: str
    vm_name: Optional[str]
    mode: str
    creator: str
    created_at: float
    expires_at: float
    max_uses: int
    uses_left: int

    def public(self, iso: Any) -> Dict[str, Any]:
        """The fields a list answer shows (C{iso}: the time formatter)."""
        return {
            "share_id": self.share_id,
            "vm_id": self.vm_uuid,
            "mode": self.mode,
            "creator": self.creator,
            "max_uses": self.max_uses,
            "uses_left": self.uses_left,
            "expires_at": iso(self.expires_at),
        }


#: What the person holding a revoked (or long expired, or mistyped) link reads.
UNKNOWN_SHARE = "Unknown or revoked share link"


class MemoryShareStore:
    """
    Share links in this process, expiring by the injected clock.
    """

    def __init__(self, clock: Any):
        self._clock = clock
        self._by_hash: Dict[str, Share] = {}
        self._hash_of: Dict[str, str] = {}

    def create(
        self, *, vm_uuid: str, vm_name: Optional[str], mode: str, creator: str, ttl: float, max_uses: int
    ) -> "Deferred[tuple]":
        """Answer C{(secret, Share)}; the secret is shown once, to the creator."""
        if mode not in MODES or ttl <= 0 or max_uses < 1:
            raise ValueError("bad share parameters")
        secret = new_token()
        now = self._clock.seconds()
        share = Share(secrets.token_hex(8), vm_uuid, vm_name, mode, creator, now, now + ttl, max_uses, max_uses)
        digest = token_hash(secret)
        self._by_hash[digest] = share
        self._hash_of[share.share_id] = digest
        return succeed((secret, share))

    def use(self, secret: str) -> "Deferred[Share]":
        """
        Spend one use of the share C{secret} opens (atomically: in one
        reactor turn); answer it with the uses left after this one.

        Fails with L{ConsoleError}: C{INVALID_TOKEN} (unknown or revoked),
            C{TOKEN_EXPIRED}, C{TOKEN_ALREADY_USED} (no uses left).
        """
        if not is_well_formed(secret):
            return fail(ConsoleError(ErrorCode.INVALID_TOKEN, "Invalid share link"))
        digest = token_hash(secret)
        share = self._by_hash.get(digest)
        if share is None:
            return fail(ConsoleError(ErrorCode.INVALID_TOKEN, UNKNOWN_SHARE))
        if self._clock.seconds() >= share.expires_at:
            self._forget(share)
            return fail(ConsoleError(ErrorCode.TOKEN_EXPIRED, "Share link has expired"))
        if share.uses_left < 1:
            return fail(ConsoleError(ErrorCode.TOKEN_ALREADY_USED, "Share link has no uses left"))
        share = self._by_hash[digest] = replace(share, uses_left=share.uses_left - 1)
        return succeed(share)

    def list(self, vm_uuid: str) -> "Deferred[List[Share]]":
        """The VM's live shares (not expired), oldest first."""
        now = self._clock.seconds()
        live = [s for s in self._by_hash.values() if s.vm_uuid == vm_uuid and s.expires_at > now]
        return succeed(sorted(live, key=lambda s: (s.created_at, s.share_id)))

    def get(self, share_id: str) -> "Deferred[Optional[Share]]":
        digest = self._hash_of.get(share_id)
        return succeed(None if digest is None else self._by_hash.get(digest))

    def revoke(self, share_id: str) -> "Deferred[Optional[Share]]":
        """Remove a share; answer it, or C{None} when there was none."""
        digest = self._hash_of.pop(share_id, None)
        return succeed(None if digest is None else self._by_hash.pop(digest, None))

    def revoke_by_creator(self, creator: str) -> "Deferred[List[Share]]":
        """Remove every share C{creator} made (its key was removed)."""
        gone = [s for s in self._by_hash.values() if s.creator == creator]
        for share in gone:
            self._forget(share)
        return succeed(gone)

    def purge(self) -> int:
        """Forget expired shares; answer how many."""
        now = self._clock.seconds()
        expired = [s for s in self._by_hash.values() if s.expires_at <= now]
        for share in expired:
            self._forget(share)
        return len(expired)

    def _forget(self, share: Share) -> None:
        digest = self._hash_of.pop(share.share_id, None)
        if digest is not None:
            self._by_hash.pop(digest, None)
