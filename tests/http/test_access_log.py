"""
Tests for the access log's line (L{vaporproxy.http.site.redacting_log_formatter}):
whichever way it is built, it is Twisted's combined log format line, tokens
redacted and control characters escaped.
"""

from __future__ import annotations

from typing import Any, List, Optional

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import combinedLogFormatter
from twisted.web.test.requesthelper import DummyRequest

from vaporproxy.http.site import escape_controls, redact_uri, redacting_log_formatter

STAMP = "[01/Jan/2024:00:00:00 +0000]"
TOKEN = "ab" * 32


def request(uri: bytes = b"/api/v1/virtualization/virtualmachines/web-1/console", *, client: Any = None,
            method: Any = b"GET", protocol: Any = b"HTTP/1.1", code: int = 200, length: Optional[int] = 297,
            referrer: Optional[bytes] = None, agent: Optional[bytes] = None) -> DummyRequest:  # fmt: skip
    r = DummyRequest([b""])
    r.uri, r.method, r.clientproto, r.code, r.sentLength = uri, method, protocol, code, length
    r.client = IPv4Address("TCP", "192.0.2.9", 40000) if client is None else client
    if referrer is not None:
        r.requestHeaders.setRawHeaders(b"referer", [referrer])
    if agent is not None:
        r.requestHeaders.setRawHeaders(b"user-agent", [agent])
    return r


def reference(r: DummyRequest) -> str:
    """Twisted's own line for C{r}, its URI redacted, controls escaped."""
    r.uri = redact_uri(r.uri)
    return escape_controls(combinedLogFormatter(STAMP, r))


def requests() -> List[DummyRequest]:
    """Plain ones, and ones with something to escape in every field."""
    return [
        request(),
        request(length=None, code=404),
        request(b"/healthz", client=IPv6Address("TCP", "2001:db8::1", 40000), agent=b"curl/8.0"),
        request(b"/x?token=" + TOKEN.encode() + b"&a=1", referrer=b"https://example.test/p?q=1"),
        request(client=UNIXAddress(None)),
        request(client=IPv4Address("TCP", "10.0.0.1\n", 1)),
        request(agent=b'Mozilla "quoted" \\ back\'slash'),
        request(agent=b"caf\xc3\xa9"),
        request(agent=b"line\r\nbreak\x7f"),
        request(b"/a%22b\"c"),
        request(b"/ok", referrer=b"\x00"),
        request(method=b"G\tET"),
        request(protocol=b"HTTP/1.1\x1b"),
    ]


class AccessLineTests(SynchronousTestCase):
    def test_sameAsTwisted(self) -> None:
        """
        For plain requests and for requests with quotes, backslashes,
        non-ASCII and control characters in any field, from IPv4, IPv6 and
        other addresses, the line is Twisted's (tokens redacted, controls
        escaped).
        """
        lines = [redacting_log_formatter(STAMP, r) for r in requests()]
        self.assertEqual(lines, [reference(r) for r in requests()])
        self.assertEqual(
            lines[0],
            '"192.0.2.9" - - [01/Jan/2024:00:00:00 +0000] '
            '"GET /api/v1/virtualization/virtualmachines/web-1/console HTTP/1.1" 200 297 "-" "-"',
        )

    def test_tokenNeverWritten(self) -> None:
        """When the query holds a token, the line has it redacted (plain and escaped ways alike)."""
        for agent in (None, b'"quoted"'):
            line = redacting_log_formatter(STAMP, request(b"/ws?TOKEN=" + TOKEN.encode(), agent=agent))
            self.assertNotIn(TOKEN, line)
            self.assertIn("/ws?TOKEN=<redacted> HTTP/1.1", line)

    def test_noLineBreak(self) -> None:
        """Whatever the client sends, the line is one line of printable text."""
        for r in requests():
            line = redacting_log_formatter(STAMP, r)
            self.assertTrue(line.isprintable(), line)
