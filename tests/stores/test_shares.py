"""
Tests for L{vaporproxy.stores.shares}: share links in memory.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.stores.shares import MemoryShareStore

VM = "6f1b2a3c-1111-4222-8333-944455556666"


class MemoryShareStoreTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.store = MemoryShareStore(self.clock)

    def create(self, **kwargs):
        args = dict(vm_uuid=VM, vm_name="web-1", mode="view", creator="alice", ttl=900, max_uses=2)
        args.update(kwargs)
        return self.successResultOf(self.store.create(**args))

    def code(self, secret):
        return self.failureResultOf(self.store.use(secret), ConsoleError).value.code

    def test_usesCounted(self):
        """
        When a share is used max_uses times, each use answers the uses left and the next is TOKEN_ALREADY_USED.
        """
        secret, share = self.create()
        self.assertEqual(self.successResultOf(self.store.use(secret)).uses_left, 1)
        self.assertEqual(self.successResultOf(self.store.use(secret)).uses_left, 0)
        self.assertEqual(self.code(secret), ErrorCode.TOKEN_ALREADY_USED)

    def test_onlyHashStored(self):
        """
        When a share is made, its secret appears nowhere in the store; only its SHA-256 does.
        """
        secret, share = self.create()
        self.assertEqual(len(secret), 64)
        self.assertNotIn(secret, repr(vars(self.store)))
        self.assertNotIn(secret, repr(share))

    def test_expiry(self):
        """
        When the share's ttl has passed, using it is TOKEN_EXPIRED and it leaves the list.
        """
        secret, share = self.create(ttl=60)
        self.clock.advance(60)
        self.assertEqual(self.successResultOf(self.store.list(VM)), [])
        self.assertEqual(self.code(secret), ErrorCode.TOKEN_EXPIRED)
        self.assertEqual(self.code(secret), ErrorCode.INVALID_TOKEN)

    def test_revoke(self):
        """
        When a share is revoked, it is answered once and its secret no longer works, with a message that says it may have been revoked.
        """
        secret, share = self.create()
        self.assertEqual(self.successResultOf(self.store.revoke(share.share_id)), share)
        self.assertIsNone(self.successResultOf(self.store.revoke(share.share_id)))
        error = self.failureResultOf(self.store.use(secret), ConsoleError).value
        self.assertEqual((error.code, error.message), (ErrorCode.INVALID_TOKEN, "Unknown or revoked share link"))

    def test_revokeByCreator(self):
        """
        When a creator's key is removed, that creator's shares stop working and others' stay.
        """
        alice, _ = self.create()
        bob, _ = self.create(creator="bob")
        self.assertEqual(len(self.successResultOf(self.store.revoke_by_creator("alice"))), 1)
        self.assertEqual(self.code(alice), ErrorCode.INVALID_TOKEN)
        self.assertEqual(self.successResultOf(self.store.use(bob)).creator, "bob")

    def test_listPublicFields(self):
        """
        When the VM's shares are listed, each shows id, mode, uses left, expiry and creator, never a secret.
        """
        secret, share = self.create(mode="control")
        self.create(vm_uuid="other")
        listed = self.successResultOf(self.store.list(VM))
        self.assertEqual([s.share_id for s in listed], [share.share_id])
        public = listed[0].public(lambda t: f"T{t:.0f}")
        self.assertEqual(
            public,
            {"share_id": share.share_id, "vm_id": VM, "mode": "control", "creator": "alice", "max_uses": 2,
             "uses_left": 2, "expires_at": "T900"},
        )

    def test_malformedSecret(self):
        """
        When the presented secret is not 64 hex characters, it is INVALID_TOKEN without a lookup.
        """
        self.assertEqual(self.code("zz" * 32), ErrorCode.INVALID_TOKEN)
        self.assertEqual(self.code("abc"), ErrorCode.INVALID_TOKEN)

    def test_purge(self):
        """
        When the cleanup runs after expiry, expired shares are forgotten and counted.
        """
        self.create(ttl=10)
        self.create(ttl=100)
        self.clock.advance(50)
        self.assertEqual(self.store.purge(), 1)
