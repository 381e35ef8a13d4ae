"""
Tests for L{vaporproxy.stores.limits}.

L{LimiterTestsMixin} is the one behavioural suite of L{ILimiter}: it runs
here against L{MemoryLimiter} and in C{tests.integration.test_redis_limits}
against the Redis limiter on a real C{redis-server}.
"""

from __future__ import annotations

from typing import Any, List

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests.stores.test_tokens import synchronously
from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.interfaces import ILease, ILimiter
from vaporproxy.stores.limits import Lease, MemoryLimiter

VM_A = "5f1c7a52-3b6e-4c1d-9a53-0f2d7c8e9b10"
VM_B = "0b8e4f7a-1c2d-4e3f-8a9b-7c6d5e4f3a21"
VM_C = "9d3a1e64-5b7c-4f8e-a1b2-c3d4e5f60718"
CLIENT = "198.51.100.7"
OTHER = "198.51.100.8"


class LimiterTestsMixin:
    """
    The behaviour every L{ILimiter} shares.

    Subclasses provide C{async makeNodes(n, max_per_vm, max_total)}: C{n}
    limiters sharing their counts, as the limiters of C{n} processes of one
    cluster would (for a single-process limiter, the same one C{n} times).
    """

    async def makeNodes(self, n: int, max_per_vm: int, max_total: int) -> List[Any]:
        raise NotImplementedError()

    async def settle(self) -> None:
        """
        Wait until releases made so far are visible to every node (a
        distributed limiter's C{release()} need not wait for that).
        """

    async def makeLimiter(self, max_per_vm: int, max_total: int) -> Any:
        return (await self.makeNodes(1, max_per_vm, max_total))[0]

    async def assertRefused(self, d: Deferred) -> None:
        """
        Assert that C{d} fails with MAX_CONNECTIONS_REACHED.
        """
        try:
            result = await d
        except ConsoleError as e:
            self.assertEqual(e.code, ErrorCode.MAX_CONNECTIONS_REACHED)
            return
        self.fail(f"expected MAX_CONNECTIONS_REACHED, got {result!r}")

    async def test_lease(self) -> None:
        """
        When a console is admitted, its lease names the console and the VM and
        provides L{ILease}.
        """
        limiter = await self.makeLimiter(2, 10)
        self.assertTrue(verifyObject(ILimiter, limiter))
        lease = await limiter.acquire(VM_A, "c1")
        self.assertTrue(verifyObject(ILease, lease))
        self.assertEqual((lease.console_id, lease.vm_uuid), ("c1", VM_A))
        lease.release()

    async def test_perVMLimit(self) -> None:
        """
        When a VM has max_per_vm consoles, another one of it is refused while
        other VMs are still admitted.
        """
        limiter = await self.makeLimiter(2, 10)
        leases = [await limiter.acquire(VM_A, f"c{i}") for i in range(2)]
        await self.assertRefused(limiter.acquire(VM_A, "c3"))
        other = await limiter.acquire(VM_B, "c4")
        self.assertEqual(
            await limiter.stats(),
            {"total_connections": 3, "connections_per_vm": {VM_A: 2, VM_B: 1}},
        )
        for lease in leases + [other]:
            lease.release()

    async def test_totalLimit(self) -> None:
        """
        When max_total consoles are live, any further one is refused.
        """
        limiter = await self.makeLimiter(5, 3)
        leases = [
            await limiter.acquire(VM_A, "c1"),
            await limiter.acquire(VM_B, "c2"),
            await limiter.acquire(VM_B, "c3"),
        ]
        await self.assertRefused(limiter.acquire(VM_C, "c4"))
        await self.assertRefused(limiter.acquire(VM_A, "c5"))
        for lease in leases:
            lease.release()

    async def test_releaseFreesSlot(self) -> None:
        """
        When a lease is released, its slot can be taken again.
        """
        limiter = await self.makeLimiter(1, 10)
        lease = await limiter.acquire(VM_A, "c1")
        await self.assertRefused(limiter.acquire(VM_A, "c2"))
        lease.release()
        again = await limiter.acquire(VM_A, "c2")
        self.assertEqual((await limiter.stats())["connections_per_vm"], {VM_A: 1})
        again.release()

    async def test_releaseOnce(self) -> None:
        """
        When a lease is released several times, only the first has effect.
        """
        limiter = await self.makeLimiter(2, 10)
        first = await limiter.acquire(VM_A, "c1")
        second = await limiter.acquire(VM_A, "c2")
        first.release()
        first.release()
        first.release()
        self.assertEqual(
            await limiter.stats(),
            {"total_connections": 1, "connections_per_vm": {VM_A: 1}},
        )
        second.release()
        self.assertEqual(
            await limiter.stats(),
            {"total_connections": 0, "connections_per_vm": {}},
        )

    async def test_sameConsoleIdTwice(self) -> None:
        """
        When two leases carry the same console id, each counts and each
        release frees only its own slot.
        """
        limiter = await self.makeLimiter(3, 10)
        a = await limiter.acquire(VM_A, "same")
        b = await limiter.acquire(VM_A, "same")
        self.assertEqual((await limiter.stats())["total_connections"], 2)
        a.release()
        a.release()
        self.assertEqual((await limiter.stats())["total_connections"], 1)
        b.release()

    async def test_setLimits(self) -> None:
        """
        When the limits are lowered, live leases are kept and new consoles
        are refused until the count is below the new limit.
        """
        limiter = await self.makeLimiter(3, 10)
        leases = [await limiter.acquire(VM_A, f"c{i}") for i in range(3)]
        limiter.set_limits(2, 10)
        self.assertEqual((await limiter.stats())["total_connections"], 3)
        await self.assertRefused(limiter.acquire(VM_A, "c4"))
        leases.pop().release()
        await self.assertRefused(limiter.acquire(VM_A, "c4"))
        leases.pop().release()
        leases.append(await limiter.acquire(VM_A, "c4"))
        limiter.set_limits(5, 2)
        await self.assertRefused(limiter.acquire(VM_B, "c5"))
        for lease in leases:
            lease.release()

    async def test_sharedAcrossNodes(self) -> None:
        """
        When consoles are admitted on two nodes, the limits count them
        together and a release on one node frees a slot for the other.
        """
        a, b = await self.makeNodes(2, 2, 3)
        la = await a.acquire(VM_A, "c1")
        lb = await b.acquire(VM_A, "c2")
        await self.assertRefused(a.acquire(VM_A, "c3"))
        await self.assertRefused(b.acquire(VM_A, "c3"))
        lc = await b.acquire(VM_B, "c4")
        await self.assertRefused(a.acquire(VM_C, "c5"))
        self.assertEqual(
            await a.stats(),
            {"total_connections": 3, "connections_per_vm": {VM_A: 2, VM_B: 1}},
        )
        la.release()
        await self.settle()
        lx = await b.acquire(VM_A, "c6")
        for lease in (lb, lc, lx):
            lease.release()
        await self.settle()
        self.assertEqual((await a.stats())["total_connections"], 0)


    async def capped(self, n: int, max_per_user: int = 0, max_per_client: int = 0) -> List[Any]:
        nodes = await self.makeNodes(n, 10, 10)
        for node in nodes:
            node.set_limits(10, 10, max_per_user, max_per_client)
        return nodes

    async def test_perUserCapAcrossNodes(self) -> None:
        """
        When a user holds max_per_user consoles over two nodes, the next is refused on either; another user is admitted; a release frees one.
        """
        a, b = await self.capped(2, max_per_user=2)
        held = [await a.acquire(VM_A, "c1", user="alice", client=CLIENT),
                await b.acquire(VM_B, "c2", user="alice", client=OTHER)]  # fmt: skip
        await self.assertRefused(a.acquire(VM_C, "c3", user="alice", client=OTHER))
        await self.assertRefused(b.acquire(VM_C, "c3", user="alice"))
        bob = await b.acquire(VM_C, "c4", user="bob", client=CLIENT)
        held.pop(0).release()
        await self.settle()
        held.append(await b.acquire(VM_C, "c5", user="alice"))
        for lease in held + [bob]:
            lease.release()
        await self.settle()
        self.assertEqual((await a.stats())["total_connections"], 0)

    async def test_perClientCapAcrossNodes(self) -> None:
        """
        When one client address holds max_per_client consoles over two nodes, the next from it is refused whatever the user; another address is admitted.
        """
        a, b = await self.capped(2, max_per_client=2)
        held = [await a.acquire(VM_A, "c1", user="alice", client=CLIENT),
                await b.acquire(VM_A, "c2", user="bob", client=CLIENT)]  # fmt: skip
        await self.assertRefused(a.acquire(VM_B, "c3", user="carol", client=CLIENT))
        held.append(await b.acquire(VM_B, "c4", user="carol", client=OTHER))
        held.append(await a.acquire(VM_B, "c5"))  # no address known: not counted
        for lease in held:
            lease.release()

    async def test_capsUnlimitedByDefault(self) -> None:
        """
        When the per-user and per-client caps are 0, one user from one address may take every slot.
        """
        limiter = (await self.makeNodes(1, 50, 50))[0]
        held = [await limiter.acquire(VM_A, f"c{i}", user="bench", client=CLIENT) for i in range(50)]
        await self.assertRefused(limiter.acquire(VM_B, "c51", user="other", client=OTHER))
        for lease in held:
            lease.release()

    async def test_capSetCountsLiveConsoles(self) -> None:
        """
        When a reload sets a per-user cap, the consoles the user already holds count against it, and a release with the cap lowered frees them.
        """
        limiter = (await self.makeNodes(1, 10, 10))[0]
        held = [await limiter.acquire(VM_A, f"c{i}", user="alice", client=CLIENT) for i in range(2)]
        limiter.set_limits(10, 10, 2, 0)
        await self.assertRefused(limiter.acquire(VM_B, "c3", user="alice"))
        limiter.set_limits(10, 10)
        self.assertEqual((limiter.max_per_user, limiter.max_per_client), (2, 0))
        held.pop().release()
        await self.settle()
        held.append(await limiter.acquire(VM_B, "c3", user="alice"))
        for lease in held:
            lease.release()


@synchronously
class MemoryLimiterTests(LimiterTestsMixin, SynchronousTestCase):
    """
    L{MemoryLimiter} under the shared suite.
    """

    async def makeNodes(self, n: int, max_per_vm: int, max_total: int) -> List[MemoryLimiter]:
        return [MemoryLimiter(max_per_vm, max_total)] * n


class MemoryLimiterDetailTests(SynchronousTestCase):
    """
    L{MemoryLimiter} specifics.
    """

    def test_zeroLimit(self) -> None:
        """
        When a limit is zero, every console is refused.
        """
        limiter = MemoryLimiter(0, 10)
        f = self.failureResultOf(limiter.acquire(VM_A, "c1"), ConsoleError)
        self.assertEqual(f.value.code, ErrorCode.MAX_CONNECTIONS_REACHED)
        self.assertEqual(f.value.http_status, 429)

    def test_leaseReleasedFlag(self) -> None:
        """
        When a lease is released, its C{released} flag is set.
        """
        limiter = MemoryLimiter(1, 1)
        lease = self.successResultOf(limiter.acquire(VM_A, "c1"))
        self.assertFalse(lease.released)
        lease.release()
        self.assertTrue(lease.released)


class LeaseTests(SynchronousTestCase):
    """
    Tests for L{vaporproxy.stores.limits.Lease}, the lease of every limiter.
    """

    def test_releaseCallsBackOnce(self) -> None:
        """
        When a lease is released several times, its callback runs once, with the lease.
        """
        released: List[Lease] = []
        lease = Lease("member-1", VM_A, "c1", released.append)
        verifyObject(ILease, lease)
        self.assertEqual((lease.key, lease.vm_uuid, lease.console_id), ("member-1", VM_A, "c1"))
        lease.release()
        lease.release()
        self.assertEqual(released, [lease])
        self.assertTrue(lease.released)
