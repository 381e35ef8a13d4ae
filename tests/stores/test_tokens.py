"""
Tests for L{vaporproxy.stores.tokens}.

L{TokenStoreTestsMixin} is the one behavioural suite of L{ITokenStore}: it
runs here against L{MemoryTokenStore} driven by a L{task.Clock}, and in
C{tests.integration.test_redis_tokens} against the Redis store on a real
C{redis-server}.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Coroutine, List

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from vaporproxy.stores import tokens
from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.interfaces import Grant, ITokenStore, Redemption
from vaporproxy.stores.tokens import MemoryTokenStore, is_well_formed, token_hash, token_log_id

VM_UUID = "5f1c7a52-3b6e-4c1d-9a53-0f2d7c8e9b10"
VM_NAME = "web-01"
OTHER_UUID = "0b8e4f7a-1c2d-4e3f-8a9b-7c6d5e4f3a21"
SESSION_ID = 0x1234ABCD
#: sha256(("ab" * 32).encode()).hexdigest(), computed once by hand.
TOKEN_AB_SHA256 = "271a413bd339c5709fdceaec41f14f11e9fbfb5042d72d331c65f32b284cd09a"

GRANT = Grant(
    vm_ref=VM_NAME,
    vm_uuid=VM_UUID,
    console_type="vnc",
    display=0,
    user="alice",
)
SPICE_GRANT = Grant(
    vm_ref=VM_UUID,
    vm_uuid=VM_UUID,
    console_type="spice",
    display=0,
    user="bob",
)
BOUND_GRANT = Grant(
    vm_ref=VM_UUID,
    vm_uuid=VM_UUID,
    console_type="vnc",
    display=1,
    user="carol",
    client_ip="192.0.2.7",
)

MALFORMED_TOKENS = (
    "",
    "abc",
    "A" * 64,
    "g" * 64,
    "0" * 63,
    "0" * 65,
    " " + "0" * 63,
    "0" * 63 + "\n",
    "\u0660" * 64,  # Arabic-Indic digit zero: a digit, but not ASCII
)


class TokenStoreTestsMixin:
    """
    The behaviour every L{ITokenStore} shares.

    Subclasses provide:

      - C{ttl}: the token lifetime to create stores with (seconds);
      - C{async makeNodes(n)}: C{n} stores that share their state, as the
        stores of C{n} processes of one cluster would (for a single-node
        store, the same store C{n} times);
      - C{async advance(seconds)}: let that much time pass for the stores;
      - C{async storedText(store)}: a text dump of everything the store
        keeps, to look for raw tokens in.
    """

    ttl: float

    async def makeNodes(self, n: int) -> List[Any]:
        raise NotImplementedError()

    async def advance(self, seconds: float) -> None:
        raise NotImplementedError()

    async def storedText(self, store: Any) -> str:
        raise NotImplementedError()

    async def makeStore(self) -> Any:
        return (await self.makeNodes(1))[0]

    async def assertRefused(self, d: Deferred, code: ErrorCode) -> ConsoleError:
        """
        Assert that C{d} fails with a L{ConsoleError} of C{code}.
        """
        try:
            result = await d
        except ConsoleError as e:
            self.assertEqual(e.code, code)
            return e
        self.fail(f"expected {code.name}, got {result!r}")

    async def test_issueMintsHexToken(self) -> None:
        """
        When a token is issued, it is 64 lower-case hex characters and its
        grant is stamped with the store's issue and expiry times.
        """
        store = await self.makeStore()
        issued = await store.issue(GRANT)
        self.assertRegex(issued.token, r"\A[0-9a-f]{64}\Z")
        self.assertEqual(issued.grant.user, "alice")
        self.assertEqual(issued.grant.vm_uuid, VM_UUID)
        self.assertAlmostEqual(issued.grant.expires_at - issued.grant.issued_at, self.ttl, places=3)
        self.assertEqual(issued.expires_at, issued.grant.expires_at)

    async def test_issueIgnoresGivenTimes(self) -> None:
        """
        When the grant given to issue carries times, the store replaces them
        with its own.
        """
        store = await self.makeStore()
        stale = Grant(
            vm_ref=VM_NAME,
            vm_uuid=VM_UUID,
            console_type="vnc",
            display=0,
            user="alice",
            issued_at=1.0,
            expires_at=2.0,
        )
        issued = await store.issue(stale)
        self.assertGreater(issued.grant.expires_at, 2.0 + self.ttl / 2)
        redemption = await store.redeem(issued.token, VM_NAME, None)
        self.assertTrue(redemption.first)

    async def test_tokensAreUnique(self) -> None:
        """
        When many tokens are issued, no two are equal.
        """
        store = await self.makeStore()
        issued = [await store.issue(GRANT) for _ in range(20)]
        self.assertEqual(len({i.token for i in issued}), 20)

    async def test_rawTokenNotStored(self) -> None:
        """
        When a token is issued, the store keeps its SHA-256 and never the
        token itself.
        """
        store = await self.makeStore()
        issued = await store.issue(GRANT)
        text = await self.storedText(store)
        self.assertNotIn(issued.token, text)
        self.assertIn(token_hash(issued.token), text)

    async def test_firstRedemption(self) -> None:
        """
        When a fresh token is presented for its VM, the redemption is the
        first one and carries the issued grant.
        """
        store = await self.makeStore()
        issued = await store.issue(GRANT)
        redemption = await store.redeem(issued.token, VM_NAME, "198.51.100.1")
        self.assertEqual(redemption, Redemption(grant=issued.grant, first=True))

    async def test_redeemByUUID(self) -> None:
        """
        When a token issued for a VM name is presented with the VM's UUID, it
        is accepted.
        """
        store = await self.makeStore()
        issued = await store.issue(GRANT)
        redemption = await store.redeem(issued.token, VM_UUID, None)
        self.assertTrue(redemption.first)

    async def test_replayRefused(self) -> None:
        """
        When a consumed token is presented again, it fails with
        TOKEN_ALREADY_USED.
        """
        store = await self.makeStore()
        issued = await store.issue(GRANT)
        await store.redeem(issued.token, VM_NAME, None)
        await self.assertRefused(store.redeem(issued.token, VM_NAME, None), ErrorCode.TOKEN_ALREADY_USED)
        await self.assertRefused(store.redeem(issued.token, VM_UUID, None), ErrorCode.TOKEN_ALREADY_USED)

    async def test_malformedRefused(self) -> None:
        """
        When a token is not 64 lower-case hex characters, it fails with
        INVALID_TOKEN.
        """
        store = await self.makeStore()
        issued = await store.issue(GRANT)
        for bad in MALFORMED_TOKENS + (issued.token.upper(), issued.token[:-1]):
            await self.assertRefused(store.redeem(bad, VM_NAME, None), ErrorCode.INVALID_TOKEN)
        # None of that consumed the real token.
        self.assertTrue((await store.redeem(issued.token, VM_NAME, None)).first)

    async def test_unknownRefused(self) -> None:
        """
        When a well-formed token that was never issued is presented, it fails
        with INVALID_TOKEN.
        """
        store = await self.makeStore()
        await store.issue(GRANT)
        await self.assertRefused(store.redeem("0" * 64, VM_NAME, None), ErrorCode.INVALID_TOKEN)

    async def test_otherVMRefused(self) -> None:
        """
        When a token is presented for another VM, it fails with INVALID_TOKEN
        and is not consumed.
        """
        store = await self.makeStore()
        issued = await store.issue(GRANT)
        await self.assertRefused(store.redeem(issued.token, OTHER_UUID, None), ErrorCode.INVALID_TOKEN)
        await self.assertRefused(store.redeem(issued.token, "web-02", None), ErrorCode.INVALID_TOKEN)
        self.assertTrue((await store.redeem(issued.token, VM_NAME, None)).first)

    async def test_boundClientAddress(self) -> None:
        """
        When a token is bound to a client address, it fails with
        INVALID_TOKEN from any other or unknown address and is accepted from
        that one.
        """
        store = await self.makeStore()
        issued = await store.issue(BOUND_GRANT)
        self.assertEqual(issued.grant.client_ip, "192.0.2.7")
        await self.assertRefused(store.redeem(issued.token, VM_UUID, "192.0.2.8"), ErrorCode.INVALID_TOKEN)
        await self.assertRefused(store.redeem(issued.token, VM_UUID, None), ErrorCode.INVALID_TOKEN)
        redemption = await store.redeem(issued.token, VM_UUID, "192.0.2.7")
        self.assertTrue(redemption.first)
        self.assertEqual(redemption.grant.client_ip, "192.0.2.7")

    async def test_boundClientAddressOnReplay(self) -> None:
        """
        When a consumed bound token is replayed from another address, it
        fails with INVALID_TOKEN, not TOKEN_ALREADY_USED.
        """
        store = await self.makeStore()
        issued = await store.issue(BOUND_GRANT)
        await store.redeem(issued.token, VM_UUID, "192.0.2.7")
        await self.assertRefused(store.redeem(issued.token, VM_UUID, "192.0.2.99"), ErrorCode.INVALID_TOKEN)
        await self.assertRefused(store.redeem(issued.token, VM_UUID, "192.0.2.7"), ErrorCode.TOKEN_ALREADY_USED)

    async def test_expiredRefused(self) -> None:
        """
        When a token is presented after its time to live, it fails with
        TOKEN_EXPIRED.
        """
        store = await self.makeStore()
        issued = await store.issue(GRANT)
        await self.advance(self.ttl)
        await self.assertRefused(store.redeem(issued.token, VM_NAME, None), ErrorCode.TOKEN_EXPIRED)

    async def test_count(self) -> None:
        """
        When tokens are issued, consumed and left to expire, count gives the
        outstanding ones only.
        """
        store = await self.makeStore()
        self.assertEqual(await store.count(), 0)
        old = await store.issue(GRANT)
        await store.issue(GRANT)
        self.assertEqual(await store.count(), 2)
        await store.redeem(old.token, VM_NAME, None)
        self.assertEqual(await store.count(), 1)
        await self.advance(self.ttl)
        await store.issue(GRANT)
        self.assertEqual(await store.count(), 1)

    async def test_purge(self) -> None:
        """
        When purge runs, expired tokens (used or not) are removed and counted,
        and after that an expired token is simply unknown.
        """
        store = await self.makeStore()
        used = await store.issue(GRANT)
        unused = await store.issue(GRANT)
        await store.redeem(used.token, VM_NAME, None)
        self.assertEqual(await store.purge(), 0)
        await self.advance(self.ttl)
        fresh = await store.issue(GRANT)
        fresh_used = await store.issue(GRANT)
        await store.redeem(fresh_used.token, VM_NAME, None)
        await self.assertRefused(store.redeem(unused.token, VM_NAME, None), ErrorCode.TOKEN_EXPIRED)
        self.assertEqual(await store.purge(), 2)
        self.assertEqual(await store.purge(), 0)
        await self.assertRefused(store.redeem(unused.token, VM_NAME, None), ErrorCode.INVALID_TOKEN)
        await self.assertRefused(store.redeem(used.token, VM_NAME, None), ErrorCode.INVALID_TOKEN)
        # Unexpired ones are kept: used ones are remembered as used.
        await self.assertRefused(store.redeem(fresh_used.token, VM_NAME, None), ErrorCode.TOKEN_ALREADY_USED)
        self.assertTrue((await store.redeem(fresh.token, VM_NAME, None)).first)

    async def test_spiceSessionJoin(self) -> None:
        """
        When the console that consumed a token has a SPICE session attached,
        further presentations get that session id instead of a refusal.
        """
        store = await self.makeStore()
        issued = await store.issue(SPICE_GRANT)
        await store.redeem(issued.token, VM_UUID, None)
        await store.attach_spice_session(issued.token, SESSION_ID)
        for _ in range(3):
            redemption = await store.redeem(issued.token, VM_UUID, None)
            self.assertEqual(
                redemption,
                Redemption(grant=issued.grant, first=False, spice_session_id=SESSION_ID),
            )

    async def test_spiceSessionOtherVM(self) -> None:
        """
        When a token with a SPICE session attached is presented for another
        VM, it fails with INVALID_TOKEN.
        """
        store = await self.makeStore()
        issued = await store.issue(SPICE_GRANT)
        await store.redeem(issued.token, VM_UUID, None)
        await store.attach_spice_session(issued.token, SESSION_ID)
        await self.assertRefused(store.redeem(issued.token, OTHER_UUID, None), ErrorCode.INVALID_TOKEN)

    async def test_spiceSessionDetach(self) -> None:
        """
        When the SPICE session is detached, further presentations fail with
        TOKEN_ALREADY_USED, and detaching again is harmless.
        """
        store = await self.makeStore()
        issued = await store.issue(SPICE_GRANT)
        await store.redeem(issued.token, VM_UUID, None)
        await store.attach_spice_session(issued.token, SESSION_ID)
        await store.detach_spice_session(issued.token)
        await self.assertRefused(store.redeem(issued.token, VM_UUID, None), ErrorCode.TOKEN_ALREADY_USED)
        await store.detach_spice_session(issued.token)
        await store.detach_spice_session("f" * 64)
        await store.detach_spice_session("not a token")
        await self.assertRefused(store.redeem(issued.token, VM_UUID, None), ErrorCode.TOKEN_ALREADY_USED)

    async def test_spiceSessionOutlivesExpiry(self) -> None:
        """
        When a SPICE session is attached, the token's record survives its
        expiry and purge until the session is detached.
        """
        store = await self.makeStore()
        issued = await store.issue(SPICE_GRANT)
        await store.redeem(issued.token, VM_UUID, None)
        await store.attach_spice_session(issued.token, SESSION_ID)
        await self.advance(self.ttl)
        self.assertEqual(await store.purge(), 0)
        redemption = await store.redeem(issued.token, VM_UUID, None)
        self.assertEqual(redemption.spice_session_id, SESSION_ID)
        self.assertFalse(redemption.first)
        await store.detach_spice_session(issued.token)
        await self.assertRefused(store.redeem(issued.token, VM_UUID, None), ErrorCode.TOKEN_EXPIRED)
        self.assertEqual(await store.purge(), 1)
        await self.assertRefused(store.redeem(issued.token, VM_UUID, None), ErrorCode.INVALID_TOKEN)

    async def test_attachUnusedIgnored(self) -> None:
        """
        When a SPICE session is attached to a token that was never consumed,
        nothing is attached and the token can still be consumed once.
        """
        store = await self.makeStore()
        issued = await store.issue(SPICE_GRANT)
        await store.attach_spice_session(issued.token, SESSION_ID)
        redemption = await store.redeem(issued.token, VM_UUID, None)
        self.assertEqual(redemption, Redemption(grant=issued.grant, first=True))
        await self.assertRefused(store.redeem(issued.token, VM_UUID, None), ErrorCode.TOKEN_ALREADY_USED)

    async def test_racingRedemptions(self) -> None:
        """
        When 50 presentations of one token race (spread over two nodes),
        exactly one consumes it and the other 49 fail with
        TOKEN_ALREADY_USED.
        """
        nodes = await self.makeNodes(2)
        issued = await nodes[0].issue(GRANT)
        outcomes: List[object] = []
        racers = []
        for i in range(50):
            d = nodes[i % 2].redeem(issued.token, VM_NAME, None)
            d.addCallbacks(outcomes.append, lambda f: outcomes.append(f.trap(ConsoleError) and f.value))
            racers.append(d)
        await gatherResults(racers)
        firsts = [o for o in outcomes if isinstance(o, Redemption) and o.first]
        refusals = [o for o in outcomes if isinstance(o, ConsoleError)]
        self.assertEqual(len(outcomes), 50)
        self.assertEqual(len(firsts), 1)
        self.assertEqual(len(refusals), 49)
        self.assertEqual({e.code for e in refusals}, {ErrorCode.TOKEN_ALREADY_USED})

    async def test_crossNode(self) -> None:
        """
        When a token is issued on one node, another node redeems it, and the
        first node then sees it as used.
        """
        a, b = await self.makeNodes(2)
        issued = await a.issue(SPICE_GRANT)
        self.assertTrue((await b.redeem(issued.token, VM_UUID, None)).first)
        await self.assertRefused(a.redeem(issued.token, VM_UUID, None), ErrorCode.TOKEN_ALREADY_USED)
        await b.attach_spice_session(issued.token, SESSION_ID)
        self.assertEqual((await a.redeem(issued.token, VM_UUID, None)).spice_session_id, SESSION_ID)

    async def test_check(self) -> None:
        """
        When the store is usable, check succeeds.
        """
        store = await self.makeStore()
        self.assertIsNone(await store.check())

    async def test_provides(self) -> None:
        """
        When a store is created, it provides L{ITokenStore}.
        """
        store = await self.makeStore()
        self.assertTrue(verifyObject(ITokenStore, store))


def synchronously(cls: type) -> type:
    """
    Make every C{async} C{test_*} method of C{cls} a plain method that runs
    the coroutine and requires it to finish without waiting on anything: for
    stores whose every L{Deferred} has already fired, in a
    L{SynchronousTestCase} that never touches a reactor.
    """

    def wrap(f: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[[Any], None]:
        @functools.wraps(f)
        def test(self: SynchronousTestCase) -> None:
            outcome: List[object] = []
            Deferred.fromCoroutine(f(self)).addBoth(outcome.append)
            if not outcome:
                self.fail("the test waited on something that never happened")
            if isinstance(outcome[0], Failure):
                outcome[0].raiseException()

        return test

    for name in dir(cls):
        if name.startswith("test_"):
            method = getattr(cls, name)
            if hasattr(method, "__code__") and method.__code__.co_flags & 0x80:  # CO_COROUTINE
                setattr(cls, name, wrap(method))
    return cls


@synchronously
class MemoryTokenStoreTests(TokenStoreTestsMixin, SynchronousTestCase):
    """
    L{MemoryTokenStore} under the shared suite, driven by a L{Clock}.
    """

    ttl = 300.0

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)

    async def makeNodes(self, n: int) -> List[MemoryTokenStore]:
        store = MemoryTokenStore(self.clock, self.ttl)
        return [store] * n

    async def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    async def storedText(self, store: MemoryTokenStore) -> str:
        return repr(vars(store))


class MemoryTokenStoreClockTests(SynchronousTestCase):
    """
    Exact timing and logging of L{MemoryTokenStore}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000.0)
        self.store = MemoryTokenStore(self.clock, 300.0)

    def test_timesFromClock(self) -> None:
        """
        When a token is issued, issued_at and expires_at come from the
        injected clock and the TTL.
        """
        issued = self.successResultOf(self.store.issue(GRANT))
        self.assertEqual((issued.grant.issued_at, issued.grant.expires_at), (1000.0, 1300.0))

    def test_validJustBeforeExpiry(self) -> None:
        """
        When a token is presented just before its expiry it is accepted, and
        at its expiry it is refused with TOKEN_EXPIRED.
        """
        early = self.successResultOf(self.store.issue(GRANT))
        late = self.successResultOf(self.store.issue(GRANT))
        self.clock.advance(299.999)
        self.assertTrue(self.successResultOf(self.store.redeem(early.token, VM_NAME, None)).first)
        self.clock.advance(0.001)
        f = self.failureResultOf(self.store.redeem(late.token, VM_NAME, None), ConsoleError)
        self.assertEqual(f.value.code, ErrorCode.TOKEN_EXPIRED)

    def test_expiredUsedSaysExpired(self) -> None:
        """
        When a consumed token is presented after its expiry but before purge,
        it fails with TOKEN_EXPIRED.
        """
        issued = self.successResultOf(self.store.issue(GRANT))
        self.successResultOf(self.store.redeem(issued.token, VM_NAME, None))
        self.clock.advance(300.0)
        f = self.failureResultOf(self.store.redeem(issued.token, VM_NAME, None), ConsoleError)
        self.assertEqual(f.value.code, ErrorCode.TOKEN_EXPIRED)

    def test_noTokenInLogs(self) -> None:
        """
        When tokens are issued, redeemed and replayed, no log event carries the
        raw token, and events name it by its short hash.
        """
        events: List[dict] = []
        self.patch(tokens, "log", Logger(namespace="vaporproxy.tokens", observer=events.append))
        issued = self.successResultOf(self.store.issue(GRANT))
        self.successResultOf(self.store.redeem(issued.token, VM_NAME, None))
        self.failureResultOf(self.store.redeem(issued.token, VM_NAME, None), ConsoleError)
        self.successResultOf(self.store.attach_spice_session("f" * 64, 1))
        self.assertTrue(events)
        self.assertNotIn(issued.token, repr(events))
        self.assertIn(token_log_id(issued.token), repr(events))


class TokenFormatTests(SynchronousTestCase):
    """
    L{is_well_formed}, L{token_hash} and L{token_log_id}.
    """

    def test_wellFormed(self) -> None:
        """
        When a string is 64 lower-case hex characters it is well formed, and
        anything else is not.
        """
        self.assertTrue(is_well_formed("0123456789abcdef" * 4))
        for bad in MALFORMED_TOKENS + (None, b"0" * 64, 42):
            self.assertFalse(is_well_formed(bad), repr(bad))

    def test_hash(self) -> None:
        """
        When a token is hashed, the result is its hex SHA-256, and the log id
        is the first 12 characters of it.
        """
        token = "ab" * 32
        self.assertEqual(token_hash(token), TOKEN_AB_SHA256)
        self.assertEqual(token_log_id(token), token_hash(token)[:12])
        self.assertTrue(re.fullmatch(r"[0-9a-f]{12}", token_log_id(token)))


class StampTests(SynchronousTestCase):
    """
    L{tokens.stamp}: the grant with its times, as C{dataclasses.replace}
    gives it.
    """

    def test_sameAsReplace(self) -> None:
        """
        When a grant is stamped, the result equals (and hashes as) the grant
        C{dataclasses.replace} gives with those times, is still frozen, and
        the given grant is unchanged.
        """
        import dataclasses

        for grant in (GRANT, SPICE_GRANT, BOUND_GRANT, dataclasses.replace(GRANT, key_id="k", vm_name="n", mode="view")):
            stamped = tokens.stamp(grant, 1000.5, 30.0)
            expected = dataclasses.replace(grant, issued_at=1000.5, expires_at=1030.5)
            self.assertEqual(stamped, expected)
            self.assertEqual(hash(stamped), hash(expected))
            self.assertEqual(repr(stamped), repr(expected))
            self.assertIs(type(stamped), Grant)
            self.assertEqual((grant.issued_at, grant.expires_at), (0.0, 0.0))
            with self.assertRaises(dataclasses.FrozenInstanceError):
                stamped.user = "mallory"  # type: ignore[misc]

    def test_everyFieldCopied(self) -> None:
        """A Grant's fields are exactly its instance dictionary (what stamp copies)."""
        import dataclasses

        self.assertEqual(set(vars(BOUND_GRANT)), {f.name for f in dataclasses.fields(Grant)})
        self.assertFalse(hasattr(Grant, "__post_init__"))
