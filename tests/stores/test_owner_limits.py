"""
Tests for L{vaporproxy.stores.limits.MemoryLimiter}'s per-user and
per-client caps (issue #11).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from vaporproxy.config import ConsoleConfig
from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.stores.limits import MemoryLimiter

CLIENT = "198.51.100.7"
OTHER = "198.51.100.8"


class OwnerLimitTests(SynchronousTestCase):
    """
    Per-user and per-client console caps.
    """

    def refused(self, d: object) -> None:
        failure = self.failureResultOf(d, ConsoleError)
        self.assertIs(failure.value.code, ErrorCode.MAX_CONNECTIONS_REACHED)

    def test_per_user(self) -> None:
        """When a user holds max_connections_per_user consoles, the next is refused; another user is admitted; a release frees one."""
        limiter = MemoryLimiter(10, 10, max_per_user=2)
        leases = [self.successResultOf(limiter.acquire(f"vm{i}", f"c{i}", user="alice", client=CLIENT)) for i in range(2)]
        self.refused(limiter.acquire("vm9", "c9", user="alice", client=CLIENT))
        self.successResultOf(limiter.acquire("vm9", "c10", user="bob", client=CLIENT))
        leases[0].release()
        self.successResultOf(limiter.acquire("vm9", "c11", user="alice", client=CLIENT))

    def test_per_client(self) -> None:
        """When one client address holds max_connections_per_client consoles, the next from it is refused, whatever the user."""
        limiter = MemoryLimiter(10, 10, max_per_client=1)
        self.successResultOf(limiter.acquire("vm1", "c1", user="alice", client=CLIENT))
        self.refused(limiter.acquire("vm2", "c2", user="bob", client=CLIENT))
        self.successResultOf(limiter.acquire("vm2", "c3", user="bob", client=OTHER))

    def test_unlimited_by_default(self) -> None:
        """When the caps are 0 (the default), one user and one address may hold every slot (a benchmark host, a NAT)."""
        self.assertEqual((ConsoleConfig().max_connections_per_user, ConsoleConfig().max_connections_per_client), (0, 0))
        limiter = MemoryLimiter(1000, 1000)
        for i in range(1000):
            self.successResultOf(limiter.acquire(f"vm{i}", f"c{i}", user="bench", client=CLIENT))

    def test_set_limits(self) -> None:
        """When a reload sets the caps, new consoles meet them; without them, the caps are kept."""
        limiter = MemoryLimiter(10, 10)
        limiter.set_limits(10, 10, 1, 0)
        self.successResultOf(limiter.acquire("vm1", "c1", user="alice"))
        self.refused(limiter.acquire("vm2", "c2", user="alice"))
        limiter.set_limits(10, 10)
        self.assertEqual(limiter.max_per_user, 1)

    def test_release_counts(self) -> None:
        """When every lease is released, no per-user or per-client count is left behind."""
        limiter = MemoryLimiter(10, 10, 5, 5)
        lease = self.successResultOf(limiter.acquire("vm1", "c1", user="alice", client=CLIENT))
        lease.release()
        lease.release()
        self.assertEqual((dict(limiter._per_user), dict(limiter._per_client)), ({}, {}))
