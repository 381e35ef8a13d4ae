"""
The token store in Redis, shared by every node of a cluster.

Only a token's SHA-256 reaches Redis; redemption is one Lua script (check
VM, client address, expiry, use, SPICE session; then mark used), so exactly
one of any number of racing redeemers on any number of nodes wins.  Token
expiry uses the injected clock of the issuing/redeeming node (nodes are
assumed to keep NTP time, as TLS already requires).

A SPICE session attached to a token keeps the token's key alive: the
attaching process renews the key's expiry to at least C{lease_ttl} on the
same schedule as its leases, for as long as the session is attached.  If
that process dies, the session record lapses within C{lease_ttl}, like the
console's slot.  Detaching puts the token's normal expiry back.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Optional, Set

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.interfaces import Grant, IssuedToken, ITokenStore, Redemption
from vaporproxy.stores.periodic import periodic
from vaporproxy.stores.redis_client import DEFAULT_PREFIX, LUA_REPLICAS, RedisClient
from vaporproxy.stores.tokens import OutstandingLimit, is_well_formed, new_token, stamp, token_hash, token_log_id

__all__ = ["RedisTokenStore"]

log = Logger(namespace="vaporproxy.redis_tokens")

# Lua prologue for KEYS[1], the unused tokens of one credential (sha256 ->
# exp), and ARGV[1], now: drop the expired ones; C{count}, C{oldest} (the
# first expiry, a string, or '0').
_LUA_OUTSTANDING = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local count = redis.call('ZCARD', KEYS[1])
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local oldest = first[2] or '0'
"""

# KEYS: tokens:key:<key id>, tok key, tokens, tokens:fresh.
# ARGV: now, sha256, grant JSON, vm_ref, vm_uuid, ip or "", exp, key ttl
# (ms), key id, most outstanding tokens of the key id (0: no cap).
# Answers {'OK', connected replicas} or {'LIMIT', count, oldest expiry}.
_ISSUE = _LUA_OUTSTANDING + """
local cap = tonumber(ARGV[10])
if cap > 0 and count >= cap then return {'LIMIT', count, oldest} end
redis.call('HSET', KEYS[2], 'grant', ARGV[3], 'vm_ref', ARGV[4], 'vm_uuid', ARGV[5],
           'ip', ARGV[6], 'exp', ARGV[7], 'used', '0', 'kid', ARGV[9])
redis.call('PEXPIRE', KEYS[2], ARGV[8])
redis.call('ZADD', KEYS[3], ARGV[7], ARGV[2])
redis.call('ZADD', KEYS[4], ARGV[7], ARGV[2])
redis.call('ZADD', KEYS[1], ARGV[7], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[8])
return {'OK', """ + LUA_REPLICAS + """}
"""

# KEYS: tokens:key:<key id>.  ARGV: now.  Answers {count, oldest expiry}.
_OUTSTANDING = _LUA_OUTSTANDING + """
return {count, oldest}
"""

# KEYS: tok key, tokens:fresh
# ARGV: sha256, now, vm_ref, client ip or "", tokens:key: prefix
# Answers {verdict, ...}; 'OK' with the grant and the connected replicas.
_REDEEM = """
local t = redis.call('HMGET', KEYS[1], 'grant', 'vm_ref', 'vm_uuid', 'ip', 'exp', 'used', 'sid', 'kid')
if not t[1] then return {'INVALID'} end
if ARGV[3] ~= t[2] and ARGV[3] ~= t[3] then return {'INVALID'} end
if t[4] ~= '' and ARGV[4] ~= t[4] then return {'INVALID'} end
if t[6] == '1' and t[7] then return {'SESSION', t[1], t[7]} end
if tonumber(ARGV[2]) >= tonumber(t[5]) then return {'EXPIRED'} end
if t[6] == '1' then return {'USED'} end
redis.call('HSET', KEYS[1], 'used', '1')
redis.call('ZREM', KEYS[2], ARGV[1])
if t[8] then redis.call('ZREM', ARGV[5] .. t[8], ARGV[1]) end
return {'OK', t[1], """ + LUA_REPLICAS + """}
"""

# KEYS: tok key, tokens:fresh.  ARGV: sha256, tokens:key: prefix.
# A used token without a SPICE session becomes unused again; its key's
# expiry is left as it is.  Answers 1 when it was given back.
_UNREDEEM = """
local t = redis.call('HMGET', KEYS[1], 'used', 'sid', 'exp', 'kid')
if t[1] ~= '1' or t[2] then return 0 end
redis.call('HSET', KEYS[1], 'used', '0')
redis.call('ZADD', KEYS[2], t[3], ARGV[1])
if t[4] then redis.call('ZADD', ARGV[2] .. t[4], t[3], ARGV[1]) end
return 1
"""

# KEYS: tok key.  ARGV: session id, keep-alive (ms).
_ATTACH = """
if redis.call('HGET', KEYS[1], 'used') ~= '1' then return 0 end
redis.call('HSET', KEYS[1], 'sid', ARGV[1])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
"""

# KEYS: tok keys of attached sessions.  ARGV[1]: keep-alive (ms).
# Answers how many are gone.
_KEEP_SESSIONS = """
local gone = 0
for i = 1, #KEYS do
  if redis.call('HEXISTS', KEYS[i], 'sid') == 1 then
    if redis.call('PTTL', KEYS[i]) < tonumber(ARGV[1]) then
      redis.call('PEXPIRE', KEYS[i], ARGV[1])
    end
  else
    gone = gone + 1
  end
end
return gone
"""

# KEYS: tok key.  ARGV: now, grace (s).
_DETACH = """
if redis.call('HDEL', KEYS[1], 'sid') == 0 then return 0 end
local exp = tonumber(redis.call('HGET', KEYS[1], 'exp'))
local left = math.floor((exp + tonumber(ARGV[2]) - tonumber(ARGV[1])) * 1000)
if left < 1 then left = 1 end
redis.call('PEXPIRE', KEYS[1], left)
return 1
"""

# KEYS: tokens, tokens:fresh.  ARGV: now, tok key prefix.
_PURGE = """
local n = 0
for _, h in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])) do
  local key = ARGV[2] .. h
  if redis.call('HEXISTS', key, 'sid') == 0 then
    redis.call('DEL', key)
    redis.call('ZREM', KEYS[1], h)
    n = n + 1
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
return n
"""


def _grant_json(grant: Grant) -> str:
    return json.dumps(asdict(grant), sort_keys=True)


def _grant_from(text: str) -> Grant:
    return Grant(**json.loads(text))


@implementer(ITokenStore)
class RedisTokenStore:
    """
    An L{ITokenStore} in Redis, shared by every node of a cluster.

    @ivar ttl: token lifetime (seconds).
    @ivar grace: seconds a token's record outlives its expiry, so that it
        says TOKEN_EXPIRED rather than INVALID_TOKEN until purged.
    @ivar session_ttl: seconds an attached SPICE session's record lives
        without renewal by the process that attached it.
    """

    def __init__(
        self,
        redis: RedisClient,
        clock: IReactorTime,
        ttl: float,
        session_ttl: float,
        prefix: str = DEFAULT_PREFIX,
        grace: Optional[float] = None,
    ):
        self._redis = redis
        self._clock = clock
        self.ttl = float(ttl)
        self.session_ttl = float(session_ttl)
        self.grace = float(grace) if grace is not None else max(self.ttl, 60.0)
        self._prefix = prefix
        self._all = prefix + "tokens"
        self._fresh = prefix + "tokens:fresh"
        self._tok = prefix + "tok:"
        self._by_key = prefix + "tokens:key:"
        #: Keys of the SPICE sessions this process attached and keeps alive.
        self._sessions: Set[str] = set()
        self._keeper: Optional[LoopingCall] = None

    def start(self) -> None:
        """
        Start keeping this process's attached SPICE sessions alive.
        """
        if self._keeper is None:
            self._keeper = periodic(self._clock, self.session_ttl / 3, "SPICE session renewal", self.keep_sessions)

    def stop(self) -> None:
        """
        Stop renewing (this process's sessions then lapse within
        C{session_ttl}).
        """
        if self._keeper is not None:
            if self._keeper.running:
                self._keeper.stop()
            self._keeper = None

    def _key(self, digest: str) -> str:
        return self._tok + digest

    def issue(self, grant: Grant) -> Deferred:
        return Deferred.fromCoroutine(self._issue(grant, 0))

    def issue_within(self, grant: Grant, max_outstanding: int) -> Deferred:
        """
        Mint a token for C{grant} unless its credential (C{grant.key_id})
        already holds C{max_outstanding} unused, unexpired tokens: one
        script checks and mints, so the cap holds across every node.

        @raise OutstandingLimit: at the cap (C{wait}: seconds until the
            oldest of them expires).
        """
        return Deferred.fromCoroutine(self._issue(grant, int(max_outstanding)))

    async def _issue(self, grant: Grant, max_outstanding: int) -> IssuedToken:
        token = new_token()
        digest = token_hash(token)
        now = self._clock.seconds()
        stamped = stamp(grant, now, self.ttl)
        key_id = stamped.key_id or ""
        answer = await self._redis.eval(
            _ISSUE,
            [self._by_key + key_id, self._key(digest), self._all, self._fresh],
            [
                repr(now),
                digest,
                _grant_json(stamped),
                stamped.vm_ref,
                stamped.vm_uuid,
                stamped.client_ip or "",
                repr(stamped.expires_at),
                int((self.ttl + self.grace) * 1000),
                key_id,
                max_outstanding,
            ],
        )
        if answer[0] == "LIMIT":
            raise OutstandingLimit(int(answer[1]), max(0.0, float(answer[2]) - now))
        await self._redis.replicated(int(answer[1]))
        return IssuedToken(token=token, grant=stamped)

    def outstanding(self, key_id: Optional[str]) -> Deferred:
        """
        C{(count, wait)}: the unused, unexpired tokens of credential
        C{key_id} in the cluster, and the seconds until the oldest expires.
        """
        now = self._clock.seconds()
        d = self._redis.eval(_OUTSTANDING, [self._by_key + (key_id or "")], [repr(now)])
        return d.addCallback(lambda a: (int(a[0]), max(0.0, float(a[1]) - now) if int(a[0]) else 0.0))

    def unredeem(self, token: str) -> Deferred:
        """
        Give back the redemption of C{token} (its console was refused with
        4007 before it used the VM), on every node at once; the token keeps
        its expiry.  Nothing happens to a token with a SPICE session.
        """
        if not is_well_formed(token):
            return succeed(None)
        digest = token_hash(token)
        d = self._redis.eval(_UNREDEEM, [self._key(digest), self._fresh], [digest, self._by_key])
        return d.addCallback(lambda _: None)

    def redeem(self, token: str, vm_ref: str, client_ip: Optional[str]) -> Deferred:
        return Deferred.fromCoroutine(self._redeem(token, vm_ref, client_ip))

    async def _redeem(self, token: str, vm_ref: str, client_ip: Optional[str]) -> Redemption:
        if not is_well_formed(token):
            raise ConsoleError(ErrorCode.INVALID_TOKEN)
        digest = token_hash(token)
        # An unbound grant stores ip "", which matches anything; a bound one
        # never equals this placeholder for a missing address.
        ip = client_ip if client_ip else "-"
        answer = await self._redis.eval(
            _REDEEM,
            [self._key(digest), self._fresh],
            [digest, repr(self._clock.seconds()), vm_ref, ip, self._by_key],
        )
        verdict = answer[0]
        if verdict == "OK":
            # Under Sentinel: not answered before a replica has the mark,
            # so a failover cannot bring the token back unused.
            await self._redis.replicated(int(answer[2]))
            log.debug("token {token_id} redeemed", token_id=digest[:12])
            return Redemption(grant=_grant_from(answer[1]), first=True)
        if verdict == "SESSION":
            return Redemption(grant=_grant_from(answer[1]), first=False, spice_session_id=int(answer[2]))
        if verdict == "EXPIRED":
            raise ConsoleError(ErrorCode.TOKEN_EXPIRED)
        if verdict == "USED":
            log.info("token {token_id} replayed", token_id=digest[:12])
            raise ConsoleError(ErrorCode.TOKEN_ALREADY_USED)
        log.debug("token {token_id} refused: invalid", token_id=digest[:12])
        raise ConsoleError(ErrorCode.INVALID_TOKEN)

    def attach_spice_session(self, token: str, session_id: int) -> Deferred:
        return Deferred.fromCoroutine(self._attach(token, session_id))

    async def _attach(self, token: str, session_id: int) -> None:
        if not is_well_formed(token):
            return None
        key = self._key(token_hash(token))
        attached = await self._redis.eval(_ATTACH, [key], [int(session_id), int(self.session_ttl * 1000)])
        if int(attached):
            self._sessions.add(key)
            self.start()
        else:
            log.warn(
                "SPICE session for unknown or unused token {token_id} not attached",
                token_id=token_log_id(token),
            )
        return None

    def detach_spice_session(self, token: str) -> Deferred:
        return Deferred.fromCoroutine(self._detach(token))

    async def _detach(self, token: str) -> None:
        if not is_well_formed(token):
            return None
        key = self._key(token_hash(token))
        self._sessions.discard(key)
        if not self._sessions:
            self.stop()
        await self._redis.eval(_DETACH, [key], [repr(self._clock.seconds()), repr(self.grace)])
        return None

    async def keep_sessions(self) -> int:
        """
        Renew the records of the SPICE sessions this process attached; forget
        those that are gone.  Answers how many are kept.
        """
        keys = sorted(self._sessions)
        if not keys:
            return 0
        gone = int(await self._redis.eval(_KEEP_SESSIONS, keys, [int(self.session_ttl * 1000)]))
        if gone:
            log.warn("{n} attached SPICE session records vanished", n=gone)
        return len(keys) - gone

    def count(self) -> Deferred:
        d = self._redis.execute("ZCOUNT", self._fresh, f"({self._clock.seconds()!r}", "+inf")
        return d.addCallback(int)

    def purge(self) -> Deferred:
        d = self._redis.eval(_PURGE, [self._all, self._fresh], [repr(self._clock.seconds()), self._tok])
        return d.addCallback(int)

    def check(self) -> Deferred:
        return self._redis.execute("PING").addCallback(lambda _: None)
