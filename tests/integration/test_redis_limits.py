"""
L{vaporproxy.stores.redis_limits.RedisLimiter} and L{RedisBackend} against a real
C{redis-server}: the shared limiter suite over two "processes", lapsing
leases of a dead process, Redis outages, terminate requests over pub/sub and
cluster figures.
"""

from __future__ import annotations

import time
from typing import List

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from tests.integration.test_redis_tokens import PREFIX, RedisTestMixin
from tests.stores.test_limits import VM_A, VM_B, LimiterTestsMixin
from vaporproxy.config import ConsoleConfig, TokensConfig
from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.stores.redis import RedisBackend, connect_redis
from vaporproxy.stores.redis_limits import RedisLimiter
from tests.stores.test_tokens import GRANT


class RedisLimiterTests(RedisTestMixin, LimiterTestsMixin, TestCase):
    """
    L{RedisLimiter} under the shared suite; each node has its own
    connection and node id, as separate processes would.
    """

    async def makeNodes(self, n: int, max_per_vm: int, max_total: int) -> List[RedisLimiter]:
        limiters = []
        for i in range(n):
            limiter = RedisLimiter(self.client(), reactor, 5.0, max_per_vm, max_total, node_id=f"node{i}", prefix=PREFIX)
            self.addCleanup(limiter.stop)
            limiters.append(limiter)
        self.limiters = getattr(self, "limiters", []) + limiters
        return limiters

    async def settle(self) -> None:
        for limiter in self.limiters:
            await limiter.flush()


class RedisLimiterLeaseTests(RedisTestMixin, TestCase):
    """
    Lease renewal and lapse.
    """

    async def test_renewedLeasesLive(self) -> None:
        """
        When a process keeps renewing, its leases outlive the lease TTL many
        times over.
        """
        alive = RedisLimiter(self.client(), reactor, 0.6, 1, 10, prefix=PREFIX)
        other = RedisLimiter(self.client(), reactor, 0.6, 1, 10, prefix=PREFIX)
        self.addCleanup(alive.stop)
        lease = await alive.acquire(VM_A, "c1")
        await self.sleep(2.0)
        with self.assertRaises(ConsoleError) as e:
            await other.acquire(VM_A, "c2")
        self.assertEqual(e.exception.code, ErrorCode.MAX_CONNECTIONS_REACHED)
        self.assertEqual((await other.stats())["connections_per_vm"], {VM_A: 1})
        lease.release()
        await alive.flush()
        (await other.acquire(VM_A, "c2")).release()

    async def test_deadProcessLeasesLapse(self) -> None:
        """
        When a process dies (its renewals never run), its slots are free
        again within the lease TTL.
        """
        # The dead process: its timers run on a clock that never advances.
        dead = RedisLimiter(self.client(), Clock(), 0.5, 2, 2, node_id="dead", prefix=PREFIX)
        live = RedisLimiter(self.client(), reactor, 0.5, 2, 2, node_id="live", prefix=PREFIX)
        self.addCleanup(live.stop)
        await dead.acquire(VM_A, "c1")
        await dead.acquire(VM_B, "c2")
        with self.assertRaises(ConsoleError):
            await live.acquire(VM_A, "c3")
        self.assertEqual((await live.stats())["total_connections"], 2)
        started = time.monotonic()
        await self.sleep(0.55)
        leases = [await live.acquire(VM_A, "c3"), await live.acquire(VM_A, "c4")]
        self.assertLess(time.monotonic() - started, 1.5)
        self.assertEqual(await live.stats(), {"total_connections": 2, "connections_per_vm": {VM_A: 2}})
        for lease in leases:
            lease.release()

    async def test_redisDown(self) -> None:
        """
        When Redis is down, acquire and stats fail with SERVICE_UNAVAILABLE
        within the timeout, and work again once Redis is back.
        """
        limiter_lease_ttl = 5.0
        limiter = RedisLimiter(self.client(timeout=0.5), reactor, limiter_lease_ttl, 2, 10, prefix=PREFIX)
        self.addCleanup(limiter.stop)
        self.server.stop()
        for call in (lambda: limiter.acquire(VM_A, "c1"), limiter.stats):
            await self.assertUnavailableQuickly(call)
        self.server.start()
        lease = await self.eventually(lambda: limiter.acquire(VM_A, "c1"), within=8.0)
        # An acquire that timed out while Redis was coming back may still
        # have reached it: such a lease has no owner to renew it, so it
        # lapses within lease_ttl and only ours stays.
        deadline = time.monotonic() + limiter_lease_ttl + 3.0
        while (await limiter.stats())["total_connections"] != 1 and time.monotonic() < deadline:
            await self.sleep(0.2)
        self.assertEqual((await limiter.stats())["total_connections"], 1)
        lease.release()


class RedisBackendTests(RedisTestMixin, TestCase):
    """
    L{connect_redis}: two processes' backends on one Redis.
    """

    def backend(self, node_id: str, lease_ttl: float = 3.0) -> RedisBackend:
        tokens = TokensConfig(backend="redis", redis_url=self.server.url, redis_timeout=2.0, lease_ttl=lease_ttl)
        console = ConsoleConfig(max_connections_per_vm=2, max_total_connections=3, token_ttl=60.0)
        backend = connect_redis(tokens, console, reactor, prefix=PREFIX, node_id=node_id)
        self.addCleanup(backend.close)
        backend.start()
        return backend

    async def test_publishesAtStart(self) -> None:
        """
        When a process starts, its figures appear in the cluster figures at
        once, not after its first renewal period (lease_ttl / 3).
        """
        a = self.backend("a", lease_ttl=60.0)
        self.backend("b", lease_ttl=60.0)
        nodes: set = set()
        deadline = time.monotonic() + 10
        while nodes != {"a", "b"} and time.monotonic() < deadline:
            nodes = {p["node_id"] for p in (await a.cluster_stats())["processes"]}
            await self.sleep(0.05)
        self.assertEqual(nodes, {"a", "b"})
        [figures] = [p for p in (await a.cluster_stats())["processes"] if p["node_id"] == "b"]
        self.assertEqual(figures["total_connections"], 0)
        self.assertLessEqual(figures["started_at"], figures["updated_at"])

    async def test_nothingConnectsBeforeStart(self) -> None:
        """
        When a backend is built but not started, it opens no connection to
        Redis; closing it then is harmless.
        """
        tokens = TokensConfig(backend="redis", redis_url=self.server.url, redis_timeout=2.0, lease_ttl=3.0)
        backend = connect_redis(tokens, ConsoleConfig(), reactor, prefix=PREFIX, node_id="idle")
        observer = self.client()
        await self.sleep(0.3)
        # Only the observer's own connection.
        async def connections() -> int:
            listing = await observer.execute("CLIENT", "LIST")
            return len([line for line in listing.splitlines() if line.strip()])

        self.assertEqual(await connections(), 1)
        await backend.close()
        await self.sleep(0.1)
        self.assertEqual(await connections(), 1)

    async def test_terminateReachesEveryProcess(self) -> None:
        """
        When one process publishes a terminate request, every process's
        callbacks (its own included) get the VM UUID.
        """
        a, b = self.backend("a"), self.backend("b")
        seen_a: List[str] = []
        seen_b: List[str] = []
        a.on_terminate(seen_a.append)
        b.on_terminate(seen_b.append)
        # The subscriptions are made on connection; wait until both listen.
        listeners = 0
        deadline = time.monotonic() + 5
        while listeners < 2 and time.monotonic() < deadline:
            listeners = int((await self.client().execute("PUBSUB", "NUMSUB", PREFIX + "terminate"))[1])
            await self.sleep(0.05)
        self.assertEqual(await a.publish_terminate(VM_A), 2)
        deadline = time.monotonic() + 5
        while (not seen_a or not seen_b) and time.monotonic() < deadline:
            await self.sleep(0.02)
        self.assertEqual((seen_a, seen_b), ([VM_A], [VM_A]))

    async def test_clusterStats(self) -> None:
        """
        When two processes hold consoles, cluster_stats gives the cluster
        totals and each process's own figures.
        """
        a, b = self.backend("a"), self.backend("b")
        leases = [
            await a.limiter.acquire(VM_A, "c1"),
            await b.limiter.acquire(VM_A, "c2"),
            await b.limiter.acquire(VM_B, "c3"),
        ]
        await a.token_store.issue(GRANT)
        await b.report()
        stats = await a.cluster_stats()
        self.assertEqual(stats["total_connections"], 3)
        self.assertEqual(stats["connections_per_vm"], {VM_A: 2, VM_B: 1})
        self.assertEqual(stats["total_tokens"], 1)
        by_node = {p["node_id"]: p for p in stats["processes"]}
        self.assertEqual(set(by_node), {"a", "b"})
        self.assertEqual(by_node["a"]["connections_per_vm"], {VM_A: 1})
        self.assertEqual(by_node["b"]["total_connections"], 2)
        with self.assertRaises(ConsoleError) as e:
            await a.limiter.acquire(VM_B, "c4")
        self.assertEqual(e.exception.code, ErrorCode.MAX_CONNECTIONS_REACHED)
        for lease in leases:
            lease.release()

    async def test_closedProcessLeavesFigures(self) -> None:
        """
        When a process's backend is closed, it no longer appears in the
        cluster figures.
        """
        a, b = self.backend("a"), self.backend("b")
        await b.report()
        self.assertEqual({p["node_id"] for p in (await a.cluster_stats())["processes"]}, {"a", "b"})
        await b.close()
        self.assertEqual({p["node_id"] for p in (await a.cluster_stats())["processes"]}, {"a"})
