"""
Tests for L{vaporproxy.http.guard}: deadlines and caps for connections that
are not (yet) open consoles, in memory with a L{Clock}.
"""

from __future__ import annotations

from typing import Any, List

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from vaporproxy.http.guard import GuardFactory

TIMEOUT = 10.0
CLIENT_A = "192.0.2.1"
CLIENT_B = "192.0.2.2"


class Server(Protocol):
    """
    A server protocol the test makes answer.
    """

    def dataReceived(self, data: bytes) -> None:
        self.received = getattr(self, "received", b"") + data


class SocketTransport(StringTransport):
    """
    A transport that, like Twisted's sockets, holds its protocol in
    C{protocol} (where the guard can put another in its place).
    """

    protocol: Any = None


class Connection:
    """
    One client connection through the guard.
    """

    def __init__(self, guard: GuardFactory, host: str, transport_class: type = StringTransport):
        addr = IPv4Address("TCP", host, 40000)
        self.transport = transport_class(peerAddress=addr)
        self.protocol = guard.buildProtocol(addr)
        if hasattr(self.transport, "protocol"):
            self.transport.protocol = self.protocol
        self.protocol.makeConnection(self.transport)

    @property
    def server(self) -> Server:
        return self.protocol.wrappedProtocol

    @property
    def aborted(self) -> bool:
        return bool(self.transport.disconnecting)


class GuardTests(SynchronousTestCase):
    """
    The guard of pending connections.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.guard = GuardFactory(Factory.forProtocol(Server), self.clock, request_timeout=TIMEOUT,
                                  max_pending=4, max_pending_per_client=2)  # fmt: skip

    def connect(self, host: str = CLIENT_A, first: bytes = b"G") -> Connection:
        connection = Connection(self.guard, host)
        if first:
            connection.protocol.dataReceived(first)
        return connection

    def test_slow_headers_deadline(self) -> None:
        """When a client trickles its request one byte at a time, it is closed at the request deadline all the same."""
        connection = self.connect()
        for _ in range(9):
            self.clock.advance(1)
            connection.protocol.dataReceived(b"E")
        self.assertFalse(connection.aborted)
        self.clock.advance(1)
        self.assertTrue(connection.aborted)
        self.assertEqual(self.guard.pending_count(), 0)

    def test_answered_then_next_request(self) -> None:
        """When the server answers, the deadline stops; the next request on the connection gets a fresh one."""
        connection = self.connect()
        connection.server.transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        self.clock.advance(TIMEOUT * 3)
        self.assertFalse(connection.aborted)
        connection.protocol.dataReceived(b"GET / HTTP/1.1\r\n")
        self.clock.advance(TIMEOUT)
        self.assertTrue(connection.aborted)

    def test_open_console_not_pending(self) -> None:
        """When the server switches protocols (an open console), the connection has no deadline and no longer counts."""
        connection = self.connect()
        connection.server.transport.writeSequence([b"HTTP/1.1 101 Switching Protocols\r\n", b"\r\n"])
        self.assertEqual(self.guard.pending_count(), 0)
        self.assertEqual(self.guard.pending_count(CLIENT_A), 0)
        self.clock.advance(TIMEOUT * 100)
        self.assertFalse(connection.aborted)

    def test_per_client_cap_sheds_oldest(self) -> None:
        """When one address has max_pending_per_client pending connections, its oldest is shed for a new one; other addresses keep theirs."""
        other = self.connect(CLIENT_B)
        first, second = self.connect(), self.connect()
        third = self.connect()
        self.assertEqual([first.aborted, second.aborted, third.aborted, other.aborted], [True, False, False, False])
        self.assertEqual(self.guard.pending_count(CLIENT_A), 2)
        self.assertEqual(self.guard.shed_count, 1)

    def test_total_cap_sheds_oldest(self) -> None:
        """When max_pending_connections are pending, a new connection sheds the oldest and is served."""
        connections = [self.connect(f"192.0.2.{i}") for i in range(10, 14)]
        fresh = self.connect(CLIENT_B)
        self.assertEqual([c.aborted for c in connections], [True, False, False, False])
        self.assertFalse(fresh.aborted)
        self.assertEqual(self.guard.pending_count(), 4)

    def test_silent_connections_count(self) -> None:
        """When connections never send a byte, they count against the total cap and meet the deadline."""
        silent: List[Connection] = [self.connect(first=b"") for _ in range(5)]
        self.assertEqual([c.aborted for c in silent], [True, False, False, False, False])
        self.clock.advance(TIMEOUT)
        self.assertTrue(all(c.aborted for c in silent))

    def test_closed_connection_forgotten(self) -> None:
        """When a pending connection closes, its slot is given back."""
        connection = self.connect()
        connection.protocol.connectionLost(None)
        self.assertEqual((self.guard.pending_count(), self.guard.pending_count(CLIENT_A)), (0, 0))

    def test_set_limits(self) -> None:
        """When the limits are reloaded, new connections meet the new caps and deadline."""
        self.guard.set_limits(2.0, 1, 0)
        first, second = self.connect(), self.connect(CLIENT_B)
        self.assertEqual((first.aborted, second.aborted), (True, False))
        self.clock.advance(2.0)
        self.assertTrue(second.aborted)


class ProxyHeaderTests(SynchronousTestCase):
    """
    The guard behind a C{haproxy:} endpoint's PROXY-header wrapper.
    """

    def test_client_from_header_and_shed(self) -> None:
        """When connections come through the PROXY-header wrapper, they count against the header's client address and are shed through the wrapper."""
        from twisted.protocols.haproxy._wrapper import HAProxyWrappingFactory

        clock = Clock()
        guard = GuardFactory(Factory.forProtocol(Server), clock, request_timeout=TIMEOUT, max_pending=10,
                             max_pending_per_client=1)  # fmt: skip
        outer = HAProxyWrappingFactory(guard)
        balancer = IPv4Address("TCP", "127.0.0.1", 50000)
        transports = []
        for port in (1, 2):
            transport = StringTransport(peerAddress=balancer)
            protocol = outer.buildProtocol(balancer)
            protocol.makeConnection(transport)
            protocol.dataReceived(b"PROXY TCP4 203.0.113.5 127.0.0.1 %d 8080\r\nGET" % port)
            transports.append(transport)
        self.assertEqual(guard.pending_count("203.0.113.5"), 1)
        self.assertEqual([t.disconnecting for t in transports], [True, False])


class ShedLogTests(SynchronousTestCase):
    """
    Logging under a flood.
    """

    def test_one_line_per_interval(self) -> None:
        """When a flood sheds many connections, at most one warning is logged per LOG_EVERY seconds."""
        from twisted.logger import capturedLogs

        from vaporproxy.http.guard import LOG_EVERY

        clock = Clock()
        guard = GuardFactory(Factory.forProtocol(Server), clock, max_pending=1, max_pending_per_client=0)
        with capturedLogs() as events:
            for _ in range(100):
                Connection(guard, CLIENT_A)
            clock.advance(LOG_EVERY)
            Connection(guard, CLIENT_A)
        lines = [e for e in events if e.get("log_namespace") == "vaporproxy.guard"]
        self.assertEqual((len(lines), guard.shed_count), (2, 100))


class InterimAnswerTests(SynchronousTestCase):
    """
    "100 Continue" is not an answer.
    """

    def test_continue_keeps_deadline(self) -> None:
        """When the server sends 100 Continue, the request deadline still runs (the body is still to come)."""
        clock = Clock()
        guard = GuardFactory(Factory.forProtocol(Server), clock, request_timeout=TIMEOUT)
        connection = Connection(guard, CLIENT_A)
        connection.protocol.dataReceived(b"POST /x HTTP/1.1\r\nExpect: 100-continue\r\n")
        connection.server.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        clock.advance(TIMEOUT)
        self.assertTrue(connection.aborted)


class KeepAliveTests(SynchronousTestCase):
    """
    The next request of a keep-alive connection gets a deadline of its own.
    """

    def test_next_request_before_old_deadline(self) -> None:
        """When the next request starts before the last one's deadline would have passed, its deadline counts from its own start."""
        clock = Clock()
        guard = GuardFactory(Factory.forProtocol(Server), clock, request_timeout=TIMEOUT)
        connection = Connection(guard, CLIENT_A)
        connection.protocol.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        connection.server.transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        clock.advance(TIMEOUT - 1)
        connection.protocol.dataReceived(b"GET / HTTP/1.1\r\n")
        self.assertEqual(guard.timers.pending(), 1)
        clock.advance(TIMEOUT - 0.5)
        self.assertFalse(connection.aborted)
        clock.advance(0.5)
        self.assertTrue(connection.aborted)


class Console(Protocol):
    """
    A console WebSocket protocol as the guard sees it: it says what it
    answers (C{saw}) and when it closes (C{lost}) to the guard that stepped
    aside for it.
    """

    guard: Any = None

    def guarded_by(self, guard: Any) -> None:
        self.guard = guard

    def dataReceived(self, data: bytes) -> None:
        self.received = getattr(self, "received", b"") + data

    def answer(self, data: bytes) -> None:
        self.guard.saw(data)
        self.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.guard.lost()


class StepAsideTests(SynchronousTestCase):
    """
    The port switch hands a console WebSocket the transport under the
    guard; the guard counts it until its 101 all the same.
    """

    def setUp(self) -> None:
        from vaporproxy.ws.switch import SwitchFactory

        self.clock = Clock()
        self.switch = SwitchFactory(Factory.forProtocol(Server), Factory.forProtocol(Console), self.clock)
        self.guard = GuardFactory(self.switch, self.clock, request_timeout=TIMEOUT, max_pending=4,
                                  max_pending_per_client=2)  # fmt: skip

    def open(self, transport_class: type = SocketTransport) -> Connection:
        connection = Connection(self.guard, CLIENT_A, transport_class)
        connection.protocol.dataReceived(b"GET /api/v1/virtualization/virtualmachines/vm/console/ws?token=t HTTP/1.1\r\n")
        return connection

    def test_console_writes_past_the_guard(self) -> None:
        """When a console WebSocket's request line is read, its protocol is on the transport itself, still counted as pending."""
        connection = self.open()
        console = connection.transport.protocol
        self.assertIsInstance(console, Console)
        self.assertIs(console.transport, connection.transport)
        self.assertEqual(console.received, b"GET /api/v1/virtualization/virtualmachines/vm/console/ws?token=t HTTP/1.1\r\n")
        self.assertEqual(self.guard.pending_count(CLIENT_A), 1)

    def test_unknown_transport_keeps_guard(self) -> None:
        """When the transport has no protocol slot the guard knows, the guard stays in the console's path and sees its 101."""
        connection = self.open(StringTransport)
        console = connection.protocol.wrappedProtocol.dataReceived.__self__
        self.assertIs(console.transport, connection.protocol)
        self.assertIsNone(console.guard)
        console.transport.write(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
        self.assertEqual(self.guard.pending_count(), 0)

    def test_101_ends_pending(self) -> None:
        """When the console answers 101, the connection no longer counts and has no deadline."""
        connection = self.open()
        console = connection.transport.protocol
        console.answer(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
        self.assertEqual((self.guard.pending_count(), self.guard.pending_count(CLIENT_A)), (0, 0))
        self.assertEqual(self.guard.protocols, {})
        self.clock.advance(TIMEOUT * 10)
        self.assertFalse(connection.aborted)

    def test_deadline_without_answer(self) -> None:
        """When the console does not answer by the request deadline, the connection is aborted."""
        connection = self.open()
        self.clock.advance(TIMEOUT)
        self.assertTrue(connection.aborted)

    def test_refusal_stops_deadline_keeps_slot(self) -> None:
        """When the console refuses (a 4xx answer), the deadline stops but the connection still counts until it closes."""
        connection = self.open()
        console = connection.transport.protocol
        console.answer(b"HTTP/1.1 403 Forbidden\r\n\r\n")
        self.clock.advance(TIMEOUT * 2)
        self.assertFalse(connection.aborted)
        self.assertEqual(self.guard.pending_count(CLIENT_A), 1)
        console.connectionLost()
        self.assertEqual((self.guard.pending_count(), self.guard.protocols), (0, {}))

    def test_cap_sheds_oldest_console(self) -> None:
        """When a client's pending consoles reach its cap, the oldest is aborted through the transport under the guard."""
        first, second, third = self.open(), self.open(), self.open()
        self.assertEqual([c.aborted for c in (first, second, third)], [True, False, False])

    def test_protocol_without_guarded_by(self) -> None:
        """When the WebSocket protocol cannot talk to the guard, the guard stays in its path and sees its answers."""
        self.switch.ws_factory = Factory.forProtocol(Server)
        connection = self.open()
        server = connection.transport.protocol.wrappedProtocol.dataReceived.__self__
        self.assertIs(server.transport, connection.protocol)
        server.transport.write(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
        self.assertEqual(self.guard.pending_count(), 0)
