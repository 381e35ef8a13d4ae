"""
Tests for L{vaporproxy.http.mint}: per-credential mint rate and outstanding
tokens, through the console-info route, with a L{Clock}.
"""

from __future__ import annotations

from dataclasses import replace

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.http.test_api import CONFIG, USER_KEY, VMS, WEB_KEY, APITestCase, Harness
from vaporproxy.config import AuthConfig
from vaporproxy.errors import ErrorCode
from vaporproxy.http.mint import MAX_BUCKETS, MintLimits, RateLimited
from vaporproxy.interfaces import Grant
from vaporproxy.stores.tokens import MemoryTokenStore, OutstandingLimit

INFO = f"{VMS}/web-1/console"


def limits(**auth: object) -> object:
    return replace(CONFIG, auth=replace(CONFIG.auth, **auth))


class MintRouteTests(APITestCase):
    """
    Console info past a credential's limits.
    """

    def use(self, **auth: object) -> None:
        self.h = Harness(limits(**auth))

    def test_burst_then_rate(self) -> None:
        """When a key asks for more than mint_burst tokens at once, the rest answer 429 RATE_LIMITED with Retry-After, and one more succeeds after 1/mint_rate s."""
        self.use(mint_rate=10.0, mint_burst=50, max_outstanding_tokens=0)
        codes = [self.request("GET", INFO, USER_KEY)[0].code for _ in range(55)]
        self.assertEqual(codes, [200] * 50 + [429] * 5)
        response, body = self.json_request("GET", INFO, USER_KEY)
        self.assertError(response, body, 429, ErrorCode.RATE_LIMITED)
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["1"])
        self.h.clock.advance(0.1)
        self.assertEqual(self.request("GET", INFO, USER_KEY)[0].code, 200)

    def test_per_credential(self) -> None:
        """When one key has spent its burst, another key still gets tokens."""
        self.use(mint_rate=1.0, mint_burst=2, max_outstanding_tokens=0)
        for _ in range(3):
            self.request("GET", INFO, USER_KEY)
        self.assertEqual(self.request("GET", INFO, USER_KEY)[0].code, 429)
        self.assertEqual(self.request("GET", INFO, WEB_KEY)[0].code, 200)

    def test_outstanding(self) -> None:
        """When a key holds max_outstanding_tokens unused tokens, the next is refused 429 until one is redeemed or expires."""
        self.use(mint_rate=0.0, max_outstanding_tokens=3)
        tokens = [self.json_request("GET", INFO, USER_KEY)[1]["token"] for _ in range(3)]
        response, body = self.json_request("GET", INFO, USER_KEY)
        self.assertError(response, body, 429, ErrorCode.RATE_LIMITED)
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["300"])
        self.successResultOf(self.h.store.redeem(tokens[0], "web-1", None))
        self.assertEqual(self.request("GET", INFO, USER_KEY)[0].code, 200)
        self.assertEqual(self.request("GET", INFO, USER_KEY)[0].code, 429)
        self.h.clock.advance(300)
        self.assertEqual(self.request("GET", INFO, USER_KEY)[0].code, 200)

    def test_reload(self) -> None:
        """When a SIGHUP changes the limits, the next request meets the new ones."""
        self.use(mint_rate=0.0, max_outstanding_tokens=1)
        self.request("GET", INFO, USER_KEY)
        self.assertEqual(self.request("GET", INFO, USER_KEY)[0].code, 429)
        self.h.api.reload(limits(mint_rate=0.0, max_outstanding_tokens=0))
        self.assertEqual(self.request("GET", INFO, USER_KEY)[0].code, 200)

    def test_defaults(self) -> None:
        """When nothing is configured, a key may hold 100 unused tokens and mint 10 a second with bursts of 50."""
        auth = AuthConfig()
        self.assertEqual((auth.max_outstanding_tokens, auth.mint_rate, auth.mint_burst), (100, 10.0, 50))


class MintLimitsTests(SynchronousTestCase):
    """
    The buckets themselves.
    """

    def test_retry_after(self) -> None:
        """When a bucket is empty, the refusal says how many whole seconds until a mint is possible."""
        clock = Clock()
        mint = MintLimits(clock, AuthConfig(mint_rate=0.5, mint_burst=1))
        mint.take("k")
        error = self.assertRaises(RateLimited, mint.take, "k")
        self.assertEqual((error.code, error.retry_after), (ErrorCode.RATE_LIMITED, 2))

    def test_buckets_bounded(self) -> None:
        """When more than MAX_BUCKETS credentials have minted, full buckets are forgotten."""
        clock = Clock()
        mint = MintLimits(clock, AuthConfig(mint_rate=100.0, mint_burst=1))
        for i in range(MAX_BUCKETS):
            mint.take(f"jwt:user{i}")
        clock.advance(1)
        mint.take("jwt:late")
        self.assertLessEqual(len(mint._buckets), 2)

    def test_issue_within(self) -> None:
        """When the store checks and mints in one step (Redis), its refusal becomes RATE_LIMITED with Retry-After and its cap is the config's."""
        asked: list = []

        class AtomicStore:
            def issue_within(self, grant: Grant, cap: int) -> object:
                asked.append((grant.key_id, cap))
                return fail(OutstandingLimit(cap, 41.2))

        mint = MintLimits(Clock(), AuthConfig(max_outstanding_tokens=3))
        grant = Grant(vm_ref="v", vm_uuid="u", console_type="vnc", display=0, user="a", key_id="k")
        error = self.failureResultOf(Deferred.fromCoroutine(mint.issue(AtomicStore(), grant)), RateLimited).value
        self.assertEqual((error.code, error.retry_after, asked), (ErrorCode.RATE_LIMITED, 42, [("k", 3)]))

    def test_uncapped(self) -> None:
        """When max_outstanding_tokens is 0, the token is the store's answer itself, nothing counted first."""
        clock = Clock()
        store = MemoryTokenStore(clock, 10.0)
        store.outstanding = None  # type: ignore[assignment]  # (asking would fail)
        mint = MintLimits(clock, AuthConfig(max_outstanding_tokens=0))
        grant = Grant(vm_ref="v", vm_uuid="u", console_type="vnc", display=0, user="a", key_id="k")
        answer = mint.issue(store, grant)
        self.assertIsInstance(answer, Deferred)
        self.assertEqual(self.successResultOf(answer).grant.key_id, "k")
        self.assertEqual(self.successResultOf(store.count()), 1)


class OutstandingStoreTests(SynchronousTestCase):
    """
    The memory store's outstanding counts.
    """

    def grant(self, key_id: str) -> Grant:
        return Grant(vm_ref="v", vm_uuid="u", console_type="vnc", display=0, user="a", key_id=key_id)

    def test_counts(self) -> None:
        """When tokens are issued, redeemed and expire, count() and outstanding() follow, per credential."""
        clock = Clock()
        store = MemoryTokenStore(clock, 10.0)
        first = self.successResultOf(store.issue(self.grant("a")))
        clock.advance(4)
        self.successResultOf(store.issue(self.grant("a")))
        self.successResultOf(store.issue(self.grant("b")))
        self.assertEqual(self.successResultOf(store.count()), 3)
        self.assertEqual(self.successResultOf(store.outstanding("a")), (2, 6.0))
        self.successResultOf(store.redeem(first.token, "v", None))
        self.assertEqual(self.successResultOf(store.outstanding("a")), (1, 10.0))
        clock.advance(10)
        self.assertEqual(self.successResultOf(store.count()), 0)
        self.assertEqual(self.successResultOf(store.outstanding("b")), (0, 0.0))
        self.assertEqual(store._by_key, {})
