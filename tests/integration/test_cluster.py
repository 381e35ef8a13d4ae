"""
Scale-out (issue #4) with real processes: one C{redis-server} and two
C{twistd vaporproxy} processes (A and B) on it, each on its own loopback
port, looking VMs up in a libvirt C{test:///} node file.  The VNC "VM" is an
RFB echo server in this test process; the SPICE VM is a real QEMU.
"""

from __future__ import annotations

import shutil
import time
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.trial.unittest import TestCase

from tests.integration.libvirt_fixtures import domain_xml, graphics_xml, node_uri, write_node_file
from tests.integration.proxy_cluster import (
    ADMIN_KEY,
    HTTP,
    SPICE_CHANNEL_DISPLAY,
    SPICE_CHANNEL_MAIN,
    VM_PATH,
    ProxyProcess,
    RFBEchoServer,
    WSClient,
    config_yaml,
    echo,
    new_directory,
    sleep,
    spice_channel,
    spice_link,
    spice_main_session,
    vnc_console,
    ws_connect,
)
from tests.integration.redis_server import RedisServer

VNC_UUID = "c1a5e7e0-4b1d-4c2a-9e3f-5a6b7c8d9e01"
SPICE_UUID = "c1a5e7e0-4b1d-4c2a-9e3f-5a6b7c8d9e02"
SPICE_PASSWORD = "sp1ce-t1cket"


class ClusterTests(TestCase):
    """
    Two proxies on one Redis act as one.
    """

    timeout = 40

    def setUp(self) -> None:
        self.redis = RedisServer()
        self.redis.start()
        self.addCleanup(self.redis.cleanup)
        self.directory = new_directory()
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.http = HTTP()
        self.clients: List[Any] = []
        self.proxies: List[ProxyProcess] = []
        self.addCleanup(self._close_all)

    async def _close_everything(self) -> None:
        for factory in self.clients:
            proto = getattr(factory, "_proto", None)
            if not factory.closed.called and proto is not None and proto.transport is not None:
                proto.transport.abortConnection()
        await DeferredList([f.closed for f in self.clients if not f.closed.called], consumeErrors=True)
        for proxy in self.proxies:
            proxy.kill()
        if getattr(self, "vnc", None) is not None:
            await self.vnc.close()
        await self.http.pool.closeCachedConnections()

    def _close_all(self) -> Deferred:
        return Deferred.fromCoroutine(self._close_everything())

    async def start_cluster(self, n: int = 2, spice_port: Optional[int] = None, **settings: Any) -> List[ProxyProcess]:
        """
        Start the VNC echo VM, write the node file, start C{n} proxies and
        wait until they answer.
        """
        self.vnc = RFBEchoServer()
        domains = [domain_xml("vnc-vm", VNC_UUID, [graphics_xml("vnc", self.vnc.port)])]
        if spice_port is not None:
            domains.append(
                domain_xml("spice-vm", SPICE_UUID, [graphics_xml("spice", spice_port, passwd=SPICE_PASSWORD)])
            )
        uri = node_uri(write_node_file(self.directory, domains))
        for name in "AB"[:n] if n <= 2 else [f"P{i}" for i in range(n)]:
            proxy = ProxyProcess(name, self.directory, lambda port: config_yaml(port, uri, self.redis.url, **settings))
            proxy.start()
            self.proxies.append(proxy)
        await gatherResults([Deferred.fromCoroutine(self.http.wait_ready(p)) for p in self.proxies])
        return self.proxies

    async def open(self, proxy: ProxyProcess, token: str, vm: str = VNC_UUID, protocols: Any = None) -> Tuple[Optional[WSClient], Any]:
        client, factory = await ws_connect(proxy, vm, token, protocols)
        factory._proto = client
        self.clients.append(factory)
        return client, factory

    async def console(self, proxy: ProxyProcess, token: str) -> WSClient:
        """
        A relaying VNC console through C{proxy}.
        """
        client, factory = await self.open(proxy, token)
        self.assertIsNotNone(client, f"WebSocket on {proxy.name} not opened")
        await vnc_console(client)
        self.assertEqual(await echo(client, b"hello"), b"hello")
        return client

    async def refused(self, proxy: ProxyProcess, token: str, vm: str = VNC_UUID) -> Tuple[int, str, Any]:
        """
        Open a WebSocket that the proxy must refuse; answer the close code,
        reason and JSON error.
        """
        client, factory = await self.open(proxy, token, vm)
        code, reason = await factory.closed
        texts = client.texts if client is not None else []
        return code, reason, texts[0] if texts else None

    async def stats(self, proxy: ProxyProcess) -> Dict[str, Any]:
        code, body = await self.http.request("GET", proxy.base + "/api/v1/console/stats", ADMIN_KEY)
        self.assertEqual(code, 200, body)
        return body

    async def stats_at(self, proxy: ProxyProcess, total: int, timeout: float, interval: float) -> Dict[str, Any]:
        """
        C{proxy}'s console stats once they count C{total} connections, or
        the last ones after C{timeout} seconds (the caller checks them).
        """
        deadline = time.monotonic() + timeout
        while True:
            stats = await self.stats(proxy)
            if stats["total_connections"] == total or time.monotonic() > deadline:
                return stats
            await sleep(interval)

    # -- tokens --------------------------------------------------------------

    async def test_tokenMintedOnARedeemedOnB(self) -> None:
        """
        When a token is minted on A, a WebSocket on B redeems it and relays
        the VM's console; a replay on A then says TOKEN_ALREADY_USED.
        """
        a, b = await self.start_cluster()
        token = await self.http.token(a, "vnc-vm")
        client = await self.console(b, token)
        self.assertEqual(await echo(client, b"\x00" * 1000), b"\x00" * 1000)
        code, reason, error = await self.refused(a, token)
        self.assertEqual((code, reason), (4003, "TOKEN_ALREADY_USED"))
        self.assertEqual(error["code"], "TOKEN_ALREADY_USED")

    async def test_racingRedemptions(self) -> None:
        """
        When 50 WebSockets spread over A and B race to redeem one token,
        exactly one relays the console and the 49 others get 4003.
        """
        a, b = await self.start_cluster()
        token = await self.http.token(a, "vnc-vm")
        opened = await gatherResults(
            [Deferred.fromCoroutine(self.open(a if i % 2 else b, token)) for i in range(50)]
        )
        self.assertNotIn(None, [client for client, _ in opened])
        # Each loser is closed with 4003; the winner gets the RFB greeting.
        results = await gatherResults(
            [Deferred.fromCoroutine(self._race_result(client, factory)) for client, factory in opened]
        )
        winners = [r for r in results if r == "console"]
        codes = sorted(r for r in results if r != "console")
        self.assertEqual(len(winners), 1, results)
        self.assertEqual(codes, [(4003, "TOKEN_ALREADY_USED")] * 49)
        [winner] = [c for (c, f), r in zip(opened, results) if r == "console"]
        await vnc_console(winner)
        self.assertEqual(await echo(winner, b"won"), b"won")

    async def _race_result(self, client: WSClient, factory: Any) -> Any:
        first = Deferred()
        client.until(12).addCallbacks(lambda _: first.callback("console") if not first.called else None, lambda f: None)
        factory.closed.addCallback(lambda cr: first.callback(tuple(cr)) if not first.called else None)
        return await first

    # -- limits --------------------------------------------------------------

    async def test_perVMLimitAcrossNodes(self) -> None:
        """
        When max_connections_per_vm is 2 and one console is open on each of
        A and B, a third is refused with 4007 on either; closing one frees
        its slot at once.
        """
        a, b = await self.start_cluster(max_per_vm=2)
        first = await self.console(a, await self.http.token(a, "vnc-vm"))
        await self.console(b, await self.http.token(b, "vnc-vm"))
        for proxy in (a, b):
            code, reason, error = await self.refused(proxy, await self.http.token(a, "vnc-vm"))
            self.assertEqual((code, reason), (4007, "MAX_CONNECTIONS_REACHED"))
            self.assertEqual(error["code"], "MAX_CONNECTIONS_REACHED")
        first.sendClose(1000)
        await self.clients[0].closed
        stats = await self.stats_at(b, 1, timeout=3, interval=0.05)
        self.assertEqual(stats["connections_per_vm"], {VNC_UUID: 1})
        await self.console(b, await self.http.token(a, "vnc-vm"))

    async def test_killedProcessSlotsLapse(self) -> None:
        """
        When A is killed with SIGKILL while holding the VM's only slot, B
        refuses the VM at first and admits it again within the lease time.
        """
        lease_ttl = 2.0
        a, b = await self.start_cluster(max_per_vm=1, lease_ttl="2s")
        await self.console(a, await self.http.token(a, "vnc-vm"))
        code, reason, _ = await self.refused(b, await self.http.token(b, "vnc-vm"))
        self.assertEqual(code, 4007)
        a.kill()
        killed = time.monotonic()
        code, reason, _ = await self.refused(b, await self.http.token(b, "vnc-vm"))
        self.assertEqual(code, 4007)
        while True:
            client, factory = await self.open(b, await self.http.token(b, "vnc-vm"))
            first = Deferred()
            client.until(12).addCallbacks(lambda _: first.callback("console"), lambda f: None)
            factory.closed.addCallback(lambda cr: None if first.called else first.callback(tuple(cr)))
            result = await first
            if result == "console":
                break
            self.assertEqual(result, (4007, "MAX_CONNECTIONS_REACHED"))
            self.assertLess(time.monotonic() - killed, lease_ttl + 1.0, "slot not freed within the lease time")
            await sleep(0.2)
        freed_after = time.monotonic() - killed
        self.assertLess(freed_after, lease_ttl + 1.0)
        await vnc_console(client)
        self.assertEqual(await echo(client, b"after"), b"after")

    # -- Redis outage ----------------------------------------------------------

    async def test_redisOutage(self) -> None:
        """
        When redis-server stops, both proxies answer 503 to console info,
        refuse new WebSockets with 4013 and are not ready, while live
        consoles keep relaying; when it returns they recover by themselves
        and no live console was dropped.
        """
        a, b = await self.start_cluster(redis_timeout="500ms", lease_ttl="1500ms")
        live_a = await self.console(a, await self.http.token(a, "vnc-vm"))
        live_b = await self.console(b, await self.http.token(a, "vnc-vm"))
        spare = await self.http.token(b, "vnc-vm")
        self.redis.stop()
        for proxy in (a, b):
            started = time.monotonic()
            code, body = await self.http.console_info(proxy, "vnc-vm")
            self.assertEqual(code, 503, body)
            self.assertEqual(body["code"], "SERVICE_UNAVAILABLE")
            self.assertLess(time.monotonic() - started, 3.0)
            code, reason, error = await self.refused(proxy, spare)
            self.assertEqual((code, reason), (4013, "SERVICE_UNAVAILABLE"))
            code, body = await self.http.request("GET", proxy.base + "/readyz")
            self.assertEqual(code, 503)
            self.assertFalse(body["ready"])
            self.assertNotEqual(body["checks"]["token_store"], "ok")
        self.assertEqual(await echo(live_a, b"during"), b"during")
        self.assertEqual(await echo(live_b, b"during"), b"during")
        self.redis.start()
        deadline = time.monotonic() + 10
        for proxy in (a, b):
            while True:
                code, body = await self.http.console_info(proxy, "vnc-vm")
                if code == 200:
                    break
                self.assertLess(time.monotonic(), deadline, f"{proxy.name} did not recover: {code} {body}")
                await sleep(0.1)
            code, body = await self.http.request("GET", proxy.base + "/readyz")
            self.assertEqual(code, 200, body)
        await self.console(b, await self.http.token(a, "vnc-vm"))
        self.assertEqual(await echo(live_a, b"after"), b"after")
        self.assertEqual(await echo(live_b, b"after"), b"after")
        self.assertFalse(any(f.closed.called for f in self.clients[:2]))
        # The restarted Redis lost every lease; the live consoles' leases
        # come back with the next renewal (every lease_ttl / 3).
        totals = await self.stats_at(a, 3, timeout=3.0, interval=0.1)
        self.assertEqual(totals["connections_per_vm"], {VNC_UUID: 3})

    # -- stats and DELETE --------------------------------------------------------

    async def test_statsShowClusterTotals(self) -> None:
        """
        When one console is open on A and two on B, stats on A report three
        cluster-wide, A's own console in C{connections}, and each process's
        figures.
        """
        # Each process publishes its figures every lease_ttl / 3.
        a, b = await self.start_cluster(lease_ttl="1500ms")
        await self.console(a, await self.http.token(a, "vnc-vm"))
        await self.console(b, await self.http.token(a, "vnc-vm"))
        await self.console(b, await self.http.token(b, "vnc-vm"))
        deadline = time.monotonic() + 3.0
        while True:
            body = await self.stats(a)
            figures = {p["pid"]: p["total_connections"] for p in body["cluster"]["processes"]}
            if figures.get(b.process.pid) == 2 or time.monotonic() > deadline:
                break
            await sleep(0.1)
        self.assertEqual(body["total_connections"], 3)
        self.assertEqual(body["connections_per_vm"], {VNC_UUID: 3})
        self.assertEqual(len(body["connections"]), 1)
        self.assertEqual(body["connections"][0]["vm_id"], VNC_UUID)
        cluster = body["cluster"]
        self.assertEqual(cluster["total_connections"], 3)
        processes = {p["pid"]: p for p in cluster["processes"]}
        self.assertEqual(set(processes), {a.process.pid, b.process.pid})
        self.assertEqual(processes[b.process.pid]["total_connections"], 2)
        self.assertEqual(processes[a.process.pid]["total_connections"], 1)
        self.assertEqual(processes[a.process.pid]["node_id"], cluster["node_id"])

    async def test_deleteOnAClosesConsoleOnB(self) -> None:
        """
        When an admin deletes the VM's sessions on A, the console on B
        closes with 4010 SESSION_TERMINATED, saying an administrator ended it.
        """
        a, b = await self.start_cluster()
        client = await self.console(b, await self.http.token(a, "vnc-vm"))
        code, body = await self.http.request("DELETE", f"{a.base}{VM_PATH}/vnc-vm/console/sessions", ADMIN_KEY)
        self.assertEqual(code, 200, body)
        self.assertEqual(body, {"terminated": 1})
        closed = self.clients[-1].closed
        closed.addTimeout(5, reactor)
        self.assertEqual(await closed, (4010, "SESSION_TERMINATED"))
        self.assertEqual(client.texts[0]["code"], "SESSION_TERMINATED")
        # The terminate relayed over Redis still says who ended it.
        self.assertEqual(client.texts[0]["error"], "Console ended by an administrator")

    # -- SPICE -------------------------------------------------------------------

    async def test_spiceChannelsOnAAndB(self) -> None:
        """
        When a SPICE console's main channel lands on A and a display channel
        with its session id on B, QEMU accepts both; a display channel with
        a wrong session id is refused; B counts no console of its own.
        """
        from tests.integration.qemu_fixture import start_qemu

        qemu = start_qemu(self, spice_password=SPICE_PASSWORD)
        a, b = await self.start_cluster(spice_port=qemu.spice_port, max_per_vm=1)
        code, info = await self.http.console_info(b, "spice-vm")
        self.assertEqual(code, 200, info)
        self.assertEqual((info["type"], info["password"]), ("spice", "********"))
        token = info["token"]
        main, _ = await self.open(a, token, SPICE_UUID, ["binary"])
        self.assertEqual(await spice_channel(main, SPICE_CHANNEL_MAIN, 0), 0)
        session_id = await spice_main_session(main)
        self.assertNotEqual(session_id, 0)

        display, _ = await self.open(b, token, SPICE_UUID, ["binary"])
        self.assertEqual(await spice_channel(display, SPICE_CHANNEL_DISPLAY, session_id), 0)

        wrong, wrong_factory = await self.open(b, token, SPICE_UUID, ["binary"])
        wrong.send(spice_link(SPICE_CHANNEL_DISPLAY, session_id ^ 0x5A5A))
        code, reason = await wrong_factory.closed
        # The SPICE guard answers a used token without the right session
        # id as TOKEN_ALREADY_USED.
        self.assertEqual((code, reason), (4003, "TOKEN_ALREADY_USED"))

        stats_a, stats_b = await self.stats(a), await self.stats(b)
        self.assertEqual(stats_a["total_connections"], 1)
        self.assertEqual(len(stats_a["connections"]), 1)
        self.assertEqual(stats_b["connections"], [])
        self.assertEqual(stats_b["total_connections"], 1)
        self.assertFalse(self.clients[0].closed.called)
        self.assertFalse(self.clients[1].closed.called)
