"""
Redis-backed token store, admission limits and cluster signals.

Any node mints, any node redeems; the limits hold across the cluster; an
admin's C{DELETE .../console/sessions} reaches every process.

Layout in Redis (all keys under a prefix, C{vaporproxy:} by default)::

  tok:<sha256>      hash: grant (JSON), vm_ref, vm_uuid, ip, exp, used,
                    sid (SPICE session id, while one is attached).
                    Redis expiry: token_ttl + grace, so that after the
                    token's own expiry it still says TOKEN_EXPIRED (until
                    purged) instead of INVALID_TOKEN.
  tokens            zset sha256 -> expires_at: every token, for purge.
  tokens:fresh      zset sha256 -> expires_at: unused tokens, for count.
  leases            zset "vm|node|id" -> lease expiry (Redis TIME, ms).
  leases:vm:<uuid>  zset, the same members for one VM.
  procs             hash node -> JSON figures of that process.
  procs:alive       zset node -> expiry of those figures (Redis TIME, ms).
  channel terminate pub/sub: a VM UUID whose consoles must all close.

Design notes:

 - Only a token's SHA-256 reaches Redis; redemption is one Lua script
   (check VM, client address, expiry, use, SPICE session; then mark used),
   so exactly one of any number of racing redeemers on any number of nodes
   wins.  Token expiry uses the injected clock of the issuing/redeeming
   node (nodes are assumed to keep NTP time, as TLS already requires).
 - Leases are scored with Redis's own clock (C{TIME} inside the scripts),
   so node clock skew cannot stretch or shrink them.  Each process renews
   its live leases every C{lease_ttl / 3}; a process that dies stops
   renewing and its slots lapse within C{lease_ttl}.  Every acquire first
   drops lapsed members.
 - A SPICE session attached to a token keeps the token's key alive: the
   attaching process renews the key's expiry to at least C{lease_ttl} on
   the same schedule as its leases, for as long as the session is attached.
   If that process dies, the session record lapses within C{lease_ttl}, like
   the console's slot.  Detaching puts the token's normal expiry back.
 - Every call has a timeout (C{tokens.redis_timeout}): txredisapi's lazy
   connection would otherwise wait forever while Redis is down.  Every
   failure is C{ConsoleError(SERVICE_UNAVAILABLE)}: fail closed.
 - txredisapi uses the global reactor internally; it stays inside this
   module.  Endpoints and every timer of ours use the injected reactor.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict
from typing import Any, Awaitable, Callable, Dict, List, Optional, Sequence, Set
from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from vaporproxy.config import ConsoleConfig, TokensConfig
from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.stores.limits import Lease
from vaporproxy.interfaces import Grant, ILimiter, IssuedToken, ITokenStore, Redemption
from vaporproxy.stores.tokens import is_well_formed, new_token, stamp, token_hash, token_log_id

__all__ = [
    "RedisBackend",
    "RedisClient",
    "RedisLimiter",
    "RedisTokenStore",
    "connect_redis",
    "parse_redis_url",
]

log = Logger(namespace="vaporproxy.redis_tokens")

DEFAULT_PREFIX = "vaporproxy:"

# ---------------------------------------------------------------------------
# Lua scripts
# ---------------------------------------------------------------------------

# KEYS: tok key, tokens, tokens:fresh
# ARGV: sha256, grant JSON, vm_ref, vm_uuid, ip or "", exp, key ttl (ms)
_ISSUE = """
redis.call('HSET', KEYS[1], 'grant', ARGV[2], 'vm_ref', ARGV[3],
           'vm_uuid', ARGV[4], 'ip', ARGV[5], 'exp', ARGV[6], 'used', '0')
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[1])
return 1
"""

# KEYS: tok key, tokens:fresh
# ARGV: sha256, now, vm_ref, client ip or ""
_REDEEM = """
local t = redis.call('HMGET', KEYS[1], 'grant', 'vm_ref', 'vm_uuid', 'ip', 'exp', 'used', 'sid')
if not t[1] then return {'INVALID'} end
if ARGV[3] ~= t[2] and ARGV[3] ~= t[3] then return {'INVALID'} end
if t[4] ~= '' and ARGV[4] ~= t[4] then return {'INVALID'} end
if t[6] == '1' and t[7] then return {'SESSION', t[1], t[7]} end
if tonumber(ARGV[2]) >= tonumber(t[5]) then return {'EXPIRED'} end
if t[6] == '1' then return {'USED'} end
redis.call('HSET', KEYS[1], 'used', '1')
redis.call('ZREM', KEYS[2], ARGV[1])
return {'OK', t[1]}
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

_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: leases, leases:vm:<uuid>.  ARGV: lease ttl (ms), max per vm,
# max total, member.
_ACQUIRE = _NOW_MS + """
local ttl = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[2]) then return 0 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[4])
redis.call('ZADD', KEYS[2], now + ttl, ARGV[4])
redis.call('PEXPIRE', KEYS[1], ttl * 2)
redis.call('PEXPIRE', KEYS[2], ttl * 2)
return 1
"""

# KEYS: leases, then leases:vm:<uuid> of each lease.  ARGV: lease ttl (ms),
# then the member of each lease.  Leases that had lapsed are put back (the
# console is still live) and counted in the answer.
_RENEW = _NOW_MS + """
local ttl = tonumber(ARGV[1])
local lapsed = 0
for i = 2, #KEYS do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if (not score) or tonumber(score) <= now then lapsed = lapsed + 1 end
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
  redis.call('ZADD', KEYS[i], now + ttl, ARGV[i])
  redis.call('PEXPIRE', KEYS[i], ttl * 2)
end
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return lapsed
"""

# KEYS: leases, leases:vm:<uuid>.  ARGV: member.
_RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

# KEYS: leases.  Live members.
_LIVE_LEASES = _NOW_MS + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""

# KEYS: procs, procs:alive.  ARGV: node, JSON, ttl (ms).
_PUBLISH_PROC = _NOW_MS + """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
return 1
"""

# KEYS: procs, procs:alive.  Figures of the live processes.
_READ_PROCS = _NOW_MS + """
for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  redis.call('HDEL', KEYS[1], node)
  redis.call('ZREM', KEYS[2], node)
end
return redis.call('HVALS', KEYS[1])
"""


# ---------------------------------------------------------------------------
# Connection
# ---------------------------------------------------------------------------


def parse_redis_url(url: str) -> Dict[str, Any]:
    """
    Split C{redis://[[user]:password@]host[:port][/db]} (or C{rediss://} for
    TLS) into C{host}, C{port}, C{db}, C{username}, C{password}, C{tls}.

    @raise ValueError: for another scheme or a bad database number.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"redis_url: unsupported scheme {parts.scheme!r} (expected redis:// or rediss://)")
    path = parts.path.strip("/")
    try:
        db = int(path) if path else 0
    except ValueError:
        raise ValueError(f"redis_url: database {path!r} is not a number") from None
    return {
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or 6379,
        "db": db,
        "username": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password is not None else None,
        "tls": parts.scheme == "rediss",
    }


class _Factory(txredisapi.RedisFactory):
    """
    txredisapi's factory with a shorter reconnection back-off: a console
    gateway should be usable again soon after Redis comes back.
    """

    initialDelay = 0.25
    maxDelay = 3.0


class _TerminateSubscriber(txredisapi.SubscriberProtocol):
    """
    The pub/sub connection: (re)subscribes on every connection and hands
    messages to its factory.
    """

    def messageReceived(self, pattern: Any, channel: str, message: str) -> None:
        self.factory.received(channel, message)


class _SubscriberFactory(_Factory):
    protocol = _TerminateSubscriber

    def __init__(self, channel: str, received: Callable[[str, str], None], **kw: Any):
        super().__init__(None, kw.pop("dbid"), 1, isLazy=True, convertNumbers=False, **kw)
        self.channel = channel
        self.received = received

    def buildProtocol(self, addr: Any) -> Any:
        p = super().buildProtocol(addr)

        def subscribe(proto: Any) -> None:
            proto.subscribe(self.channel).addErrback(
                lambda f: log.failure("could not subscribe to {channel}", f, channel=self.channel)
            )

        p.whenConnected().addCallback(subscribe)
        return p


def _endpoint(reactor: Any, url: Dict[str, Any], timeout: float) -> Any:
    endpoint = HostnameEndpoint(reactor, url["host"], url["port"], timeout=max(1, int(timeout + 0.999)))
    if url["tls"]:
        endpoint = wrapClientTLS(optionsForClientTLS(url["host"]), endpoint)
    return endpoint


class RedisClient:
    """
    One lazy, reconnecting Redis connection with a timeout on every call.

    @ivar timeout: seconds any call may take; after that, and on any other
        failure, the call fails with C{ConsoleError(SERVICE_UNAVAILABLE)}.
    """

    def __init__(self, redis_url: str, reactor: Any, timeout: float):
        self._reactor = reactor
        self.timeout = float(timeout)
        self._url = parse_redis_url(redis_url)
        self._factory = _Factory(
            f"{self._url['host']}:{self._url['port']}",
            self._url["db"],
            1,
            isLazy=True,
            password=self._url["password"],
            username=self._url["username"],
            replyTimeout=self.timeout,
            convertNumbers=False,
        )
        self._handler = self._factory.handler
        self._connecting = False

    def connect(self) -> None:
        """
        Start connecting (and reconnecting) to Redis.  Idempotent; the first
        call does it too, so that nothing dials Redis before it is needed
        (under twistd: before the process daemonizes).
        """
        if not self._connecting:
            self._connecting = True
            self._factory.startConnecting(_endpoint(self._reactor, self._url, self.timeout))

    def _guard(self, what: str, call: Callable[[], Deferred]) -> Deferred:
        try:
            self.connect()
            d = call()
        except Exception:
            d = Deferred()
            d.errback(Failure())
        d.addTimeout(self.timeout, self._reactor)

        def unavailable(f: Failure) -> Failure:
            if f.check(ConsoleError):
                return f
            log.warn(
                "Redis {what} failed: {error}",
                what=what,
                error=f.getErrorMessage() or f.type.__name__,
            )
            raise ConsoleError(ErrorCode.SERVICE_UNAVAILABLE)

        return d.addErrback(unavailable)

    def execute(self, *args: Any) -> Deferred:
        """
        Run one Redis command.
        """
        return self._guard(str(args[0]), lambda: self._handler.execute_command(*args))

    def eval(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Deferred:
        """
        Run a Lua script (by SHA once Redis knows it).
        """
        return self._guard("script", lambda: self._handler.eval(script, list(keys), [str(a) for a in args]))

    def subscribe(self, channel: str, received: Callable[[str, str], None]) -> "_SubscriberFactory":
        """
        Open a separate, reconnecting pub/sub connection subscribed to
        C{channel}; C{received(channel, message)} is called for each message.
        (It connects at once, whether or not L{connect} was called.)
        """
        factory = _SubscriberFactory(
            channel,
            received,
            dbid=self._url["db"],
            password=self._url["password"],
            username=self._url["username"],
        )
        factory.startConnecting(_endpoint(self._reactor, self._url, self.timeout))
        return factory

    def close(self) -> Deferred:
        """
        Stop reconnecting and close the connection (if one was started).
        """
        self._connecting = True  # never (re)connect after this
        return self._factory.disconnect()


def _periodic(
    clock: IReactorTime, interval: float, what: str, job: Callable[[], Awaitable[Any]], now: bool = False
) -> LoopingCall:
    """
    A started L{LoopingCall} running C{job} every C{interval} seconds on
    C{clock} (and at once when C{now}), whose body never raises (a failure
    is logged; the loop goes on), and which skips a beat while the previous
    run is still waiting.
    """
    busy: List[bool] = [False]

    def beat() -> None:
        if busy[0]:
            return
        busy[0] = True

        def done(result: Any) -> None:
            busy[0] = False
            if isinstance(result, Failure):
                log.failure("periodic {what} failed", result, what=what)

        Deferred.fromCoroutine(_awaiting(job)).addBoth(done)

    loop = LoopingCall(beat)
    loop.clock = clock
    loop.start(interval, now=now)
    return loop


async def _awaiting(job: Callable[[], Awaitable[Any]]) -> Any:
    return await job()


# ---------------------------------------------------------------------------
# Token store
# ---------------------------------------------------------------------------


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
        #: Keys of the SPICE sessions this process attached and keeps alive.
        self._sessions: Set[str] = set()
        self._keeper: Optional[LoopingCall] = None

    def start(self) -> None:
        """
        Start keeping this process's attached SPICE sessions alive.
        """
        if self._keeper is None:
            self._keeper = _periodic(self._clock, self.session_ttl / 3, "SPICE session renewal", self.keep_sessions)

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
        return Deferred.fromCoroutine(self._issue(grant))

    async def _issue(self, grant: Grant) -> IssuedToken:
        token = new_token()
        digest = token_hash(token)
        stamped = stamp(grant, self._clock.seconds(), self.ttl)
        await self._redis.eval(
            _ISSUE,
            [self._key(digest), self._all, self._fresh],
            [
                digest,
                _grant_json(stamped),
                stamped.vm_ref,
                stamped.vm_uuid,
                stamped.client_ip or "",
                repr(stamped.expires_at),
                int((self.ttl + self.grace) * 1000),
            ],
        )
        return IssuedToken(token=token, grant=stamped)

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
            [digest, repr(self._clock.seconds()), vm_ref, ip],
        )
        verdict = answer[0]
        if verdict == "OK":
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


# ---------------------------------------------------------------------------
# Limiter
# ---------------------------------------------------------------------------


@implementer(ILimiter)
class RedisLimiter:
    """
    Cluster-wide admission: leases in Redis sorted sets scored by expiry,
    renewed by this process every C{lease_ttl / 3} while they live.

    @ivar node_id: this process's id (part of every lease member).
    """

    def __init__(
        self,
        redis: RedisClient,
        clock: IReactorTime,
        lease_ttl: float,
        max_per_vm: int,
        max_total: int,
        node_id: Optional[str] = None,
        prefix: str = DEFAULT_PREFIX,
    ):
        self._redis = redis
        self._clock = clock
        self.lease_ttl = float(lease_ttl)
        self.max_per_vm = int(max_per_vm)
        self.max_total = int(max_total)
        self.node_id = node_id or uuid.uuid4().hex[:16]
        self._all = prefix + "leases"
        self._vm_prefix = prefix + "leases:vm:"
        self._leases: Dict[str, Lease] = {}
        self._releasing: Set[Deferred] = set()
        self._renewer: Optional[LoopingCall] = None

    @property
    def _ttl_ms(self) -> int:
        return max(1, int(self.lease_ttl * 1000))

    def start(self) -> None:
        """
        Start renewing this process's leases.
        """
        if self._renewer is None:
            self._renewer = _periodic(self._clock, self.lease_ttl / 3, "lease renewal", self.renew)

    def stop(self) -> None:
        """
        Stop renewing (this process's slots then lapse within C{lease_ttl}).
        """
        if self._renewer is not None:
            if self._renewer.running:
                self._renewer.stop()
            self._renewer = None

    def acquire(self, vm_uuid: str, console_id: str) -> Deferred:
        return Deferred.fromCoroutine(self._acquire(vm_uuid, console_id))

    async def _acquire(self, vm_uuid: str, console_id: str) -> Lease:
        member = f"{vm_uuid}|{self.node_id}|{uuid.uuid4().hex}"
        admitted = await self._redis.eval(
            _ACQUIRE,
            [self._all, self._vm_prefix + vm_uuid],
            [self._ttl_ms, self.max_per_vm, self.max_total, member],
        )
        if not int(admitted):
            log.info(
                "console {console_id} of {vm_uuid} refused: cluster limit reached"
                " (max {max_per_vm} per VM, {max_total} in total)",
                console_id=console_id,
                vm_uuid=vm_uuid,
                max_per_vm=self.max_per_vm,
                max_total=self.max_total,
            )
            raise ConsoleError(ErrorCode.MAX_CONNECTIONS_REACHED)
        lease = Lease(member, vm_uuid, console_id, self._release)
        self._leases[member] = lease
        self.start()
        return lease

    def _release(self, lease: Lease) -> None:
        if self._leases.pop(lease.key, None) is None:
            return
        if not self._leases:
            self.stop()
        d = self._redis.eval(_RELEASE, [self._all, self._vm_prefix + lease.vm_uuid], [lease.key])
        d.addErrback(
            lambda f: log.warn(
                "lease of console {console_id} not released in Redis (it lapses within {ttl}s): {error}",
                console_id=lease.console_id,
                ttl=self.lease_ttl,
                error=f.getErrorMessage(),
            )
        )
        self._releasing.add(d)
        d.addBoth(lambda _: self._releasing.discard(d))

    def flush(self) -> Deferred:
        """
        Fire once every release made so far has reached Redis (or failed).
        C{release()} itself does not wait.
        """
        return DeferredList(list(self._releasing)).addCallback(lambda _: None)

    async def renew(self) -> int:
        """
        Extend every live lease of this process by C{lease_ttl}.  Answers how
        many are live.
        """
        leases = list(self._leases.values())
        if not leases:
            return 0
        lapsed = int(
            await self._redis.eval(
                _RENEW,
                [self._all] + [self._vm_prefix + lease.vm_uuid for lease in leases],
                [self._ttl_ms] + [lease.key for lease in leases],
            )
        )
        if lapsed:
            log.warn("{n} leases had lapsed (renewals late?) and were restored", n=lapsed)
        return len(leases)

    def set_limits(self, max_per_vm: int, max_total: int) -> None:
        self.max_per_vm = int(max_per_vm)
        self.max_total = int(max_total)

    def local_stats(self) -> Dict[str, Any]:
        """
        The live leases of this process alone.
        """
        per_vm: Dict[str, int] = {}
        for lease in self._leases.values():
            per_vm[lease.vm_uuid] = per_vm.get(lease.vm_uuid, 0) + 1
        return {"total_connections": len(self._leases), "connections_per_vm": per_vm}

    def stats(self) -> Deferred:
        return Deferred.fromCoroutine(self._stats())

    async def _stats(self) -> Dict[str, Any]:
        members = await self._redis.eval(_LIVE_LEASES, [self._all], [])
        per_vm: Dict[str, int] = {}
        for member in members:
            vm = member.rsplit("|", 2)[0]
            per_vm[vm] = per_vm.get(vm, 0) + 1
        return {"total_connections": len(members), "connections_per_vm": per_vm}


# ---------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------


class RedisBackend:
    """
    Everything vaporproxy keeps in Redis, for one process.

    @ivar token_store: the shared L{ITokenStore}.
    @ivar limiter: the cluster-wide L{ILimiter}.
    @ivar node_id: this process's id in the cluster figures.
    """

    def __init__(
        self,
        redis: RedisClient,
        token_store: RedisTokenStore,
        limiter: RedisLimiter,
        reactor: Any,
        report_ttl: float,
        prefix: str = DEFAULT_PREFIX,
    ):
        self._redis = redis
        self._reactor = reactor
        self.token_store = token_store
        self.limiter = limiter
        self.node_id = limiter.node_id
        self._report_ttl = float(report_ttl)
        self._procs = prefix + "procs"
        self._alive = prefix + "procs:alive"
        self._channel = prefix + "terminate"
        self._callbacks: List[Callable[[str], Any]] = []
        self._subscriber: Optional[_SubscriberFactory] = None
        self._started: Optional[float] = None
        self._reporter: Optional[LoopingCall] = None

    def start(self) -> None:
        """
        Connect, subscribe to the terminate channel, publish this process's
        figures at once and start renewing leases, SPICE sessions and those
        figures.  Nothing connects before this (or before a first call), so
        a process may fork or daemonize after building the backend.
        Idempotent.
        """
        if self._started is None:
            self._started = self._reactor.seconds()
        self._redis.connect()
        if self._subscriber is None:
            self._subscriber = self._redis.subscribe(self._channel, self._received)
        self.token_store.start()
        self.limiter.start()
        if self._reporter is None:
            self._reporter = _periodic(self._reactor, self._report_ttl / 3, "process report", self.report, now=True)

    def publish_terminate(self, vm_uuid: str) -> Deferred:
        """
        Ask every process (this one included) to close all consoles of
        C{vm_uuid}.  Answers how many processes were listening.
        """
        message = json.dumps({"vm_uuid": vm_uuid, "from": self.node_id})
        return self._redis.execute("PUBLISH", self._channel, message).addCallback(int)

    def on_terminate(self, callback: Callable[[str], Any]) -> None:
        """
        Call C{callback(vm_uuid)} for every terminate request of the cluster.
        """
        self._callbacks.append(callback)

    def _received(self, channel: str, message: str) -> None:
        try:
            vm_uuid = json.loads(message)["vm_uuid"]
            if not isinstance(vm_uuid, str):
                raise ValueError("vm_uuid is not a string")
        except (ValueError, KeyError, TypeError):
            log.warn("ignored a malformed terminate message")
            return
        log.info("terminate request for {vm_uuid}", vm_uuid=vm_uuid)
        for callback in list(self._callbacks):
            try:
                callback(vm_uuid)
            except Exception:
                log.failure("terminate callback failed for {vm_uuid}", vm_uuid=vm_uuid)

    def _figures(self) -> Dict[str, Any]:
        local = self.limiter.local_stats()
        return {
            "node_id": self.node_id,
            "pid": os.getpid(),
            "started_at": self._started if self._started is not None else self._reactor.seconds(),
            "updated_at": self._reactor.seconds(),
            "total_connections": local["total_connections"],
            "connections_per_vm": local["connections_per_vm"],
        }

    async def report(self) -> None:
        """
        Publish this process's figures (they lapse after C{lease_ttl}).
        """
        await self._redis.eval(
            _PUBLISH_PROC,
            [self._procs, self._alive],
            [self.node_id, json.dumps(self._figures(), sort_keys=True), int(self._report_ttl * 1000)],
        )

    def cluster_stats(self) -> Deferred:
        """
        C{{"total_connections", "connections_per_vm", "total_tokens",
        "processes": [figures of each live process]}}.
        """
        return Deferred.fromCoroutine(self._cluster_stats())

    async def _cluster_stats(self) -> Dict[str, Any]:
        await self.report()
        totals = await self.limiter.stats()
        tokens = await self.token_store.count()
        processes = []
        for text in await self._redis.eval(_READ_PROCS, [self._procs, self._alive], []):
            try:
                processes.append(json.loads(text))
            except ValueError:
                continue
        processes.sort(key=lambda p: str(p.get("node_id")))
        return {
            "total_connections": totals["total_connections"],
            "connections_per_vm": totals["connections_per_vm"],
            "total_tokens": tokens,
            "processes": processes,
        }

    def close(self) -> Deferred:
        """
        Stop every loop, withdraw this process's figures, close the
        connections.
        """
        return Deferred.fromCoroutine(self._close())

    async def _close(self) -> None:
        self.token_store.stop()
        self.limiter.stop()
        await self.limiter.flush()
        if self._reporter is not None:
            if self._reporter.running:
                self._reporter.stop()
            self._reporter = None
        if self._started is not None:
            # Withdraw the figures (a backend never started published none
            # and need not dial Redis now).
            try:
                await self._redis.execute("HDEL", self._procs, self.node_id)
                await self._redis.execute("ZREM", self._alive, self.node_id)
            except ConsoleError:
                pass
        closing = [self._redis.close()]
        if self._subscriber is not None:
            closing.append(self._subscriber.disconnect())
            self._subscriber = None
        await DeferredList(closing, consumeErrors=True)


def connect_redis(
    tokens: TokensConfig,
    console: ConsoleConfig,
    reactor: Any,
    prefix: str = DEFAULT_PREFIX,
    node_id: Optional[str] = None,
) -> RedisBackend:
    """
    Build the Redis backend.  Nothing waits and nothing connects yet: call
    L{RedisBackend.start} once the process runs (C{startService}, after
    twistd has daemonized) and L{RedisBackend.close} at stop.  The
    connection then reconnects by itself; calls made while Redis is
    unreachable fail with SERVICE_UNAVAILABLE after C{tokens.redis_timeout}.

    @raise ValueError: for a C{redis_url} that cannot be used.
    """
    redis = RedisClient(tokens.redis_url, reactor, tokens.redis_timeout)
    store = RedisTokenStore(redis, reactor, console.token_ttl, tokens.lease_ttl, prefix=prefix)
    limiter = RedisLimiter(
        redis,
        reactor,
        tokens.lease_ttl,
        console.max_connections_per_vm,
        console.max_total_connections,
        node_id=node_id,
        prefix=prefix,
    )
    backend = RedisBackend(redis, store, limiter, reactor, tokens.lease_ttl, prefix=prefix)
    log.info(
        "Redis backend {node_id} for {host}:{port}/{db} (this process's node_id in the cluster stats)",
        node_id=limiter.node_id,
        host=redis._url["host"],
        port=redis._url["port"],
        db=redis._url["db"],
    )
    return backend
