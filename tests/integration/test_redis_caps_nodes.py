"""
The per-user, per-client and outstanding-token caps through the product,
across two real C{twistd vaporproxy} processes on one C{redis-server}
(issue #11): a cap counts the consoles or tokens of both nodes, a console
refused with 4007 on one node keeps its token for a retry on the other, and
the refusals show in C{/metrics} as on one node.
"""

from __future__ import annotations

import re
import time
from typing import Any, Dict

from twisted.trial.unittest import TestCase

from tests.integration.proxy_cluster import ADMIN_KEY, sleep
from tests.integration.test_redis_share_nodes import TwoNodes

ADMIN = "Bearer " + ADMIN_KEY
STATS = "/api/v1/console/stats"


class CapsAcrossNodesTests(TwoNodes, TestCase):
    """
    Caps held by two nodes together.
    """

    async def refusals(self, proxy: Any) -> float:
        """The consoles C{proxy} ended with MAX_CONNECTIONS_REACHED, from its /metrics."""
        response = await self.http.request("GET", proxy.base + "/metrics", ADMIN_KEY)
        text = response[1].decode() if isinstance(response[1], bytes) else str(response[1])
        found = re.findall(r'^vaporproxy_console_outcomes_total\{[^}]*MAX_CONNECTIONS_REACHED[^}]*\} (\S+)$', text, re.M)
        return sum(float(n) for n in found)

    async def hang_up(self, proxy: Any, client: Any) -> None:
        """Close C{client}'s console and wait until the cluster no longer counts it."""
        before = (await self.call("GET", proxy, STATS, ADMIN))[1]["total_connections"]
        client.transport.loseConnection()
        await client.closed
        deadline = time.monotonic() + 10
        while (await self.call("GET", proxy, STATS, ADMIN))[1]["total_connections"] >= before:
            self.assertLess(time.monotonic(), deadline, "the closed console's lease was not released")
            await sleep(0.05)

    async def test_perUserCapAcrossNodes(self) -> None:
        """When a user holds max_connections_per_user consoles on A and B, the next is refused 4007 on either node while another user is admitted; once one closes, the refused token opens on the other node."""
        a, b = await self.start_nodes({"console": {"max_connections_per_user": 2}})
        on_a = await self.console(a, await self.token(a))
        await self.console(b, await self.token(b))
        spare = await self.token(a)
        code, error = await self.refused(b, spare)
        self.assertEqual((code, error["code"]), (4007, "MAX_CONNECTIONS_REACHED"))
        await self.console(a, await self.token(b, ADMIN))
        self.assertGreaterEqual(await self.refusals(b), 1)
        await self.hang_up(b, on_a)
        await self.console(a, spare)

    async def test_perClientCapAcrossNodes(self) -> None:
        """When one client address holds max_connections_per_client consoles over both nodes, a console of another user from it is refused 4007, and its token stays good."""
        a, b = await self.start_nodes({"console": {"max_connections_per_client": 1}})
        first = await self.console(a, await self.token(a))
        token = await self.token(b, ADMIN)
        code, error = await self.refused(b, token)
        self.assertEqual((code, error["code"]), (4007, "MAX_CONNECTIONS_REACHED"))
        await self.hang_up(b, first)
        await self.console(b, token)

    async def test_outstandingTokensAcrossNodes(self) -> None:
        """When a key holds max_outstanding_tokens unused tokens minted on A and B, console info on either answers 429 RATE_LIMITED with Retry-After; another key still mints; a redeemed token makes room."""
        settings: Dict[str, Any] = {"auth": {"max_outstanding_tokens": 3, "mint_rate": 1000, "mint_burst": 1000}}
        a, b = await self.start_nodes(settings)
        tokens = [await self.token(a), await self.token(b), await self.token(a)]
        for proxy in (a, b):
            code, body, headers = await self.info(proxy)
            self.assertEqual((code, body["code"]), (429, "RATE_LIMITED"), body)
            retry = int(headers.getRawHeaders("retry-after")[0])
            self.assertTrue(250 <= retry <= 300, retry)  # the oldest expires within token_ttl (5m)
        await self.token(b, ADMIN)
        await self.console(b, tokens[0])
        await self.token(a)
        code, body, _ = await self.info(b)
        self.assertEqual(code, 429, body)
