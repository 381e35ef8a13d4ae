"""
Cluster-wide admission limits in Redis: one lease per live console.

Leases are scored with Redis's own clock (C{TIME} inside the scripts), so
node clock skew cannot stretch or shrink them.  Each process renews its live
leases every C{lease_ttl / 3}; a process that dies stops renewing and its
slots lapse within C{lease_ttl}.  Every acquire first drops lapsed members.
"""

from __future__ import annotations

import uuid
from typing import Any, Dict, Optional, Set

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.interfaces import ILimiter
from vaporproxy.stores.limits import Lease
from vaporproxy.stores.periodic import periodic
from vaporproxy.stores.redis_client import DEFAULT_PREFIX, LUA_NOW_MS, RedisClient

__all__ = ["RedisLimiter"]

log = Logger(namespace="vaporproxy.redis_tokens")

# KEYS: leases, leases:vm:<uuid>.  ARGV: lease ttl (ms), max per vm,
# max total, member.
_ACQUIRE = LUA_NOW_MS + """
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
_RENEW = LUA_NOW_MS + """
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
_LIVE_LEASES = LUA_NOW_MS + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""


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
            self._renewer = periodic(self._clock, self.lease_ttl / 3, "lease renewal", self.renew)

    def stop(self) -> None:
        """
        Stop renewing (this process's slots then lapse within C{lease_ttl}).
        """
        if self._renewer is not None:
            if self._renewer.running:
                self._renewer.stop()
            self._renewer = None

    def acquire(self, vm_uuid: str, console_id: str, user: Optional[str] = None,
                client: Optional[str] = None) -> Deferred:  # fmt: skip
        """
        A cluster-wide lease per VM and in total.  (Per-user and per-client
        caps are the memory limiter's for now: C{user} and C{client} are
        taken and not counted here.)
        """
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
