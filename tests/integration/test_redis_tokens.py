"""
L{vaporproxy.stores.redis_tokens.RedisTokenStore} against a real C{redis-server}
started by each test: the shared token store suite, SPICE session
keep-alive, and Redis going away and coming back.
"""

from __future__ import annotations

import time
from typing import Any, List

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests.integration.redis_server import RedisServer
from tests.stores.test_tokens import GRANT, SESSION_ID, SPICE_GRANT, VM_NAME, VM_UUID, TokenStoreTestsMixin
from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.stores.redis_client import RedisClient, parse_redis_url
from vaporproxy.stores.redis_tokens import RedisTokenStore
from vaporproxy.stores.tokens import token_hash

PREFIX = "test:"


class RedisTestMixin:
    """
    A fresh C{redis-server} per test and clients to it that are closed
    afterwards.
    """

    #: trial's per-test time limit (seconds).
    timeout = 30
    #: Redis call timeout of the clients (seconds).
    redis_timeout = 2.0

    def setUp(self) -> None:
        self.server = RedisServer()
        self.server.start()
        self.addCleanup(self.server.cleanup)

    def client(self, timeout: float = 0.0) -> RedisClient:
        client = RedisClient(self.server.url, reactor, timeout or self.redis_timeout)
        self.addCleanup(client.close)
        return client

    async def sleep(self, seconds: float) -> None:
        await deferLater(reactor, seconds, lambda: None)

    async def eventually(self, probe: Any, within: float) -> Any:
        """
        Await C{probe()} until it succeeds, for at most C{within} seconds.
        """
        deadline = time.monotonic() + within
        while True:
            try:
                return await probe()
            except ConsoleError:
                if time.monotonic() > deadline:
                    raise
            await self.sleep(0.1)

    async def assertUnavailableQuickly(self, call: Any) -> None:
        """
        C{call()} fails with SERVICE_UNAVAILABLE within 1.5 s (Redis down).
        """
        started = time.monotonic()
        with self.assertRaises(ConsoleError) as e:  # type: ignore[attr-defined]
            await call()
        self.assertEqual(e.exception.code, ErrorCode.SERVICE_UNAVAILABLE)  # type: ignore[attr-defined]
        self.assertLess(time.monotonic() - started, 1.5)  # type: ignore[attr-defined]


class RedisTokenStoreTests(RedisTestMixin, TokenStoreTestsMixin, TestCase):
    """
    L{RedisTokenStore} under the shared suite; each node has its own
    connection, as separate processes would.
    """

    ttl = 1.0

    async def makeNodes(self, n: int) -> List[RedisTokenStore]:
        stores = []
        for _ in range(n):
            store = RedisTokenStore(self.client(), reactor, self.ttl, session_ttl=3.0, prefix=PREFIX)
            self.addCleanup(store.stop)
            stores.append(store)
        return stores

    async def advance(self, seconds: float) -> None:
        await self.sleep(seconds)

    async def storedText(self, store: RedisTokenStore) -> str:
        raw = self.client()
        dump = []
        for key in await raw.execute("KEYS", "*"):
            kind = await raw.execute("TYPE", key)
            if kind == "hash":
                dump.append((key, await raw.execute("HGETALL", key)))
            elif kind == "zset":
                dump.append((key, await raw.execute("ZRANGE", key, 0, -1)))
            else:
                dump.append((key, kind))
        return repr(dump)


class RedisTokenStoreSpecificTests(RedisTestMixin, TestCase):
    """
    What only the Redis store does: session keep-alive, outages, key expiry.
    """

    async def test_tokenKeyExpires(self) -> None:
        """
        When a token's key has outlived its expiry and grace, Redis has
        removed it by itself and the token is unknown.
        """
        store = RedisTokenStore(self.client(), reactor, 0.3, session_ttl=3.0, prefix=PREFIX, grace=0.2)
        issued = await store.issue(GRANT)
        await self.sleep(0.35)
        with self.assertRaises(ConsoleError) as e:
            await store.redeem(issued.token, VM_NAME, None)
        self.assertEqual(e.exception.code, ErrorCode.TOKEN_EXPIRED)
        await self.sleep(0.3)
        key = PREFIX + "tok:" + token_hash(issued.token)
        self.assertEqual(int(await self.client().execute("EXISTS", key)), 0)
        with self.assertRaises(ConsoleError) as e:
            await store.redeem(issued.token, VM_NAME, None)
        self.assertEqual(e.exception.code, ErrorCode.INVALID_TOKEN)

    async def test_sessionKeptAlive(self) -> None:
        """
        When a SPICE session is attached, its record outlives the token's own
        key lifetime for as long as the attaching process renews it, and
        lapses within the session TTL once renewals stop (a dead process).
        """
        store = RedisTokenStore(self.client(), reactor, 0.3, session_ttl=0.6, prefix=PREFIX, grace=0.1)
        other = RedisTokenStore(self.client(), reactor, 0.3, session_ttl=0.6, prefix=PREFIX, grace=0.1)
        self.addCleanup(store.stop)
        issued = await store.issue(SPICE_GRANT)
        await store.redeem(issued.token, VM_UUID, None)
        await store.attach_spice_session(issued.token, SESSION_ID)
        await self.sleep(1.5)
        redemption = await other.redeem(issued.token, VM_UUID, None)
        self.assertEqual((redemption.first, redemption.spice_session_id), (False, SESSION_ID))
        store.stop()  # the process dies: no more renewals
        await self.sleep(0.8)
        with self.assertRaises(ConsoleError) as e:
            await other.redeem(issued.token, VM_UUID, None)
        self.assertEqual(e.exception.code, ErrorCode.INVALID_TOKEN)

    async def test_redisDown(self) -> None:
        """
        When Redis is down, every call fails with SERVICE_UNAVAILABLE within
        the timeout, and works again once Redis is back.
        """
        store = RedisTokenStore(self.client(timeout=0.5), reactor, 60.0, session_ttl=3.0, prefix=PREFIX)
        issued = await store.issue(GRANT)
        self.server.stop()
        calls = [
            lambda: store.issue(GRANT),
            lambda: store.redeem(issued.token, VM_NAME, None),
            lambda: store.count(),
            lambda: store.purge(),
            lambda: store.check(),
            lambda: store.attach_spice_session(issued.token, 1),
        ]
        for call in calls:
            await self.assertUnavailableQuickly(call)
        self.server.start()
        await self.eventually(store.check, within=8.0)
        # A fresh server: the old token is gone, a new one works.
        fresh = await store.issue(GRANT)
        self.assertTrue((await store.redeem(fresh.token, VM_NAME, None)).first)

    async def test_neverReachable(self) -> None:
        """
        When Redis was never reachable, calls fail with SERVICE_UNAVAILABLE
        within the timeout instead of waiting forever.
        """
        self.server.stop()
        store = RedisTokenStore(self.client(timeout=0.3), reactor, 60.0, session_ttl=3.0, prefix=PREFIX)
        started = time.monotonic()
        with self.assertRaises(ConsoleError) as e:
            await store.check()
        self.assertEqual(e.exception.code, ErrorCode.SERVICE_UNAVAILABLE)
        self.assertLess(time.monotonic() - started, 1.0)


class RedisURLTests(TestCase):
    """
    L{parse_redis_url}.
    """

    def test_full(self) -> None:
        """
        When a URL has credentials, a port and a database, all are taken.
        """
        self.assertEqual(
            parse_redis_url("rediss://user:p%40ss@redis.example:6380/3"),
            {"host": "redis.example", "port": 6380, "db": 3, "username": "user", "password": "p@ss", "tls": True},
        )

    def test_defaults(self) -> None:
        """
        When a URL gives only a host, the port is 6379, the database 0, no
        credentials and no TLS.
        """
        self.assertEqual(
            parse_redis_url("redis://10.0.0.5"),
            {"host": "10.0.0.5", "port": 6379, "db": 0, "username": None, "password": None, "tls": False},
        )

    def test_bad(self) -> None:
        """
        When the scheme is not redis/rediss or the database is not a number,
        a ValueError names the problem.
        """
        self.assertRaises(ValueError, parse_redis_url, "http://127.0.0.1:6379/0")
        self.assertRaises(ValueError, parse_redis_url, "redis://127.0.0.1:6379/zero")
