"""
L{vaporproxy.stores.redis_limits.RedisLimiter}'s per-user and per-client
caps against a real C{redis-server}: the leases behind them live, lapse and
are given back exactly like the per-VM and total ones.  (The shared
behaviour, across two nodes, is C{LimiterTestsMixin}'s.)
"""

from __future__ import annotations

import time

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from tests.integration.test_redis_tokens import PREFIX, RedisTestMixin
from tests.stores.test_limits import CLIENT, VM_A, VM_B
from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.stores.redis_limits import RedisLimiter


class RedisOwnerCapTests(RedisTestMixin, TestCase):
    """
    Per-user and per-client leases in Redis.
    """

    def limiter(self, lease_ttl: float, clock=reactor, node_id=None, **caps) -> RedisLimiter:  # type: ignore[no-untyped-def]
        limiter = RedisLimiter(self.client(), clock, lease_ttl, 10, 10, node_id=node_id, prefix=PREFIX, **caps)
        self.addCleanup(limiter.stop)
        return limiter

    async def assertRefused(self, d) -> None:  # type: ignore[no-untyped-def]
        with self.assertRaises(ConsoleError) as e:
            await d
        self.assertIs(e.exception.code, ErrorCode.MAX_CONNECTIONS_REACHED)

    async def members(self, key: str) -> list:
        return await self.client().execute("ZRANGE", PREFIX + key, 0, -1)

    async def test_deadNodeOwnerLeasesLapse(self) -> None:
        """When the node holding a user's and an address's consoles dies, their caps free up within the lease TTL."""
        dead = self.limiter(0.5, clock=Clock(), node_id="dead", max_per_user=1, max_per_client=1)
        live = self.limiter(0.5, node_id="live", max_per_user=1, max_per_client=1)
        await dead.acquire(VM_A, "c1", user="alice", client=CLIENT)
        await self.assertRefused(live.acquire(VM_B, "c2", user="alice"))
        await self.assertRefused(live.acquire(VM_B, "c2", user="bob", client=CLIENT))
        started = time.monotonic()
        await self.sleep(0.55)
        lease = await live.acquire(VM_B, "c2", user="alice", client=CLIENT)
        self.assertLess(time.monotonic() - started, 1.5)
        self.assertEqual(len(await self.members("leases:user:alice")), 1)
        lease.release()

    async def test_renewedOwnerLeasesLive(self) -> None:
        """When a node keeps renewing, its user's and address's leases outlive the lease TTL many times over."""
        alive = self.limiter(0.6, max_per_user=1, max_per_client=1)
        other = self.limiter(0.6, max_per_user=1, max_per_client=1)
        lease = await alive.acquire(VM_A, "c1", user="alice", client=CLIENT)
        await self.sleep(2.0)
        await self.assertRefused(other.acquire(VM_B, "c2", user="alice"))
        await self.assertRefused(other.acquire(VM_B, "c3", user="bob", client=CLIENT))
        lease.release()
        await alive.flush()
        (await other.acquire(VM_B, "c2", user="alice", client=CLIENT)).release()

    async def test_releaseLeavesNothing(self) -> None:
        """When every lease is released (each once, however often it is called), no user or address set keeps a member."""
        limiter = self.limiter(5.0, max_per_user=3, max_per_client=3)
        leases = [await limiter.acquire(VM_A, f"c{i}", user="alice", client=CLIENT) for i in range(3)]
        self.assertEqual(len(await self.members("leases:client:" + CLIENT)), 3)
        for lease in leases + leases:
            lease.release()
        await limiter.flush()
        for key in ("leases", "leases:vm:" + VM_A, "leases:user:alice", "leases:client:" + CLIENT):
            self.assertEqual(await self.members(key), [], key)

    async def test_refusalTakesNothing(self) -> None:
        """When a console is refused by the per-user cap, it holds no slot anywhere (no VM, total or address member)."""
        limiter = self.limiter(5.0, max_per_user=1)
        lease = await limiter.acquire(VM_A, "c1", user="alice", client=CLIENT)
        await self.assertRefused(limiter.acquire(VM_B, "c2", user="alice", client=CLIENT))
        self.assertEqual(await limiter.stats(), {"total_connections": 1, "connections_per_vm": {VM_A: 1}})
        self.assertEqual(len(await self.members("leases:client:" + CLIENT)), 1)
        lease.release()
