"""
Hostile requests against the HTTP side, in memory (issue #11): control
characters in paths, forged log lines, server software, reflected Host
headers, request bodies.
"""

from __future__ import annotations

import json
from typing import Any, List

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.http.test_api import ADMIN_KEY, USER_KEY, VMS, APITestCase, Harness
from vaporproxy.errors import ErrorCode
from vaporproxy.http.site import ConsoleSite, body_limit, escape_controls

SHARES = b"/api/v1/virtualization/virtualmachines/web-1/console/shares"


def exchange(site: ConsoleSite, data: bytes) -> StringTransport:
    """
    Feed C{data} to a fresh connection of C{site}; answer its transport.
    """
    protocol = site.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(data)
    return transport


class ControlCharacterTests(APITestCase):
    """
    Control characters in paths and ids answer 400/404, never 500.
    """

    def assertNoCritical(self) -> None:
        self.assertEqual([e for e in self.events if e.get("log_failure") is not None], [])

    def test_static_nul(self) -> None:
        """When a static file name holds a NUL byte, the answer is 404 and nothing is logged as a failure."""
        response, body = self.json_request("GET", "/static/app/a%00")
        self.assertError(response, body, 404, ErrorCode.NOT_FOUND)
        self.assertNoCritical()

    def test_info_nul(self) -> None:
        """When a console-info VM id holds a NUL byte, the answer is 400."""
        response, body = self.json_request("GET", f"{VMS}/web%00-1/console", USER_KEY)
        self.assertError(response, body, 400, ErrorCode.BAD_REQUEST)
        self.assertNoCritical()

    def test_page_and_delete_nul(self) -> None:
        """When the console page's or DELETE's VM id holds a NUL byte, the answer is 400."""
        response, body = self.json_request("GET", "/console/a%00")
        self.assertError(response, body, 400, ErrorCode.BAD_REQUEST)
        response, body = self.json_request("DELETE", f"{VMS}/a%00/console/sessions", ADMIN_KEY)
        self.assertError(response, body, 400, ErrorCode.BAD_REQUEST)
        self.assertNoCritical()

    def test_ws_crlf(self) -> None:
        """When a console WebSocket path carries a percent-encoded CR/LF, it is refused with 400 before the bridge sees it, and no log text holds a line break."""
        response, body = self.json_request(
            "GET", f"{VMS}/a%0d%0aFORGED%20line/console/ws?token=x",
            headers={"Upgrade": ["websocket"], "Connection": ["Upgrade"]},
        )  # fmt: skip
        self.assertError(response, body, 400, ErrorCode.BAD_REQUEST)
        for event in self.events:
            self.assertNotIn("\n", json.dumps(event.get("vm_id", "")) + str(event.get("log_io", "")))


class SiteTests(SynchronousTestCase):
    """
    The site's request: server software and bodies.
    """

    def setUp(self) -> None:
        self.site = ConsoleSite(Harness().api.resource(), reactor=Clock())

    def test_no_server_header(self) -> None:
        """When the site answers, no Server header names twisted.web or its version."""
        transport = exchange(self.site, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head = transport.value().split(b"\r\n\r\n")[0].lower()
        self.assertTrue(head.startswith(b"http/1.1 200 "), head)
        self.assertNotIn(b"server:", head)
        self.assertNotIn(b"twisted", head)

    def test_declared_body_refused(self) -> None:
        """When a request declares a body its route does not take, it is answered 413 and the connection closed, before the body comes."""
        transport = exchange(self.site, b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
        answer = transport.value()
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)
        self.assertEqual(json.loads(answer.split(b"\r\n\r\n", 1)[1])["code"], "BAD_REQUEST")
        self.assertTrue(transport.disconnecting)

    def test_expect_continue_not_sent(self) -> None:
        """When a refused request asked for 100-continue, no 100 Continue follows the 413."""
        transport = exchange(self.site, b"PUT /healthz HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                                        b"Content-Length: 9999999\r\n\r\n")  # fmt: skip
        self.assertNotIn(b"100 Continue", transport.value())
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "))

    def test_chunked_body_refused(self) -> None:
        """When a chunked body grows past what its route takes, the request is answered 413 and not routed."""
        transport = exchange(self.site, b"POST /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                        b"3\r\nabc\r\n0\r\n\r\n")  # fmt: skip
        answer = transport.value()
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)
        self.assertNotIn(b"405", answer)

    def test_empty_body_routed(self) -> None:
        """When a request carries an empty body, it is routed as usual."""
        transport = exchange(self.site, b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 405 "), transport.value())

    def test_redirect_not_reflecting_host(self) -> None:
        """When /console//x is asked for with a forged Host, the redirect's Location is a path without that host."""
        transport = exchange(self.site, b"GET /console//x HTTP/1.1\r\nHost: evil.example\r\n\r\n")
        head = transport.value().split(b"\r\n\r\n")[0]
        self.assertTrue(head.startswith(b"HTTP/1.1 308 "), head)
        self.assertIn(b"\r\nLocation: /console/x\r\n", head)
        self.assertNotIn(b"evil", head)

    def test_body_limits(self) -> None:
        """When the limit of a route is asked for, shares take 4 KB by POST and everything else none."""
        self.assertEqual(body_limit(b"POST", SHARES), 4096)
        self.assertEqual(body_limit(b"POST", SHARES + b"?x=1"), 4096)
        self.assertEqual(body_limit(b"GET", SHARES), 0)
        self.assertEqual(body_limit(b"POST", b"/healthz"), 0)

    def test_shares_body_within_limit(self) -> None:
        """When a shares request carries at most 4 KB, the body is read (and routed)."""
        body = b"x" * 4096
        transport = exchange(self.site, b"POST " + SHARES + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 4096\r\n\r\n" + body)
        self.assertFalse(transport.value().startswith(b"HTTP/1.1 413 "), transport.value())


class LogEscapeTests(SynchronousTestCase):
    """
    Nothing a client sends starts a new access-log line.
    """

    def test_escape_controls(self) -> None:
        """When a log line holds CR, LF or other control characters, they are written as \\xNN."""
        self.assertEqual(escape_controls('GET /a\r\nforged" 200'), 'GET /a\\x0d\\x0aforged" 200')
        self.assertEqual(escape_controls("plain"), "plain")

    def test_access_line_one_line(self) -> None:
        """When a request's headers carry control characters, its access-log line is still one line."""
        events: List[Any] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        site = ConsoleSite(Harness().api.resource(), reactor=Clock())
        site.startFactory()
        self.addCleanup(site.stopFactory)
        exchange(site, b"GET /healthz HTTP/1.1\r\nHost: x\r\nUser-Agent: a\x0bb\x1b[31m\r\n\r\n")
        lines = [e["log_io"] for e in events if e.get("log_namespace") == "vaporproxy.access"]
        self.assertEqual(len(lines), 1)
        self.assertNotIn("\x1b", lines[0])
        self.assertIn("\\x1b", lines[0])
