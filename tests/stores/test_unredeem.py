"""
Tests for C{unredeem} and C{outstanding} of the token stores: a console
refused with 4007 gives its token's redemption back (SPEC.md "Hostile
clients"), and a credential's unused tokens are counted for
C{auth.max_outstanding_tokens}.

L{GiveBackTestsMixin} runs here against L{MemoryTokenStore} on a L{Clock},
and in C{tests.integration.test_redis_unredeem} against the Redis store.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, List

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.stores.test_tokens import GRANT, SPICE_GRANT, synchronously
from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.stores.tokens import MemoryTokenStore

KEYED = replace(GRANT, key_id="key-a")
OTHER_KEY = replace(GRANT, key_id="key-b")


class GiveBackTestsMixin:
    """
    Subclasses provide C{ttl}, C{async makeNodes(n)} (stores sharing their
    state, as one cluster's nodes) and C{async advance(seconds)}.
    """

    ttl: float

    async def makeNodes(self, n: int) -> List[Any]:
        raise NotImplementedError()

    async def advance(self, seconds: float) -> None:
        raise NotImplementedError()

    async def refused(self, d: Any) -> ErrorCode:
        with self.assertRaises(ConsoleError) as e:  # type: ignore[attr-defined]
            await d
        return e.exception.code

    async def test_redeemAgain(self) -> None:
        """When a redemption is given back on one node, the token redeems again as a first use on another, once."""
        a, b = await self.makeNodes(2)
        token = (await a.issue(GRANT)).token
        await a.redeem(token, GRANT.vm_uuid, None)
        await a.unredeem(token)
        self.assertTrue((await b.redeem(token, GRANT.vm_uuid, None)).first)
        self.assertIs(await self.refused(a.redeem(token, GRANT.vm_uuid, None)), ErrorCode.TOKEN_ALREADY_USED)

    async def test_expiryKept(self) -> None:
        """When a redemption is given back, the token still expires at its original time."""
        [store] = await self.makeNodes(1)
        token = (await store.issue(GRANT)).token
        await store.redeem(token, GRANT.vm_uuid, None)
        await store.unredeem(token)
        await self.advance(self.ttl)
        self.assertIs(await self.refused(store.redeem(token, GRANT.vm_uuid, None)), ErrorCode.TOKEN_EXPIRED)

    async def test_spiceSessionKept(self) -> None:
        """When the token's console has a SPICE session, giving back does nothing, and an unknown or malformed token is ignored."""
        [store] = await self.makeNodes(1)
        token = (await store.issue(SPICE_GRANT)).token
        await store.redeem(token, SPICE_GRANT.vm_uuid, None)
        await store.attach_spice_session(token, 7)
        await store.unredeem(token)
        await store.unredeem("not a token")
        await store.unredeem("ab" * 32)
        redemption = await store.redeem(token, SPICE_GRANT.vm_uuid, None)
        self.assertEqual((redemption.first, redemption.spice_session_id), (False, 7))

    async def test_unusedNotChanged(self) -> None:
        """When an unused token is given back, it is still one unused token (counted once)."""
        [store] = await self.makeNodes(1)
        token = (await store.issue(KEYED)).token
        await store.unredeem(token)
        self.assertEqual((await store.outstanding("key-a"))[0], 1)
        self.assertEqual(await store.count(), 1)

    async def test_outstandingFollows(self) -> None:
        """When a credential's tokens are issued, redeemed, given back and expire, outstanding() counts its unused ones on every node; another credential's are apart."""
        a, b = await self.makeNodes(2)
        first = (await a.issue(KEYED)).token
        await b.issue(KEYED)
        await b.issue(OTHER_KEY)
        count, wait = await b.outstanding("key-a")
        self.assertEqual(count, 2)
        self.assertTrue(0 < wait <= self.ttl, wait)
        await b.redeem(first, GRANT.vm_uuid, None)
        self.assertEqual((await a.outstanding("key-a"))[0], 1)
        await a.unredeem(first)
        self.assertEqual((await b.outstanding("key-a"))[0], 2)
        self.assertEqual((await a.outstanding("key-b"))[0], 1)
        self.assertEqual(await a.outstanding("nobody"), (0, 0.0))
        await self.advance(self.ttl)
        self.assertEqual(await a.outstanding("key-a"), (0, 0.0))


@synchronously
class MemoryGiveBackTests(GiveBackTestsMixin, SynchronousTestCase):
    """
    L{MemoryTokenStore} under the shared suite, on a L{Clock}.
    """

    ttl = 60.0

    def setUp(self) -> None:
        self.clock = Clock()

    async def makeNodes(self, n: int) -> List[MemoryTokenStore]:
        return [MemoryTokenStore(self.clock, self.ttl)] * n

    async def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
