"""
L{vaporproxy.stores.redis_tokens.RedisTokenStore}'s C{unredeem},
C{outstanding} and C{issue_within} against a real C{redis-server}: the
shared give-back suite over two "nodes", the token's Redis expiry kept, and
the outstanding-token cap holding under racing mints from two nodes.
"""

from __future__ import annotations

from typing import List

from twisted.internet import reactor
from twisted.internet.defer import DeferredList
from twisted.trial.unittest import TestCase

from tests.integration.test_redis_tokens import PREFIX, RedisTestMixin
from tests.stores.test_unredeem import KEYED, GiveBackTestsMixin
from vaporproxy.errors import ErrorCode
from vaporproxy.stores.redis_tokens import RedisTokenStore
from vaporproxy.stores.tokens import OutstandingLimit, token_hash


class RedisGiveBackTests(RedisTestMixin, GiveBackTestsMixin, TestCase):
    """
    The shared suite; each node has its own connection.
    """

    ttl = 1.0

    async def makeNodes(self, n: int) -> List[RedisTokenStore]:
        return [self.store(self.ttl) for _ in range(n)]

    def store(self, ttl: float) -> RedisTokenStore:
        store = RedisTokenStore(self.client(), reactor, ttl, session_ttl=3.0, prefix=PREFIX)
        self.addCleanup(store.stop)
        return store

    async def advance(self, seconds: float) -> None:
        await self.sleep(seconds)

    async def test_keyExpiryKept(self) -> None:
        """When a redemption is given back, the token's Redis key keeps the expiry it had (nothing renews it)."""
        store = self.store(60.0)
        token = (await store.issue(KEYED)).token
        key = PREFIX + "tok:" + token_hash(token)
        await store.redeem(token, KEYED.vm_uuid, None)
        before = int(await self.client().execute("PTTL", key))
        await self.sleep(0.2)
        await store.unredeem(token)
        after = int(await self.client().execute("PTTL", key))
        self.assertTrue(0 < after <= before - 150, (before, after))

    async def test_capRefuses(self) -> None:
        """When a credential holds the most unused tokens, issue_within refuses with RATE_LIMITED and the wait until the oldest expires; a redemption makes room."""
        a, b = self.store(30.0), self.store(30.0)
        first = await a.issue_within(KEYED, 2)
        await b.issue_within(KEYED, 2)
        with self.assertRaises(OutstandingLimit) as e:
            await a.issue_within(KEYED, 2)
        self.assertIs(e.exception.code, ErrorCode.RATE_LIMITED)
        self.assertEqual(e.exception.count, 2)
        self.assertTrue(25 < e.exception.wait <= 30, e.exception.wait)
        await b.redeem(first.token, KEYED.vm_uuid, None)
        await a.issue_within(KEYED, 2)
        self.assertEqual(await a.count(), 2)

    async def test_capUnderRace(self) -> None:
        """When 40 mints of one credential race from two nodes against a cap of 5, exactly 5 tokens are minted."""
        a, b = self.store(30.0), self.store(30.0)
        results = await DeferredList([(a if i % 2 else b).issue_within(KEYED, 5) for i in range(40)],
                                     consumeErrors=True)  # fmt: skip
        minted = [r for ok, r in results if ok]
        refused = {type(r.value) for ok, r in results if not ok}
        self.assertEqual((len(minted), refused), (5, {OutstandingLimit}))
        self.assertEqual((await b.outstanding("key-a"))[0], 5)
