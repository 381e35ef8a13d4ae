"""
Tests for L{vaporproxy.http.revocation}: a reload that removes or narrows a
credential revokes its tokens and live consoles.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any, List, Optional

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from vaporproxy.config import ApiKey, AuthConfig, JWTConfig
from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.http.auth import jwt_key_id, key_id_of
from vaporproxy.http import revocation as revocation_module
from vaporproxy.http.revocation import Revocation, RevokingTokenStore, close_revoked, terminate_share
from vaporproxy.interfaces import Grant, Redemption
from vaporproxy.stores.tokens import MemoryTokenStore

ALICE = ApiKey("alice", hashlib.sha256(b"alice-key").hexdigest(), ("web-*",))
BOB = ApiKey("bob", hashlib.sha256(b"bob-key").hexdigest(), ("*",))
AUTH = AuthConfig(api_keys=(ALICE, BOB))
WEB_UUID = "6f1c2a4e-3b5d-4c8e-9a7f-0123456789ab"


def grant(key: ApiKey, vm_ref: str = WEB_UUID, vm_name: Optional[str] = "web-1") -> Grant:
    return Grant(vm_ref=vm_ref, vm_uuid=WEB_UUID, console_type="vnc", display=0, user=key.user,
                 key_id=key_id_of(key), vm_name=vm_name)  # fmt: skip


class RevocationTests(SynchronousTestCase):
    """
    The rule.
    """

    def test_allowed(self) -> None:
        """When the minting key still exists and its patterns match the VM's name, the grant stands (the client used the UUID)."""
        self.assertTrue(Revocation(AUTH).allows(grant(ALICE)))

    def test_key_removed(self) -> None:
        """When the minting key is removed, its grants are revoked; other keys' stand."""
        revocation = Revocation(AUTH)
        revocation.reload(AuthConfig(api_keys=(BOB,)))
        self.assertEqual((revocation.allows(grant(ALICE)), revocation.allows(grant(BOB))), (False, True))

    def test_key_narrowed(self) -> None:
        """When the minting key's vms no longer match the VM, its grants for it are revoked."""
        revocation = Revocation(replace(AUTH, api_keys=(replace(ALICE, vms=("db-*",)), BOB)))
        self.assertFalse(revocation.allows(grant(ALICE)))

    def test_key_replaced(self) -> None:
        """When a user's key is replaced by a new secret, the old key's grants are revoked."""
        new_alice = replace(ALICE, sha256=hashlib.sha256(b"alice-new").hexdigest())
        self.assertFalse(Revocation(AuthConfig(api_keys=(new_alice, BOB))).allows(grant(ALICE)))

    def test_jwt(self) -> None:
        """When JWTs stop being accepted, JWT callers' grants are revoked; while accepted, they stand."""
        jwt_grant = replace(grant(BOB), key_id=jwt_key_id("carol"))
        jwt = JWTConfig(algorithms=("RS256",), key_file=__file__)
        self.assertTrue(Revocation(replace(AUTH, jwt=jwt)).allows(jwt_grant))
        self.assertFalse(Revocation(AUTH).allows(jwt_grant))

    def test_grant_without_identity(self) -> None:
        """When a grant carries no credential identity (minted before identities), it stands."""
        self.assertTrue(Revocation(AuthConfig()).allows(replace(grant(ALICE), key_id=None)))


def share_grant(creator: ApiKey, share_id: str = "5ea1") -> Grant:
    """A grant minted through share C{share_id} that C{creator} made."""
    return replace(grant(creator), key_id="share:" + share_id)


class ShareRevocationTests(SynchronousTestCase):
    """
    Grants minted through share links.
    """

    def test_share_stands(self) -> None:
        """When the share stands and its creator may still control the VM, its grant stands."""
        self.assertTrue(Revocation(AUTH).allows(share_grant(ALICE)))

    def test_creator_removed(self) -> None:
        """When a reload removes the share's creator, the share's grants are refused."""
        self.assertFalse(Revocation(AuthConfig(api_keys=(BOB,))).allows(share_grant(ALICE)))

    def test_creator_narrowed(self) -> None:
        """When the creator's key no longer matches the VM, the share's grants are refused."""
        narrowed = replace(ALICE, vms=("db-*",))
        self.assertFalse(Revocation(AuthConfig(api_keys=(narrowed, BOB))).allows(share_grant(ALICE)))

    def test_creator_view_only(self) -> None:
        """When the creator's key became view-only, a share it made is refused (a share never grants more than its creator)."""
        viewer = replace(ALICE, access="view")
        self.assertFalse(Revocation(AuthConfig(api_keys=(viewer, BOB))).allows(share_grant(ALICE)))

    def test_share_revoked(self) -> None:
        """When the share is revoked, its grants are refused and another share's stand."""
        revocation = Revocation(AUTH)
        revocation.revoke_share("5ea1")
        self.assertEqual((revocation.allows(share_grant(ALICE)), revocation.allows(share_grant(ALICE, "0th3r"))),
                         (False, True))  # fmt: skip

    def test_bounded(self) -> None:
        """When more shares are revoked than are remembered, the oldest are forgotten first."""
        self.patch(revocation_module, "REVOKED_SHARES_KEPT", 3)
        revocation = Revocation(AUTH)
        for share_id in ("a", "b", "c", "d"):
            revocation.revoke_share(share_id)
        self.assertEqual([revocation.allows(share_grant(ALICE, i)) for i in "abcd"], [True, False, False, False])

    def test_terminate_share(self) -> None:
        """When a share is revoked, a token minted through it earlier is refused and only its consoles are closed."""
        revocation = Revocation(AUTH)
        store = RevokingTokenStore(MemoryTokenStore(Clock(), 300), revocation)
        issued = self.successResultOf(store.issue(share_grant(ALICE)))
        through, other = FakeRecord("c1", share_grant(ALICE)), FakeRecord("c2", share_grant(ALICE, "0th3r"))
        self.assertEqual(terminate_share(FakeRegistry(through, other), store, "5ea1"), 1)
        self.assertEqual((through.owner.ended, other.owner.ended),
                         ([(ErrorCode.SESSION_TERMINATED, "Share link revoked")], []))  # fmt: skip
        failure = self.failureResultOf(store.redeem(issued.token, WEB_UUID, None), ConsoleError)
        self.assertEqual(failure.value.message, "Token revoked")


class RevokingStoreTests(SynchronousTestCase):
    """
    Redemption through the revoking store.
    """

    def setUp(self) -> None:
        self.revocation = Revocation(AUTH)
        self.inner = MemoryTokenStore(Clock(), 300)
        self.store = RevokingTokenStore(self.inner, self.revocation)

    def test_revoked_token_refused(self) -> None:
        """When the minting key was removed by a reload, its unredeemed token is refused as revoked."""
        issued = self.successResultOf(self.store.issue(grant(ALICE)))
        self.revocation.reload(AuthConfig(api_keys=(BOB,)))
        failure = self.failureResultOf(self.store.redeem(issued.token, WEB_UUID, None), ConsoleError)
        self.assertEqual((failure.value.code, failure.value.message), (ErrorCode.INVALID_TOKEN, "Token revoked"))

    def test_allowed_token_redeemed(self) -> None:
        """When the minting key still allows the VM, the token is redeemed as before."""
        issued = self.successResultOf(self.store.issue(grant(BOB)))
        redemption = self.successResultOf(self.store.redeem(issued.token, WEB_UUID, None))
        self.assertIsInstance(redemption, Redemption)

    def test_transparent(self) -> None:
        """When other methods or the ttl are used, they are the wrapped store's."""
        self.store.ttl = 60.0
        self.assertEqual((self.inner.ttl, self.store.ttl), (60.0, 60.0))
        self.assertEqual(self.successResultOf(self.store.count()), 0)


class FakeOwner:
    def __init__(self, g: Grant):
        self._redemption = Redemption(grant=g, first=True)
        self.ended: List[Any] = []

    def revoke(self, message: str) -> None:
        # What the console WebSocket's revoke() ends it with (its session):
        # 4010 with the JSON error text C{message}.
        self.ended.append((ErrorCode.SESSION_TERMINATED, message))


class FakeRecord:
    def __init__(self, console_id: str, g: Grant):
        self.console_id = console_id
        self.vm_id = g.vm_uuid
        self.owner = FakeOwner(g)


class FakeRegistry:
    def __init__(self, *records: FakeRecord):
        self.records = records

    def consoles(self) -> List[FakeRecord]:
        return list(self.records)


class CloseRevokedTests(SynchronousTestCase):
    """
    Live consoles after a reload.
    """

    def test_closes_revoked_only(self) -> None:
        """When a reload removes a key, its live consoles are ended with SESSION_TERMINATED (4010) and others stay."""
        alice, bob = FakeRecord("c1", grant(ALICE)), FakeRecord("c2", grant(BOB))
        revocation = Revocation(AuthConfig(api_keys=(BOB,)))
        self.assertEqual(close_revoked(FakeRegistry(alice, bob), revocation.allows), 1)
        self.assertEqual(alice.owner.ended, [(ErrorCode.SESSION_TERMINATED, "Your access to this VM was revoked")])
        self.assertEqual(bob.owner.ended, [])
        self.assertEqual(ErrorCode.SESSION_TERMINATED.close_code, 4010)

    def test_share_console_of_removed_creator(self) -> None:
        """When a reload removes a share's creator, the consoles opened through the share read that the link was revoked."""
        watcher, alice = FakeRecord("c1", share_grant(ALICE)), FakeRecord("c2", grant(ALICE))
        revocation = Revocation(AuthConfig(api_keys=(BOB,)))
        self.assertEqual(close_revoked(FakeRegistry(watcher, alice), revocation.allows), 2)
        self.assertEqual((watcher.owner.ended, alice.owner.ended),
                         ([(ErrorCode.SESSION_TERMINATED, "Share link revoked")],
                          [(ErrorCode.SESSION_TERMINATED, "Your access to this VM was revoked")]))  # fmt: skip
