"""
End to end: a real QEMU VM under a session libvirtd, the real proxy run by
C{twistd}, and noVNC / spice-html5 / raw WebSockets in headless Chromium.

What each test checks is what a person at the browser would see: a drawn
screen, or the close code and error of the console WebSocket.
"""

from __future__ import annotations

import json
from typing import Any, Dict

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool

import treq
from treq.client import HTTPClient

from tests.e2e.fixture import API_PREFIX, VM_NAME, environment, run_driver, skip_reason

_SKIP = skip_reason()


async def mint(base_url: str, key: str, vm: str, console_type: str = "vnc") -> Dict[str, Any]:
    """
    Ask the proxy for console info (and so a fresh token) for C{vm}.
    """
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = HTTPClient(Agent(reactor, pool=pool))
    response = await client.get(
        f"{base_url}{API_PREFIX}{vm}/console?type={console_type}",
        headers={"Authorization": f"Bearer {key}"},
    )
    body = json.loads(await treq.content(response))
    return {"status": response.code, "body": body}


async def http(method: str, url: str, key: str) -> Dict[str, Any]:
    """
    One authenticated API call on a fresh connection: status and JSON body.
    """
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = HTTPClient(Agent(reactor, pool=pool))
    response = await client.request(method, url, headers={"Authorization": f"Bearer {key}"})
    return {"status": response.code, "body": json.loads(await treq.content(response))}


async def wait_for_consoles(
    base_url: str, key: str, count: int, timeout: float = 20.0, min_bytes_sent: int = 0
) -> None:
    """
    Wait until the proxy's stats show at least C{count} live consoles, each
    having sent the browser at least C{min_bytes_sent} bytes (past the
    handshake: the page is showing the screen).
    """
    for _ in range(int(timeout / 0.2)):
        stats = await http("GET", f"{base_url}/api/v1/console/stats", key)
        body = stats["body"] if stats["status"] == 200 else {}
        live = [c for c in body.get("connections", []) if c.get("bytes_sent", 0) >= min_bytes_sent]
        if body.get("total_connections", 0) >= count and len(live) >= count:
            return
        await deferLater(reactor, 0.2, lambda: None)
    raise AssertionError(f"the proxy never had {count} live consoles: {stats}")


def ws_url(base_url: str, info: Dict[str, Any]) -> str:
    return base_url.replace("http://", "ws://") + info["ws_path"] + "?token=" + info["token"]


async def open_once(base_url: str, info: Dict[str, Any]) -> Dict[str, Any]:
    """
    The browser opens the console WebSocket of C{info} once (the Origin is
    the proxy's own); answer the driver's result for it.
    """
    [r] = await run_driver(
        {
            "timeout_ms": 20000,
            "steps": [{"kind": "ws", "origin": base_url + "/healthz", "ws_url": ws_url(base_url, info)}],
        }
    )
    return r


class E2ETestCase(unittest.TestCase):
    """
    Shared helpers; the environment is created by the first test.
    """

    skip = _SKIP
    timeout = 150

    def setUp(self) -> None:
        self.env = environment()

    def page_url(self, base_url: str, vm: str, query: str = "") -> str:
        return f"{base_url}/console/{vm}{query}#key={self.env.key}"

    def explain(self, proxy_name: str, result: Any) -> str:
        return f"browser saw {json.dumps(result)[:3000]}\nproxy log tail:\n{self.env.proxy_log(proxy_name)}"


class ConsolePageTests(E2ETestCase):
    """
    The bundled console page with noVNC and spice-html5 against the VM.
    """

    def test_novnc_draws_screen(self) -> Deferred:
        """
        When the console page opens the VM's VNC console, noVNC reaches
        "connected" and draws a non-blank screen (SeaBIOS text), on one token,
        and the API key is gone from the address bar.
        """
        proxy = self.env.proxy("main")

        async def go() -> None:
            [r] = await run_driver(
                {
                    "timeout_ms": 40000,
                    "steps": [
                        {
                            "kind": "page",
                            "url": self.page_url(proxy.base_url, VM_NAME, "?type=vnc"),
                            "until": "connected",
                            "paint": True,
                            "timeout_ms": 30000,
                        }
                    ],
                }
            )
            why = self.explain("main", r)
            self.assertTrue(r.get("reached"), why)
            self.assertEqual(r["vapor"]["state"], "connected", why)
            self.assertEqual(r["vapor"]["type"], "vnc", why)
            self.assertEqual(r["vapor"]["tokenFetches"], 1, why)
            self.assertGreater(r["canvas"]["nonBackground"], 50, why)
            self.assertGreaterEqual(r["canvas"]["colors"], 2, why)
            self.assertNotIn("key=", r["address"], why)

        return Deferred.fromCoroutine(go())

    def test_spice_all_channels_one_token(self) -> Deferred:
        """
        When the console page opens the VM's SPICE console, spice-html5 opens
        at least its four channels (main, display, inputs, cursor) on the
        one token the page fetched, and draws a non-blank screen.
        """
        proxy = self.env.proxy("main")

        async def go() -> None:
            [r] = await run_driver(
                {
                    "timeout_ms": 40000,
                    "steps": [
                        {
                            "kind": "page",
                            "url": self.page_url(proxy.base_url, VM_NAME, "?type=spice"),
                            "until": "connected",
                            "paint": True,
                            "min_channels": 4,
                            "timeout_ms": 30000,
                        }
                    ],
                }
            )
            why = self.explain("main", r)
            self.assertTrue(r.get("reached"), why)
            self.assertEqual(r["vapor"]["type"], "spice", why)
            self.assertGreaterEqual(r["vapor"]["maxChannels"], 4, why)
            self.assertEqual(r["vapor"]["tokenFetches"], 1, why)
            self.assertIsNone(r["vapor"]["closeCode"], why)
            self.assertGreater(r["canvas"]["nonBackground"], 50, why)

        return Deferred.fromCoroutine(go())

    def test_unknown_vm_fails_without_retry(self) -> Deferred:
        """
        When the page is opened for a VM that does not exist, it shows a
        failure after one console-info call and does not retry.
        """
        proxy = self.env.proxy("main")

        async def go() -> None:
            [r] = await run_driver(
                {
                    "timeout_ms": 20000,
                    "steps": [
                        {
                            "kind": "page",
                            "url": self.page_url(proxy.base_url, "no-such-vm"),
                            "until": "closed",
                            "timeout_ms": 10000,
                        }
                    ],
                }
            )
            why = self.explain("main", r)
            self.assertTrue(r.get("reached"), why)
            self.assertEqual(r["vapor"]["state"], "failed", why)
            self.assertEqual(r["vapor"]["lastError"], "VM_NOT_FOUND", why)
            self.assertEqual(r["vapor"]["tokenFetches"], 1, why)

        return Deferred.fromCoroutine(go())


class WebSocketErrorTests(E2ETestCase):
    """
    Token, limit and host errors as the browser sees them: a JSON error
    message, then a close frame with code 4000 + n and the code as reason.
    """

    def assert_closed_with(self, result: Dict[str, Any], close_code: int, code: str, why: str) -> None:
        self.assertEqual(result.get("closeCode"), close_code, why)
        self.assertEqual(result.get("closeReason"), code, why)
        errors = [json.loads(t) for t in result.get("texts", []) if t.startswith("{")]
        self.assertIn({"type": "error", "code": code}, [{"type": e.get("type"), "code": e.get("code")} for e in errors], why)

    def test_replayed_token(self) -> Deferred:
        """
        When a token that already opened a console is presented again, the
        browser's WebSocket is closed with 4003 TOKEN_ALREADY_USED.
        """
        proxy = self.env.proxy("main")

        async def go() -> None:
            info = await mint(proxy.base_url, self.env.key, VM_NAME, "vnc")
            self.assertEqual(info["status"], 200, info)
            url = ws_url(proxy.base_url, info["body"])
            origin = proxy.base_url + "/healthz"
            first, second = await run_driver(
                {
                    "timeout_ms": 30000,
                    "steps": [
                        {"kind": "ws", "origin": origin, "ws_url": url, "close_after_data": True},
                        {"kind": "ws", "origin": origin, "ws_url": url},
                    ],
                }
            )
            why = self.explain("main", [first, second])
            self.assertTrue(first.get("opened"), why)
            self.assertGreater(first.get("binaryBytes", 0), 0, why)
            self.assert_closed_with(second, 4003, "TOKEN_ALREADY_USED", why)

        return Deferred.fromCoroutine(go())

    def test_expired_token(self) -> Deferred:
        """
        When a token is presented after its C{token_ttl}, the browser's
        WebSocket is closed with 4002 TOKEN_EXPIRED.
        """
        proxy = self.env.proxy("short-ttl", {"token_ttl": "1s", "cleanup_interval": "1h"})

        async def go() -> None:
            info = await mint(proxy.base_url, self.env.key, VM_NAME, "vnc")
            self.assertEqual(info["status"], 200, info)
            await deferLater(reactor, 1.6, lambda: None)
            r = await open_once(proxy.base_url, info["body"])
            self.assert_closed_with(r, 4002, "TOKEN_EXPIRED", self.explain("short-ttl", r))

        return Deferred.fromCoroutine(go())

    def test_vm_over_limit(self) -> Deferred:
        """
        When a VM already has C{max_connections_per_vm} consoles open, a
        second console page sees close 4007 MAX_CONNECTIONS_REACHED and keeps
        trying (it is not a fatal error).
        """
        proxy = self.env.proxy("limit-1", {"max_connections_per_vm": 1})

        async def go() -> None:
            holder, second = await run_driver(
                {
                    "timeout_ms": 45000,
                    "steps": [
                        {
                            "kind": "page",
                            "url": self.page_url(proxy.base_url, VM_NAME, "?type=vnc"),
                            "until": "connected",
                            "timeout_ms": 20000,
                        },
                        {
                            "kind": "page",
                            "url": self.page_url(proxy.base_url, VM_NAME, "?type=vnc"),
                            "until": "closed",
                            "timeout_ms": 15000,
                        },
                    ],
                }
            )
            why = self.explain("limit-1", [holder, second])
            self.assertTrue(holder.get("reached"), why)
            self.assertEqual(holder["vapor"]["state"], "connected", why)
            self.assertTrue(second.get("reached"), why)
            self.assertEqual(second["vapor"]["closeCode"], 4007, why)
            self.assertEqual(second["vapor"]["lastError"], "MAX_CONNECTIONS_REACHED", why)
            self.assertEqual(second["vapor"]["state"], "reconnecting", why)

        return Deferred.fromCoroutine(go())

    def test_disallowed_host(self) -> Deferred:
        """
        When C{allowed_hosts} is reloaded (SIGHUP) to exclude the VM's
        console address after a token was minted, that token's WebSocket is
        closed with 4008 UNAUTHORIZED.
        """
        proxy = self.env.proxy("hosts")

        async def go() -> None:
            info = await mint(proxy.base_url, self.env.key, VM_NAME, "vnc")
            self.assertEqual(info["status"], 200, info)
            self.env.rewrite_config("hosts", {"allowed_hosts": ["192.0.2.1"]})
            proxy.reload()
            # The reload is applied when the API refuses to mint for the VM
            # (it checks the host too), or after a short grace period.
            for _ in range(20):
                await deferLater(reactor, 0.1, lambda: None)
                probe = await mint(proxy.base_url, self.env.key, VM_NAME, "vnc")
                if probe["status"] != 200:
                    break
            r = await open_once(proxy.base_url, info["body"])
            self.assert_closed_with(r, 4008, "UNAUTHORIZED", self.explain("hosts", r))

        return Deferred.fromCoroutine(go())


class ConsoleLifecycleTests(E2ETestCase):
    """
    What the page does when a live console ends: reconnect with a fresh
    token, or stop for good.
    """

    def test_reconnects_with_fresh_token_after_restart(self) -> Deferred:
        """
        When the proxy restarts under a connected page (close 1001), the
        page reconnects on its own with a newly fetched token.
        """
        proxy = self.env.proxy("restart")

        async def go() -> None:
            driver = Deferred.fromCoroutine(
                run_driver(
                    {
                        "timeout_ms": 45000,
                        "steps": [
                            {
                                "kind": "page",
                                "url": self.page_url(proxy.base_url, VM_NAME, "?type=vnc"),
                                "until": "connected",
                                "then_connects": 2,
                                "timeout_ms": 40000,
                            }
                        ],
                    }
                )
            )
            # Until the page shows the screen (a framebuffer update went out),
            # not merely until the console exists: a restart during noVNC's
            # handshake is a failed connect, not a reconnect.
            await wait_for_consoles(proxy.base_url, self.env.key, 1, min_bytes_sent=1000)
            proxy.stop()
            proxy.start()
            [r] = await driver
            why = self.explain("restart", r)
            self.assertTrue(r.get("reached"), why)
            self.assertEqual(r["vapor"]["state"], "connected", why)
            self.assertEqual(r["vapor"]["connects"], 2, why)
            self.assertGreaterEqual(r["vapor"]["tokenFetches"], 2, why)
            self.assertEqual(r["vapor"]["history"][0]["code"], 1001, why)

        return Deferred.fromCoroutine(go())

    def test_key_pasted_into_open_page(self) -> Deferred:
        """
        When the page is opened without a key its status line says how to give one; a key then pasted into its address (a same-page navigation) connects it and leaves the address bar.
        """
        proxy = self.env.proxy("main")
        page = f"{proxy.base_url}/console/{VM_NAME}?type=vnc"

        async def go() -> None:
            no_key, pasted = await run_driver(
                {
                    "timeout_ms": 50000,
                    "steps": [
                        {"kind": "page", "url": page, "until": "closed", "timeout_ms": 15000},
                        {"kind": "page", "url": page, "until": "closed", "timeout_ms": 30000,
                         "actions": [{"fragment": f"key={self.env.key}"}], "then_connects": 1},
                    ],
                }
            )  # fmt: skip
            why = self.explain("main", [no_key, pasted])
            self.assertEqual(no_key["vapor"]["state"], "failed", why)
            self.assertIn("#key=", no_key["vapor"]["statusText"], why)
            self.assertTrue(pasted.get("reached"), why)
            self.assertEqual(pasted["vapor"]["history"][0]["http"], 401, why)
            self.assertEqual(pasted["vapor"]["state"], "connected", why)
            self.assertNotIn("key=", pasted["address"], why)

        return Deferred.fromCoroutine(go())

    def test_terminated_session_is_final(self) -> Deferred:
        """
        When an admin terminates the VM's consoles, the page shows 4010
        SESSION_TERMINATED with the proxy's words for why, and does not reconnect.
        """
        proxy = self.env.proxy("main")

        async def go() -> None:
            driver = Deferred.fromCoroutine(
                run_driver(
                    {
                        "timeout_ms": 40000,
                        "steps": [
                            {
                                "kind": "page",
                                "url": self.page_url(proxy.base_url, VM_NAME, "?type=vnc"),
                                "until": "connected",
                                "then_closed": True,
                                "settle_ms": 1500,
                                "timeout_ms": 30000,
                            }
                        ],
                    }
                )
            )
            await wait_for_consoles(proxy.base_url, self.env.key, 1, min_bytes_sent=1000)
            answer = await http(
                "DELETE", f"{proxy.base_url}{API_PREFIX}{VM_NAME}/console/sessions", self.env.key
            )
            [r] = await driver
            why = self.explain("main", [answer, r])
            self.assertEqual(answer["status"], 200, why)
            self.assertTrue(r.get("reached"), why)
            self.assertEqual(r["vapor"]["closeCode"], 4010, why)
            self.assertEqual(r["vapor"]["lastError"], "SESSION_TERMINATED", why)
            self.assertEqual(r["vapor"]["state"], "failed", why)
            # The status line says what happened in words (the proxy's text
            # of why), not only the code.
            self.assertEqual(r["vapor"]["errorText"], "Console ended by an administrator", why)
            self.assertEqual(r["vapor"]["statusText"],
                             "closed: Console ended by an administrator (SESSION_TERMINATED, 4010)", why)  # fmt: skip
            self.assertEqual(r["vapor"]["tokenFetches"], 1, why)

        return Deferred.fromCoroutine(go())
