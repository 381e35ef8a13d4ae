"""
Share links across two real C{twistd vaporproxy} processes (A and B) on one
C{redis-server} started by the test (issue #9): a share made on A opens a
console on B, its uses are counted across both, and revoking it on A closes
the console on B with 4010.  L{TwoNodes} is the fixture the other two-node
Redis tests share.
"""

from __future__ import annotations

import json
import time
from typing import Any, Dict, List, Optional, Tuple

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase

from tests.integration.libvirt_fixtures import domain_xml, graphics_xml, node_uri, write_node_file
from tests.integration.proxy_cluster import (
    ADMIN_KEY,
    USER_KEY,
    VM_PATH,
    ProxyProcess,
    RFBEchoServer,
    WSClient,
    config_yaml,
    echo,
    sleep,
    vnc_console,
)
from tests.integration import test_cluster as cluster
from tests.integration.redis_server import RedisServer
from vaporproxy.config import ConsoleConfig, TokensConfig
from vaporproxy.stores.redis import RedisBackend, connect_redis
from vaporproxy.stores.redis_shares import RedisShareStore

VM_UUID = cluster.VNC_UUID
SHARES = f"{VM_PATH}/{VM_UUID}/console/shares"


def merged(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    """C{base} with C{extra}'s sections merged in, key by key."""
    out = dict(base)
    for section, values in extra.items():
        out[section] = {**out.get(section, {}), **values}
    return out


class TwoNodes:
    """
    One Redis, an RFB echo "VM" and two proxy processes, A and B, with the
    same config (C{settings} merged into L{config_yaml}'s).
    """

    timeout = 60
    vnc: Optional[RFBEchoServer] = None

    # The cluster tests' fixture: one Redis, the proxies and WebSockets
    # closed at the end.
    setUp = cluster.ClusterTests.setUp
    _close_everything = cluster.ClusterTests._close_everything
    _close_all = cluster.ClusterTests._close_all
    open = cluster.ClusterTests.open

    async def start_nodes(self, settings: Optional[Dict[str, Any]] = None) -> Tuple[ProxyProcess, ProxyProcess]:
        self.vnc = RFBEchoServer()
        uri = node_uri(write_node_file(self.directory, [domain_xml("vnc-vm", VM_UUID, [graphics_xml("vnc", self.vnc.port)])]))

        def config(port: int) -> str:
            return json.dumps(merged(json.loads(config_yaml(port, uri, self.redis.url)), settings or {}))

        for name in "AB":
            proxy = ProxyProcess(name, self.directory, config)
            proxy.start()
            self.proxies.append(proxy)
        await gatherResults([Deferred.fromCoroutine(self.http.wait_ready(p)) for p in self.proxies])
        return self.proxies[0], self.proxies[1]

    async def call(self, method: str, proxy: ProxyProcess, path: str, auth: str,
                   body: Optional[Dict[str, Any]] = None) -> Tuple[int, Any, Any]:  # fmt: skip
        """
        One HTTP request with C{Authorization: auth}; answers status, JSON
        body and headers.
        """
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": auth, "Content-Type": "application/json"}
        response = await treq.request(method, proxy.base + path, headers=headers, data=data, pool=self.http.pool)
        return response.code, json.loads(await response.content()), response.headers

    async def info(self, proxy: ProxyProcess, auth: str = "Bearer " + USER_KEY) -> Tuple[int, Any, Any]:
        return await self.call("GET", proxy, f"{VM_PATH}/{VM_UUID}/console", auth)

    async def token(self, proxy: ProxyProcess, auth: str = "Bearer " + USER_KEY) -> str:
        code, body, _ = await self.info(proxy, auth)
        self.assertEqual(code, 200, body)
        return body["token"]

    async def console(self, proxy: ProxyProcess, token: str, check_echo: bool = True) -> WSClient:
        """A VNC console through C{proxy}, past ServerInit (and relaying, when C{check_echo})."""
        client, _ = await self.open(proxy, token)
        self.assertIsNotNone(client, f"WebSocket on {proxy.name} not opened")
        await vnc_console(client)
        if check_echo:
            self.assertEqual(await echo(client, b"hello"), b"hello")
        return client

    async def refused(self, proxy: ProxyProcess, token: str) -> Tuple[int, Any]:
        """Open a console WebSocket the proxy must close; answer the close code and the JSON error."""
        client, factory = await self.open(proxy, token)
        code, _ = await factory.closed
        texts = client.texts if client is not None else []
        return code, texts[0] if texts else None

    async def closed_within(self, client: WSClient, seconds: float) -> int:
        code, _ = await client.closed.addTimeout(seconds, reactor)
        return code


class ShareAcrossNodesTests(TwoNodes, TestCase):
    """
    A share link made on one node, used and revoked across two.
    """

    async def test_shareAcrossNodes(self) -> None:
        """When a share is made on A, it opens a view console on B, its two uses are spent across both nodes, and revoking it on A closes the console on B with 4010 and refuses on B the token its second use minted on A."""
        a, b = await self.start_nodes()
        code, share, _ = await self.call("POST", a, SHARES, "Bearer " + USER_KEY, {"mode": "view", "max_uses": 2})
        self.assertEqual(code, 201, share)
        secret = share["url"].split("#share=", 1)[1]
        code, info, _ = await self.info(b, "Share " + secret)
        self.assertEqual((code, info.get("mode")), (200, "view"), info)
        watcher = await self.console(b, info["token"], check_echo=False)
        code, second, _ = await self.info(a, "Share " + secret)
        self.assertEqual(code, 200, second)
        code, third, _ = await self.info(b, "Share " + secret)
        self.assertEqual((code, third["code"]), (401, "TOKEN_ALREADY_USED"))
        code, listed, _ = await self.call("GET", b, SHARES, "Bearer " + USER_KEY)
        self.assertEqual([(s["share_id"], s["uses_left"]) for s in listed["shares"]], [(share["share_id"], 0)])
        code, stats, _ = await self.call("GET", b, "/api/v1/console/stats", "Bearer " + ADMIN_KEY)
        self.assertEqual([(c["user"], c["share_id"]) for c in stats["connections"]],
                         [("alice", share["share_id"])], stats)  # fmt: skip
        started = time.monotonic()
        code, revoked, _ = await self.call("DELETE", a, f"{SHARES}/{share['share_id']}", "Bearer " + USER_KEY)
        self.assertEqual((code, revoked["revoked"]), (200, share["share_id"]))
        self.assertEqual(await self.closed_within(watcher, 10), 4010)
        self.assertEqual(watcher.texts[-1]["error"], "Share link revoked")
        print(f"\nshare revoked on A: console on B closed 4010 in {time.monotonic() - started:.3f}s")
        code, error = await self.refused(b, second["token"])
        self.assertEqual((code, error and error.get("code")), (4001, "INVALID_TOKEN"), error)
        self.assertEqual((await self.call("GET", a, SHARES, "Bearer " + ADMIN_KEY))[1], {"shares": []})

    async def test_otherConsolesStay(self) -> None:
        """When a share is revoked on A, a console on B opened with the creator's own key keeps relaying."""
        a, b = await self.start_nodes()
        own = await self.console(b, await self.token(a))
        code, share, _ = await self.call("POST", b, SHARES, "Bearer " + USER_KEY, {"mode": "control"})
        secret = share["url"].split("#share=", 1)[1]
        shared = await self.console(b, await self.token(a, "Share " + secret))
        await self.call("DELETE", a, f"{SHARES}/{share['share_id']}", "Bearer " + USER_KEY)
        self.assertEqual(await self.closed_within(shared, 10), 4010)
        self.assertEqual(await echo(own, b"still"), b"still")


class ShareSignalTests(TestCase):
    """
    The pub/sub message a revocation sends, between two backends on one Redis.
    """

    timeout = 30

    def setUp(self) -> None:
        self.redis = RedisServer()
        self.redis.start()
        self.addCleanup(self.redis.cleanup)

    async def test_revokeReachesEveryBackend(self) -> None:
        """When one node's share store revokes a share, every backend's share callbacks get its id and no VM callback runs."""
        tokens = TokensConfig(backend="redis", redis_url=self.redis.url, redis_timeout=2.0, lease_ttl=3.0)
        backends: List[RedisBackend] = []
        heard: List[Tuple[str, str]] = []
        for name in "ab":
            backend = connect_redis(tokens, ConsoleConfig(), reactor, node_id=name)
            self.addCleanup(backend.close)
            backend.start()
            backend.on_share_revoked(lambda share_id, name=name: heard.append((name, share_id)))
            backend.on_terminate(lambda vm, name=name: heard.append((name, "vm " + vm)))
            backends.append(backend)
        while int((await backends[0].client.execute("PUBSUB", "NUMSUB", "vaporproxy:terminate"))[1]) < 2:
            await sleep(0.05)
        store = RedisShareStore(backends[0].client, reactor)
        _, share = await store.create(vm_uuid=VM_UUID, vm_name="vm", mode="view", creator="alice", ttl=60, max_uses=1)
        await store.revoke(share.share_id)
        deadline = time.monotonic() + 5
        while len(heard) < 2 and time.monotonic() < deadline:
            await sleep(0.02)
        self.assertEqual(sorted(heard), [("a", share.share_id), ("b", share.share_id)])
