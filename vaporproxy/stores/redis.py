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
  leases:user:<u>   zset, the same members for one user.
  leases:client:<a> zset, the same members for one client address.
  procs             hash node -> JSON figures of that process.
  procs:alive       zset node -> expiry of those figures (Redis TIME, ms).
  channel terminate pub/sub: {"vm_uuid"} whose consoles must all close, or
                    {"share_id"} of a revoked share link (its consoles close).

The pieces live in their own modules: L{vaporproxy.stores.redis_client}
(connection, timeouts), L{vaporproxy.stores.redis_tokens} (tokens, SPICE
sessions), L{vaporproxy.stores.redis_limits} (leases).  This module wires
them for one process and carries the cluster signals: process figures and
the terminate channel.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Optional

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from vaporproxy.config import ConsoleConfig, TokensConfig
from vaporproxy.errors import ConsoleError
from vaporproxy.stores.periodic import periodic
from vaporproxy.stores.redis_client import DEFAULT_PREFIX, LUA_NOW_MS, DirectTarget, RedisClient
from vaporproxy.stores.redis_limits import RedisLimiter
from vaporproxy.stores.redis_tokens import RedisTokenStore

__all__ = ["RedisBackend", "connect_redis"]

log = Logger(namespace="vaporproxy.redis_tokens")

# KEYS: procs, procs:alive.  ARGV: node, JSON, ttl (ms).
_PUBLISH_PROC = LUA_NOW_MS + """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
return 1
"""

# KEYS: procs, procs:alive.  Figures of the live processes.
_READ_PROCS = LUA_NOW_MS + """
for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  redis.call('HDEL', KEYS[1], node)
  redis.call('ZREM', KEYS[2], node)
end
return redis.call('HVALS', KEYS[1])
"""


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
        #: The connection, for other stores of the cluster (share links).
        self.client = redis
        self._reactor = reactor
        self.token_store = token_store
        self.limiter = limiter
        self.node_id = limiter.node_id
        self._report_ttl = float(report_ttl)
        self._procs = prefix + "procs"
        self._alive = prefix + "procs:alive"
        self._channel = prefix + "terminate"
        self._callbacks: List[Callable[[str], Any]] = []
        self._share_callbacks: List[Callable[[str], Any]] = []
        self._subscriber: Optional[Any] = None
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
            self._reporter = periodic(self._reactor, self._report_ttl / 3, "process report", self.report, now=True)

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

    def on_share_revoked(self, callback: Callable[[str], Any]) -> None:
        """
        Call C{callback(share_id)} whenever a node revokes a share link
        (L{vaporproxy.stores.redis_shares.RedisShareStore.revoke} publishes it).
        """
        self._share_callbacks.append(callback)

    def _received(self, channel: str, message: str) -> None:
        try:
            body = json.loads(message)
            share = "share_id" in body
            target = body["share_id"] if share else body["vm_uuid"]
            if not isinstance(target, str):
                raise ValueError("not a string")
        except (ValueError, KeyError, TypeError):
            log.warn("ignored a malformed terminate message")
            return
        log.info("terminate request for {what} {target}", what="share" if share else "VM", target=target)
        for callback in list(self._share_callbacks if share else self._callbacks):
            try:
                callback(target)
            except Exception:
                log.failure("terminate callback failed for {target}", target=target)

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
    redis = RedisClient(_target(tokens), reactor, tokens.redis_timeout)
    store = RedisTokenStore(redis, reactor, console.token_ttl, tokens.lease_ttl, prefix=prefix)
    limiter = RedisLimiter(
        redis,
        reactor,
        tokens.lease_ttl,
        console.max_connections_per_vm,
        console.max_total_connections,
        node_id=node_id,
        prefix=prefix,
        max_per_user=console.max_connections_per_user,
        max_per_client=console.max_connections_per_client,
    )
    backend = RedisBackend(redis, store, limiter, reactor, tokens.lease_ttl, prefix=prefix)
    log.info(
        "Redis backend {node_id} for {where} (this process's node_id in the cluster stats)",
        node_id=limiter.node_id,
        where=redis.describe(),
    )
    return backend


def _target(tokens: TokensConfig) -> Any:
    """
    Where the Redis of C{tokens} is: the master its sentinels name, or the
    server of its C{redis_url}.
    """
    if tokens.redis_sentinel is not None:
        from vaporproxy.stores.redis_sentinel import SentinelTarget

        return SentinelTarget(tokens.redis_sentinel, tokens.redis_timeout)
    return DirectTarget(tokens.redis_url)
