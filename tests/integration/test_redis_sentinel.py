"""
Redis failover (issue #12) with real processes on loopback: a master, one
replica and three sentinels (L{SentinelGroup}); the test SIGKILLs the master
and the sentinels promote the replica.

    - L{SentinelStoreFailoverTests}: the token store and the limiter in this
      process, under a steady stream of mints and redemptions across the
      failover.
    - L{SentinelProxyFailoverTests}: a C{twistd vaporproxy} process with
      C{tokens.redis_sentinel}, its HTTP API and a live VNC console.

The settings are short (C{down-after-milliseconds} 1 s, C{redis_timeout}
500 ms, C{lease_ttl} 1.5 s) so that each test takes about 10 s.
"""

from __future__ import annotations

import json
import shutil
import time
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests.integration.libvirt_fixtures import domain_xml, graphics_xml, node_uri, write_node_file
from tests.integration.proxy_cluster import (
    ADMIN_KEY,
    HTTP,
    ProxyProcess,
    RFBEchoServer,
    config_yaml,
    echo,
    new_directory,
    vnc_console,
    ws_connect,
)
from tests.integration.redis_server import SentinelGroup
from tests.stores.test_tokens import GRANT, VM_NAME
from vaporproxy.config import RedisSentinelConfig
from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.stores.redis_client import RedisClient
from vaporproxy.stores.redis_limits import RedisLimiter
from vaporproxy.stores.redis_sentinel import SentinelTarget
from vaporproxy.stores.redis_tokens import RedisTokenStore

PREFIX = "test:"
VNC_UUID = "c1a5e7e0-4b1d-4c2a-9e3f-5a6b7c8d9e21"
#: Redis call timeout (seconds) of the clients under test.
REDIS_TIMEOUT = 0.5
#: Seconds a lease lives without renewal.
LEASE_TTL = 1.5
#: Seconds the failover and the recovery may take, together.
RECOVERY = 20.0


def sleep(seconds: float) -> Deferred:
    return deferLater(reactor, seconds, lambda: None)


class SentinelGroupMixin:
    """
    A fresh L{SentinelGroup} per test.
    """

    #: trial's per-test limit (seconds): the whole test stays under a minute.
    timeout = 55

    def setUp(self) -> None:
        self.group = SentinelGroup(down_after_ms=1000, failover_timeout_ms=5000)
        self.addCleanup(self.group.cleanup)  # type: ignore[attr-defined]
        self.group.start()

    def failed_over(self) -> bool:
        """
        Whether the sentinels now name the former replica as the master.
        """
        return self.group.master_port() == self.group.replica.port


class SentinelStoreFailoverTests(SentinelGroupMixin, TestCase):
    """
    L{RedisTokenStore} and L{RedisLimiter} through Sentinel while the master
    dies.
    """

    def setUp(self) -> None:
        super().setUp()
        config = RedisSentinelConfig(sentinels=tuple(("127.0.0.1", s.port) for s in self.group.sentinels), master=self.group.name)
        self.client = RedisClient(SentinelTarget(config, REDIS_TIMEOUT), reactor, REDIS_TIMEOUT)
        self.addCleanup(self.client.close)
        self.store = RedisTokenStore(self.client, reactor, 300, LEASE_TTL, prefix=PREFIX)
        self.limiter = RedisLimiter(self.client, reactor, LEASE_TTL, 10, 10, prefix=PREFIX)
        self.addCleanup(self.limiter.stop)
        self.addCleanup(self.store.stop)

    async def outcome(self, call: Any) -> Tuple[Any, Optional[ErrorCode], float]:
        """
        C{(result, None, seconds)} or C{(None, error code, seconds)}.
        """
        started = time.monotonic()
        try:
            return await call(), None, time.monotonic() - started
        except ConsoleError as e:
            return None, e.code, time.monotonic() - started

    async def load(self, killed: Deferred, report: Dict[str, Any]) -> None:
        """
        Mint and redeem, one after the other, until the store has answered
        after the failover; record every outcome in C{report}.
        """
        deadline = time.monotonic() + RECOVERY
        while time.monotonic() < deadline:
            issued, error, seconds = await self.outcome(lambda: self.store.issue(GRANT))
            report["mints"].append((error, seconds))
            if issued is not None:
                report["minted"].append(issued.token)
                redemption, error, seconds = await self.outcome(
                    lambda: self.store.redeem(issued.token, VM_NAME, GRANT.client_ip)
                )
                report["redemptions"].append((error, seconds))
                if redemption is not None:
                    report["redeemed"].append(issued.token)
                    if killed.called and report["unavailable"]():
                        return
            await sleep(0.02)

    async def test_failover(self) -> None:
        """
        When the master is SIGKILLed under a stream of mints and redemptions, calls answer SERVICE_UNAVAILABLE quickly during the failover and nothing else, both resume by themselves on the promoted replica, no acknowledged token is lost, no redeemed token redeems again, and the live lease's renewal resumes.
        """
        lease = await self.limiter.acquire(GRANT.vm_uuid, "console-1")
        kept = [(await self.store.issue(GRANT)).token for _ in range(10)]
        used = [(await self.store.issue(GRANT)).token for _ in range(10)]
        for token in used:
            await self.store.redeem(token, VM_NAME, GRANT.client_ip)
        report: Dict[str, Any] = {"mints": [], "redemptions": [], "minted": [], "redeemed": []}
        report["unavailable"] = lambda: any(e is not None for e, _ in report["mints"] + report["redemptions"])
        killed: Deferred = Deferred()
        loading = Deferred.fromCoroutine(self.load(killed, report))
        await sleep(0.3)
        self.group.master.kill()
        killed_at = time.monotonic()
        killed.callback(None)
        await loading

        outcomes = report["mints"] + report["redemptions"]
        errors = {e for e, _ in outcomes if e is not None}
        self.assertEqual(errors, {ErrorCode.SERVICE_UNAVAILABLE}, "during the failover: 503, and only 503")
        slowest = max(seconds for e, seconds in outcomes if e is not None)
        self.assertLess(slowest, 4 * REDIS_TIMEOUT, "a refusal comes within the call timeouts")
        self.assertTrue(self.failed_over(), "the sentinels promoted the replica")
        recovered = time.monotonic() - killed_at
        self.assertLess(recovered, RECOVERY)
        # Every token the store acknowledged before the kill is still there,
        # once: WAIT made sure the replica had it.
        for token in kept:
            redemption = await self.store.redeem(token, VM_NAME, GRANT.client_ip)
            self.assertTrue(redemption.first)
        # No token redeemed before or during the failover redeems again.
        for token in used + report["redeemed"] + kept:
            with self.assertRaises(ConsoleError) as e:
                await self.store.redeem(token, VM_NAME, GRANT.client_ip)
            self.assertEqual(e.exception.code, ErrorCode.TOKEN_ALREADY_USED)
        # The lease renewal loop (every lease_ttl / 3) carried on by itself:
        # beyond a lease_ttl after recovery the slot is still held.
        await sleep(LEASE_TTL + 0.5)
        self.assertEqual((await self.limiter.stats())["total_connections"], 1)
        self.assertEqual(self.limiter.local_stats()["total_connections"], 1)
        lease.release()
        await self.limiter.flush()
        self.assertEqual((await self.limiter.stats())["total_connections"], 0)
        # The renewals that fell in the failover failed (and were logged).
        self.assertTrue(self.flushLoggedErrors(ConsoleError))


def sentinel_config_yaml(port: int, hypervisor_uri: str, group: SentinelGroup) -> str:
    """
    The cluster tests' vapor.conf with C{tokens.redis_sentinel} instead of
    C{tokens.redis_url}.
    """
    config = json.loads(
        config_yaml(port, hypervisor_uri, "redis://unused", lease_ttl=f"{LEASE_TTL}s", redis_timeout="500ms")
    )
    del config["tokens"]["redis_url"]
    config["tokens"]["redis_sentinel"] = {"sentinels": group.addresses, "master": group.name}
    return json.dumps(config, indent=1)


class SentinelProxyFailoverTests(SentinelGroupMixin, TestCase):
    """
    A vaporproxy process on Sentinel while the master dies.
    """

    def setUp(self) -> None:
        super().setUp()
        self.directory = new_directory()
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.http = HTTP()
        self.factories: List[Any] = []
        self.vnc = RFBEchoServer()
        self.addCleanup(lambda: Deferred.fromCoroutine(self._close()))
        uri = node_uri(write_node_file(self.directory, [domain_xml("vnc-vm", VNC_UUID, [graphics_xml("vnc", self.vnc.port)])]))
        self.proxy = ProxyProcess("S", self.directory, lambda port: sentinel_config_yaml(port, uri, self.group))
        self.proxy.start()

    async def _close(self) -> None:
        for factory in self.factories:
            if not factory.closed.called and factory.client is not None:
                factory.client.transport.abortConnection()
        await DeferredList([f.closed for f in self.factories if not f.closed.called], consumeErrors=True)
        self.proxy.kill()
        await self.vnc.close()
        await self.http.pool.closeCachedConnections()

    async def open(self, token: str) -> Tuple[Any, Any]:
        client, factory = await ws_connect(self.proxy, VNC_UUID, token)
        factory.client = client
        self.factories.append(factory)
        return client, factory

    async def console(self, token: str) -> Any:
        client, _ = await self.open(token)
        self.assertIsNotNone(client, f"console not opened:\n{self.proxy.log_tail()}")
        await vnc_console(client)
        self.assertEqual(await echo(client, b"hello"), b"hello")
        return client

    async def connections(self) -> int:
        code, body = await self.http.request("GET", self.proxy.base + "/api/v1/console/stats", ADMIN_KEY)
        self.assertEqual(code, 200, body)
        return int(body["total_connections"])

    async def test_failover(self) -> None:
        """
        When the master is SIGKILLed, the API answers 503 SERVICE_UNAVAILABLE (WebSockets 4013, /readyz 503) until the replica is promoted, then mints and redeems again by itself; the live console relays throughout, its token stays used, a token minted before the kill still opens a console, and the live console's lease is renewed on the new master.
        """
        await self.http.wait_ready(self.proxy)
        live_token = await self.http.token(self.proxy, "vnc-vm")
        live = await self.console(live_token)
        spare = await self.http.token(self.proxy, "vnc-vm")
        self.group.master.kill()
        killed = time.monotonic()
        answers: List[Tuple[int, Any]] = []
        during: List[Any] = []
        while True:
            code, body = await self.http.console_info(self.proxy, "vnc-vm")
            answers.append((code, body.get("code") if isinstance(body, dict) else body))
            if code == 200:
                break
            self.assertLess(time.monotonic() - killed, RECOVERY, f"no recovery: {answers[-3:]}\n{self.proxy.log_tail()}")
            self.assertEqual(await echo(live, b"during"), b"during")
            if not during:
                # Within the failover (down-after-milliseconds alone is 1 s):
                # not ready, and new WebSockets are refused.
                code, _ = await self.http.request("GET", self.proxy.base + "/readyz")
                _, factory = await self.open(live_token)
                during += [code, await factory.closed]
            await sleep(0.1)
        self.assertIn((503, "SERVICE_UNAVAILABLE"), answers)
        self.assertEqual(during, [503, (4013, "SERVICE_UNAVAILABLE")])
        self.assertEqual({a for a in answers if a[0] != 200}, {(503, "SERVICE_UNAVAILABLE")})
        self.assertTrue(self.failed_over())
        # The token minted before the kill survived; the used one stayed used.
        await self.console(spare)
        refused, factory = await self.open(live_token)
        self.assertEqual(await factory.closed, (4003, "TOKEN_ALREADY_USED"))
        await self.console(await self.http.token(self.proxy, "vnc-vm"))
        # The live console's lease is renewed on the new master: past a
        # lease_ttl, the cluster still counts the three consoles.
        await sleep(LEASE_TTL + 0.5)
        self.assertEqual(await self.connections(), 3)
        self.assertEqual(await echo(live, b"after"), b"after")
        self.assertFalse(self.factories[0].closed.called)
