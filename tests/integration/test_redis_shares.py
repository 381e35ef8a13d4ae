"""
L{vaporproxy.stores.redis_shares.RedisShareStore} against a real
C{redis-server}: uses counted atomically across clients (nodes), list,
revoke, revoke by creator, expiry.
"""

from twisted.internet import reactor
from twisted.internet.defer import DeferredList
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from tests.integration.test_redis_tokens import RedisTestMixin
from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.stores.redis_shares import RedisShareStore

VM = "6f1b2a3c-1111-4222-8333-944455556666"


class RedisShareStoreTests(RedisTestMixin, TestCase):
    def store(self, clock=reactor):
        return RedisShareStore(self.client(), clock, prefix="test:")

    async def create(self, store, **kwargs):
        args = dict(vm_uuid=VM, vm_name="web-1", mode="view", creator="alice", ttl=60, max_uses=2)
        args.update(kwargs)
        return await store.create(**args)

    async def code(self, store, secret):
        with self.assertRaises(ConsoleError) as e:
            await store.use(secret)
        return e.exception.code

    async def test_usesAcrossNodes(self):
        """
        When two nodes use a two-use share, each use answers the uses left and a third, on either node, is TOKEN_ALREADY_USED.
        """
        a, b = self.store(), self.store()
        secret, share = await self.create(a)
        self.assertEqual((await b.use(secret)).uses_left, 1)
        self.assertEqual((await a.use(secret)).uses_left, 0)
        self.assertEqual(await self.code(b, secret), ErrorCode.TOKEN_ALREADY_USED)

    async def test_lastUseRace(self):
        """
        When 20 uses of a one-use share race from two nodes, exactly one wins.
        """
        a, b = self.store(), self.store()
        secret, _ = await self.create(a, max_uses=1)
        results = await DeferredList([(a if i % 2 else b).use(secret) for i in range(20)], consumeErrors=True)
        wins = [r for ok, r in results if ok]
        losses = [r.value.code for ok, r in results if not ok]
        self.assertEqual(len(wins), 1)
        self.assertEqual(set(losses), {ErrorCode.TOKEN_ALREADY_USED})

    async def test_listAndRevoke(self):
        """
        When a share is listed and revoked from another node, it disappears everywhere and its secret stops working.
        """
        a, b = self.store(), self.store()
        secret, share = await self.create(a, mode="control")
        await self.create(a, vm_uuid="another-vm")
        listed = await b.list(VM)
        self.assertEqual([(s.share_id, s.mode, s.uses_left) for s in listed], [(share.share_id, "control", 2)])
        self.assertNotIn(secret, repr(listed))
        self.assertEqual((await b.revoke(share.share_id)).share_id, share.share_id)
        self.assertIsNone(await a.revoke(share.share_id))
        self.assertEqual(await a.list(VM), [])
        self.assertEqual(await self.code(a, secret), ErrorCode.INVALID_TOKEN)

    async def test_revokeByCreator(self):
        """
        When a creator's key is removed, every share it made stops working; others' stay.
        """
        store = self.store()
        one, _ = await self.create(store)
        two, _ = await self.create(store)
        bob, _ = await self.create(store, creator="bob")
        self.assertEqual(len(await store.revoke_by_creator("alice")), 2)
        self.assertEqual(await self.code(store, one), ErrorCode.INVALID_TOKEN)
        self.assertEqual(await self.code(store, two), ErrorCode.INVALID_TOKEN)
        self.assertEqual((await store.use(bob)).creator, "bob")

    async def test_expiry(self):
        """
        When the node's clock passes the expiry, a use is TOKEN_EXPIRED; once Redis dropped the key, INVALID_TOKEN.
        """
        clock = Clock()
        clock.advance(reactor.seconds())
        store = self.store(clock)
        secret, _ = await self.create(store, ttl=0.5)
        clock.advance(1)
        self.assertEqual(await self.code(store, secret), ErrorCode.TOKEN_EXPIRED)
        await self.sleep(0.7)
        self.assertEqual(await self.code(store, secret), ErrorCode.INVALID_TOKEN)
        self.assertEqual(await store.list(VM), [])
