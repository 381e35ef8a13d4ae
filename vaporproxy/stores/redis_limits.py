"""
Cluster-wide admission limits in Redis: one lease per live console.

Each lease is a member of the sorted sets it counts in: every lease, its
VM's, and its user's and client address's (when given; so per-user and
per-client caps hold across the cluster, and a reload that sets a cap
counts the consoles already open).  Leases are scored with Redis's own
clock (C{TIME} inside the scripts), so node clock skew cannot stretch or
shrink them.  Each process renews its live
leases every C{lease_ttl / 3}; a process that dies stops renewing and its
slots lapse within C{lease_ttl}.  Every acquire first drops lapsed members.
"""

from __future__ import annotations

import uuid
from typing import Any, Dict, List, Optional, Set

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.interfaces import ILimiter
from vaporproxy.stores.limits import Caps, Lease
from vaporproxy.stores.periodic import periodic
from vaporproxy.stores.redis_client import DEFAULT_PREFIX, LUA_NOW_MS, RedisClient

__all__ = ["RedisLimiter"]

log = Logger(namespace="vaporproxy.redis_tokens")

# KEYS: leases, leases:vm:<uuid>, then leases:user:<user> and
# leases:client:<address> when given.  ARGV: lease ttl (ms), max per vm,
# max total, member, max per user, max per client ("" for an owner not
# given; 0: counted, not capped).  Answers OK, or which cap refused it:
# USER, CLIENT, VM, TOTAL.
_ACQUIRE = LUA_NOW_MS + """
local ttl = tonumber(ARGV[1])
local owners = {}
local k = 3
for i, which in ipairs({'USER', 'CLIENT'}) do
  if ARGV[4 + i] ~= '' then
    owners[#owners + 1] = {KEYS[k], tonumber(ARGV[4 + i]), which}
    k = k + 1
  end
end
for i = 1, #KEYS do redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now) end
for _, o in ipairs(owners) do
  if o[2] > 0 and redis.call('ZCARD', o[1]) >= o[2] then return o[3] end
end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[2]) then return 'VM' end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 'TOTAL' end
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], now + ttl, ARGV[4])
  redis.call('PEXPIRE', KEYS[i], ttl * 2)
end
return 'OK'
"""

# KEYS: leases, then the other keys of each lease (vm, and user and client
# when it has them).  ARGV: lease ttl (ms), then for each lease its member
# and how many keys of KEYS it has.  Leases that had lapsed are put back
# (the console is still live) and counted in the answer.
_RENEW = LUA_NOW_MS + """
local ttl = tonumber(ARGV[1])
local lapsed = 0
local k = 2
for i = 2, #ARGV, 2 do
  local member = ARGV[i]
  local score = redis.call('ZSCORE', KEYS[1], member)
  if (not score) or tonumber(score) <= now then lapsed = lapsed + 1 end
  redis.call('ZADD', KEYS[1], now + ttl, member)
  for j = k, k + tonumber(ARGV[i + 1]) - 1 do
    redis.call('ZADD', KEYS[j], now + ttl, member)
    redis.call('PEXPIRE', KEYS[j], ttl * 2)
  end
  k = k + tonumber(ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return lapsed
"""

# KEYS: every key of the lease.  ARGV: member.
_RELEASE = """
for i = 1, #KEYS do redis.call('ZREM', KEYS[i], ARGV[1]) end
return 1
"""

# KEYS: leases.  Live members.
_LIVE_LEASES = LUA_NOW_MS + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""


@implementer(ILimiter)
class RedisLimiter(Caps):
    """
    Cluster-wide admission: leases in Redis sorted sets scored by expiry,
    renewed by this process every C{lease_ttl / 3} while they live.

    @ivar node_id: this process's id (part of every lease member).
    @ivar max_per_user: live consoles per user (0: unlimited).
    @ivar max_per_client: live consoles per client address (0: unlimited).
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
        max_per_user: int = 0,
        max_per_client: int = 0,
    ):
        self._redis = redis
        self._clock = clock
        self.lease_ttl = float(lease_ttl)
        self.set_limits(max_per_vm, max_total, max_per_user, max_per_client)
        self.node_id = node_id or uuid.uuid4().hex[:16]
        self._all = prefix + "leases"
        self._vm_prefix = prefix + "leases:vm:"
        self._user_prefix = prefix + "leases:user:"
        self._client_prefix = prefix + "leases:client:"
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

    def _keys_of(self, vm_uuid: str, user: Optional[str], client: Optional[str]) -> List[str]:
        """
        The sorted sets a lease is a member of, besides the one of all
        leases: its VM's, then its user's and its client's when given.
        """
        keys = [self._vm_prefix + vm_uuid]
        if user is not None:
            keys.append(self._user_prefix + user)
        if client is not None:
            keys.append(self._client_prefix + client)
        return keys

    def acquire(self, vm_uuid: str, console_id: str, user: Optional[str] = None,
                client: Optional[str] = None) -> Deferred:  # fmt: skip
        """
        A cluster-wide lease per VM, in total, and (when given and capped)
        per user and per client address; or MAX_CONNECTIONS_REACHED.
        """
        return Deferred.fromCoroutine(self._acquire(vm_uuid, console_id, user, client))

    async def _acquire(self, vm_uuid: str, console_id: str, user: Optional[str], client: Optional[str]) -> Lease:
        member = f"{vm_uuid}|{self.node_id}|{uuid.uuid4().hex}"
        caps = ["" if user is None else self.max_per_user, "" if client is None else self.max_per_client]
        verdict = await self._redis.eval(
            _ACQUIRE,
            [self._all] + self._keys_of(vm_uuid, user, client),
            [self._ttl_ms, self.max_per_vm, self.max_total, member] + caps,
        )
        if verdict != "OK":
            self._log_refusal(verdict, vm_uuid, console_id, user, client)
            raise ConsoleError(ErrorCode.MAX_CONNECTIONS_REACHED)
        lease = Lease(member, vm_uuid, console_id, self._release, user, client)
        self._leases[member] = lease
        self.start()
        return lease

    def _log_refusal(self, verdict: str, vm_uuid: str, console_id: str, user: Optional[str],
                     client: Optional[str]) -> None:  # fmt: skip
        if verdict == "USER":
            over = f"user {user} has {self.max_per_user} in the cluster"
        elif verdict == "CLIENT":
            over = f"client {client} has {self.max_per_client} in the cluster"
        else:
            over = f"cluster limit reached (max {self.max_per_vm} per VM, {self.max_total} in total)"
        log.info("console {console_id} of {vm_uuid} refused: {over}", console_id=console_id, vm_uuid=vm_uuid,
                 over=over)  # fmt: skip

    def _release(self, lease: Lease) -> None:
        if self._leases.pop(lease.key, None) is None:
            return
        if not self._leases:
            self.stop()
        keys = [self._all] + self._keys_of(lease.vm_uuid, lease.user, lease.client)
        d = self._redis.eval(_RELEASE, keys, [lease.key])
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
        keys, args = [self._all], [self._ttl_ms]
        for lease in leases:
            mine = self._keys_of(lease.vm_uuid, lease.user, lease.client)
            keys += mine
            args += [lease.key, len(mine)]
        lapsed = int(await self._redis.eval(_RENEW, keys, args))
        if lapsed:
            log.warn("{n} leases had lapsed (renewals late?) and were restored", n=lapsed)
        return len(leases)

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
