"""
Share links in Redis (SPEC.md "Share links"): the same rules as
L{vaporproxy.stores.shares.MemoryShareStore}, shared by every node.

Layout (under the store's prefix, C{vaporproxy:} by default)::

    share:<sha256 of secret>   JSON of the share (uses_left included); expires with it
    share-id:<share id>        the digest, for revocation by id; expires with it
    shares:vm:<vm uuid>        set of digests (members whose share expired are pruned on read)
    shares:by:<creator>        set of digests (revocation when a key is removed)

A revocation is one Lua script that also publishes C{{"share_id": …}} on
the cluster's terminate channel: every node closes the consoles opened
through the share (L{vaporproxy.stores.redis.RedisBackend.on_share_revoked}).

A use is one Lua script: read, check expiry and uses, decrement, write back
keeping the key's TTL, so exactly one of N racing uses of the last one
wins, on any node.  Expiry compares with the calling node's clock, like
the token store's.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict
from typing import Any, List, Optional

from twisted.internet.defer import Deferred

from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.stores.shares import MODES, UNKNOWN_SHARE, Share
from vaporproxy.stores.tokens import is_well_formed, new_token, token_hash

__all__ = ["RedisShareStore"]

# KEYS: share, share-id, shares:vm, shares:by.  ARGV: digest, json, ttl ms.
_CREATE = """
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
return 1
"""

# KEYS: share.  ARGV: now.  Answers the updated JSON, or an error word.
_USE = """
local text = redis.call('GET', KEYS[1])
if not text then return 'INVALID' end
local share = cjson.decode(text)
if tonumber(ARGV[1]) >= share['expires_at'] then return 'EXPIRED' end
if share['uses_left'] < 1 then return 'USED' end
share['uses_left'] = share['uses_left'] - 1
local updated = cjson.encode(share)
redis.call('SET', KEYS[1], updated, 'KEEPTTL')
return updated
"""

# KEYS: share-id.  ARGV: share key prefix, vm set prefix, creator set prefix,
# the terminate channel, its message.  Every node hears that the share is
# revoked (and closes the consoles opened through it) in the same step.
_REVOKE = """
local digest = redis.call('GET', KEYS[1])
if not digest then return false end
local text = redis.call('GET', ARGV[1] .. digest)
redis.call('DEL', KEYS[1], ARGV[1] .. digest)
if text then
  local share = cjson.decode(text)
  redis.call('SREM', ARGV[2] .. share['vm_uuid'], digest)
  redis.call('SREM', ARGV[3] .. share['creator'], digest)
end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return text or false
"""

_ERRORS = {
    "INVALID": (ErrorCode.INVALID_TOKEN, UNKNOWN_SHARE),
    "EXPIRED": (ErrorCode.TOKEN_EXPIRED, "Share link has expired"),
    "USED": (ErrorCode.TOKEN_ALREADY_USED, "Share link has no uses left"),
}


def _share(text: Any) -> Share:
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    return Share(**json.loads(text))


class RedisShareStore:
    """
    @param redis: a connected client with C{eval(script, keys, args)} and
        C{execute(*command)} answering Deferreds (the token store's client,
        whose timeouts turn an unreachable Redis into SERVICE_UNAVAILABLE).
    """

    def __init__(self, redis: Any, clock: Any, prefix: str = "vaporproxy:"):
        self._redis = redis
        self._clock = clock
        self._share = prefix + "share:"
        self._id = prefix + "share-id:"
        self._vm = prefix + "shares:vm:"
        self._by = prefix + "shares:by:"
        #: The cluster's terminate channel (L{vaporproxy.stores.redis.RedisBackend}).
        self._channel = prefix + "terminate"

    def create(
        self, *, vm_uuid: str, vm_name: Optional[str], mode: str, creator: str, ttl: float, max_uses: int
    ) -> Deferred:
        if mode not in MODES or ttl <= 0 or max_uses < 1:
            raise ValueError("bad share parameters")
        return Deferred.fromCoroutine(self._create(vm_uuid, vm_name, mode, creator, ttl, max_uses))

    async def _create(
        self, vm_uuid: str, vm_name: Optional[str], mode: str, creator: str, ttl: float, max_uses: int
    ) -> tuple:
        secret = new_token()
        digest = token_hash(secret)
        now = self._clock.seconds()
        share = Share(secrets.token_hex(8), vm_uuid, vm_name, mode, creator, now, now + ttl, max_uses, max_uses)
        await self._redis.eval(
            _CREATE,
            [self._share + digest, self._id + share.share_id, self._vm + vm_uuid, self._by + creator],
            [digest, json.dumps(asdict(share)), int(ttl * 1000)],
        )
        return secret, share

    def use(self, secret: str) -> Deferred:
        return Deferred.fromCoroutine(self._use(secret))

    async def _use(self, secret: str) -> Share:
        if not is_well_formed(secret):
            raise ConsoleError(ErrorCode.INVALID_TOKEN, "Invalid share link")
        answer = await self._redis.eval(_USE, [self._share + token_hash(secret)], [repr(self._clock.seconds())])
        if isinstance(answer, bytes):
            answer = answer.decode("utf-8")
        if answer in _ERRORS:
            raise ConsoleError(*_ERRORS[answer])
        return _share(answer)

    def list(self, vm_uuid: str) -> Deferred:
        return Deferred.fromCoroutine(self._list(vm_uuid))

    async def _list(self, vm_uuid: str) -> List[Share]:
        digests = sorted(await self._redis.execute("SMEMBERS", self._vm + vm_uuid))
        if not digests:
            return []
        texts = await self._redis.execute("MGET", *[self._share + d for d in digests])
        gone = [d for d, text in zip(digests, texts) if text is None]
        if gone:
            await self._redis.execute("SREM", self._vm + vm_uuid, *gone)
        now = self._clock.seconds()
        live = [s for s in (_share(t) for t in texts if t is not None) if s.expires_at > now]
        return sorted(live, key=lambda s: (s.created_at, s.share_id))

    def get(self, share_id: str) -> Deferred:
        return Deferred.fromCoroutine(self._get(share_id))

    async def _get(self, share_id: str) -> Optional[Share]:
        digest = await self._redis.execute("GET", self._id + share_id)
        if digest is None:
            return None
        text = await self._redis.execute("GET", self._share + (digest.decode() if isinstance(digest, bytes) else digest))
        return None if text is None else _share(text)

    def revoke(self, share_id: str) -> Deferred:
        return Deferred.fromCoroutine(self._revoke(share_id))

    async def _revoke(self, share_id: str) -> Optional[Share]:
        message = json.dumps({"share_id": share_id})
        text = await self._redis.eval(
            _REVOKE, [self._id + share_id], [self._share, self._vm, self._by, self._channel, message]
        )
        return _share(text) if text else None

    def revoke_by_creator(self, creator: str) -> Deferred:
        return Deferred.fromCoroutine(self._revoke_by_creator(creator))

    async def _revoke_by_creator(self, creator: str) -> List[Share]:
        digests = await self._redis.execute("SMEMBERS", self._by + creator)
        gone = []
        for digest in sorted(digests or ()):
            text = await self._redis.execute("GET", self._share + (digest.decode() if isinstance(digest, bytes) else digest))
            if text is not None:
                share = _share(text)
                if await self._revoke(share.share_id) is not None:
                    gone.append(share)
        await self._redis.execute("DEL", self._by + creator)
        return gone

    def purge(self) -> int:
        """Redis expires shares by itself; sets are pruned as they are read."""
        return 0
