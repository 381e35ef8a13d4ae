"""
Tests for L{vaporproxy.ws.switch}: the listening port's protocol switch.

The decision and the hand-over are tested with recording factories; the
equivalence of the two ways a console WebSocket can arrive (straight from
the switch to the bridge, or through twisted.web's upgrade route) is tested
by running the same consoles through both, in memory, over the real
L{ConsoleBridgeFactory}, L{ConsoleAPI} and L{ConsoleSite}.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Callable, Dict, List, Optional

from twisted.internet.address import IPv4Address
from twisted.internet.defer import fail
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions, PrivateCertificate
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from vaporproxy.config import ServerConfig
from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.ws.switch import CONSOLE_WS_REQUEST_LINE, SwitchFactory
from vaporproxy.http.api import ConsoleAPI
from vaporproxy.http.site import ConsoleSite
from tests.ws.test_bridge import PEER, VM, VM2_UUID, VM_UUID, Connection, Harness, PassthroughGuard

WS_PATH = b"/api/v1/virtualization/virtualmachines/web1/console/ws"
WS_LINE = b"GET " + WS_PATH + b"?token=abc HTTP/1.1\r\n"


class Recorder(Protocol):
    """
    A protocol that remembers what it was given.
    """

    def __init__(self, name: str, log: List[Any]):
        self.name = name
        self.log = log

    def connectionMade(self) -> None:
        self.log.append((self.name, "made", self.transport))

    def dataReceived(self, data: bytes) -> None:
        self.log.append((self.name, "data", data))

    def connectionLost(self, reason: Any = None) -> None:
        self.log.append((self.name, "lost"))


class RecordingFactory(Factory):
    """
    Builds L{Recorder}s (or nothing, when C{refuse} is set) and counts
    starts and stops.
    """

    noisy = False

    def __init__(self, name: str, log: List[Any], refuse: bool = False):
        self.name = name
        self.log = log
        self.refuse = refuse
        self.addresses: List[Any] = []
        self.started = 0

    def buildProtocol(self, addr: Any) -> Optional[Recorder]:
        self.addresses.append(addr)
        return None if self.refuse else Recorder(self.name, self.log)

    def startFactory(self) -> None:
        self.started += 1

    def stopFactory(self) -> None:
        self.started -= 1

    def logPrefix(self) -> str:
        return "ConsoleSite"


class SocketLikeTransport(StringTransport):
    """
    A transport that, like Twisted's sockets, holds its protocol in
    C{protocol}.
    """

    protocol: Any = None


class SwitchDecisionTests(SynchronousTestCase):
    """
    Which protocol gets a connection, and how it is handed over.
    """

    def setUp(self) -> None:
        self.log: List[Any] = []
        self.clock = MemoryReactorClock()
        self.http = RecordingFactory("http", self.log)
        self.ws = RecordingFactory("ws", self.log)
        self.factory = SwitchFactory(self.http, self.ws, self.clock, max_line=256, timeout=5.0)

    def connect(self) -> Any:
        switch = self.factory.buildProtocol(PEER)
        transport = SocketLikeTransport()
        transport.protocol = switch
        switch.makeConnection(transport)
        return switch, transport

    def received(self) -> List[Any]:
        return [entry for entry in self.log if entry[1] == "data"]

    def test_consoleUpgradeToWebSocket(self) -> None:
        """
        When the first line is a GET of a console WebSocket path, the
        WebSocket factory's protocol gets the connection and every byte,
        and takes the switch's place on the transport.
        """
        switch, transport = self.connect()
        request = WS_LINE + b"Host: x\r\nUpgrade: websocket\r\n\r\n"
        switch.dataReceived(request)
        self.assertEqual(self.log[0][:2], ("ws", "made"))
        self.assertIs(self.log[0][2], transport)
        self.assertEqual(self.received(), [("ws", "data", request)])
        self.assertEqual(self.ws.addresses, [PEER])
        self.assertEqual(transport.protocol.name, "ws")
        self.assertEqual(self.factory.timers.pending(), 0)

    def test_otherRequestsToHTTP(self) -> None:
        """
        When the first line is anything else (another path, another method,
        HTTP/1.0, a percent-escaped or deeper path, an absolute URI), the
        HTTP factory's protocol gets the connection with the bytes replayed.
        """
        lines = [
            b"GET /api/v1/virtualization/virtualmachines/web1/console HTTP/1.1\r\n",
            b"POST " + WS_PATH + b" HTTP/1.1\r\n",
            b"GET " + WS_PATH + b" HTTP/1.0\r\n",
            b"GET /api/v1/virtualization/virtualmachines/web%201/console/ws HTTP/1.1\r\n",
            b"GET " + WS_PATH + b"/more HTTP/1.1\r\n",
            b"GET " + WS_PATH + b"#frag HTTP/1.1\r\n",
            b"GET http://x" + WS_PATH + b" HTTP/1.1\r\n",
            b"GET /api/v1/virtualization/virtualmachines/a/b/console/ws HTTP/1.1\r\n",
            b"\r\n",
        ]
        for line in lines:
            del self.log[:]
            switch, transport = self.connect()
            switch.dataReceived(line + b"Host: x\r\n\r\n")
            self.assertEqual(self.received(), [("http", "data", line + b"Host: x\r\n\r\n")], line)
            self.assertEqual(transport.protocol.name, "http")
        self.assertEqual(self.ws.addresses, [])

    def test_lineAcrossReads(self) -> None:
        """
        When the first line arrives in pieces, it is buffered until its end
        and the chosen protocol gets all of it at once.
        """
        switch, transport = self.connect()
        switch.dataReceived(WS_LINE[:5])
        switch.dataReceived(WS_LINE[5:30])
        self.assertEqual(self.log, [])
        switch.dataReceived(WS_LINE[30:] + b"Host: x\r\n")
        self.assertEqual(self.received(), [("ws", "data", WS_LINE + b"Host: x\r\n")])
        switch.dataReceived(b"\r\n")
        self.assertEqual(self.received()[-1], ("ws", "data", b"\r\n"))

    def test_tooLongToHTTP(self) -> None:
        """
        When no line end comes within C{max_line} bytes, twisted.web gets
        the bytes (and answers as it does to an over-long line).
        """
        switch, transport = self.connect()
        switch.dataReceived(b"GET /" + b"a" * 200)
        self.assertEqual(self.log, [])
        switch.dataReceived(b"a" * 100)
        self.assertEqual(self.received(), [("http", "data", b"GET /" + b"a" * 300)])

    def test_slowClientToHTTP(self) -> None:
        """
        When the first line is not complete within the timeout, twisted.web
        gets the connection with what was read, and its own timeouts apply
        from then on.
        """
        switch, transport = self.connect()
        switch.dataReceived(b"GET /heal")
        self.clock.advance(4.9)
        self.assertEqual(self.log, [])
        self.clock.advance(0.1)
        self.assertEqual(self.log[0][:2], ("http", "made"))
        self.assertEqual(self.received(), [("http", "data", b"GET /heal")])
        switch.dataReceived(b"thz HTTP/1.1\r\n")
        self.assertEqual(self.received()[-1], ("http", "data", b"thz HTTP/1.1\r\n"))

    def test_silentClientToHTTP(self) -> None:
        """
        When a client sends nothing within the timeout, twisted.web gets the
        connection (no bytes to replay).
        """
        switch, transport = self.connect()
        self.clock.advance(5.0)
        self.assertEqual(self.log, [("http", "made", transport)])

    def test_lostBeforeDeciding(self) -> None:
        """
        When the connection ends before a line was read, the timer is
        cancelled and no protocol is built.
        """
        switch, transport = self.connect()
        switch.dataReceived(b"GET")
        switch.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.factory.timers.pending(), 0)
        self.assertEqual(self.log, [])

    def test_lostAfterDecidingForwarded(self) -> None:
        """
        When something still holds the switch after the hand-over, its
        events reach the chosen protocol.
        """
        switch, transport = self.connect()
        switch.dataReceived(WS_LINE)
        switch.dataReceived(b"more")
        switch.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.log[-2:], [("ws", "data", b"more"), ("ws", "lost")])

    def test_refusedProtocol(self) -> None:
        """
        When the chosen factory builds no protocol, the connection is closed.
        """
        self.ws.refuse = True
        switch, transport = self.connect()
        switch.dataReceived(WS_LINE)
        self.assertTrue(transport.disconnecting)

    def test_wrapperTransport(self) -> None:
        """
        When the switch sits inside a protocol wrapper (TLS, the PROXY
        header), the chosen protocol replaces it in the wrapper.
        """
        wrapping = WrappingFactory(self.factory)
        wrapper = wrapping.buildProtocol(PEER)
        wrapper.makeConnection(StringTransport())
        self.assertIsInstance(wrapper, ProtocolWrapper)
        wrapper.dataReceived(WS_LINE)
        self.assertEqual(wrapper.wrappedProtocol.name, "ws")
        wrapper.dataReceived(b"next")
        self.assertEqual(self.received()[-1], ("ws", "data", b"next"))

    def test_startStopAndLogPrefix(self) -> None:
        """
        When the port starts and stops the switch, the HTTP factory is
        started and stopped with it, and the port logs under its name.
        """
        self.factory.doStart()
        self.assertEqual(self.http.started, 1)
        self.assertEqual(self.factory.logPrefix(), "ConsoleSite")
        self.factory.doStop()
        self.assertEqual(self.http.started, 0)

    def test_requestLinePattern(self) -> None:
        """
        When a console WebSocket request line carries a query, it matches;
        a bare path matches too.
        """
        self.assertIsNotNone(CONSOLE_WS_REQUEST_LINE.match(b"GET " + WS_PATH + b" HTTP/1.1\n"))
        self.assertIsNotNone(CONSOLE_WS_REQUEST_LINE.match(b"GET " + WS_PATH + b"?token=a&b=c HTTP/1.1\r\n"))
        self.assertIsNone(CONSOLE_WS_REQUEST_LINE.match(b"GET " + WS_PATH + b"?token=a b HTTP/1.1\r\n"))


# ---------------------------------------------------------------------------
# Equivalence of the two routes, over the real bridge, API and site
# ---------------------------------------------------------------------------


class RoutedHarness(Harness):
    """
    The bridge harness, opening WebSockets through the listening switch
    (C{"switch"}) or through twisted.web's upgrade route (C{"site"}).
    """

    def __init__(self, route: str, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.route = route
        self.api = ConsoleAPI(
            config=self.config,
            token_store=self.tokens,
            locator=self.locator,
            limiter=self.limiter,
            host_policy=self.hosts,
            registry=self.registry,
            bridge_factory=self.factory,
            metrics=None,
            reactor=self.reactor,
            static_dirs={},
        )
        self.site = ConsoleSite(self.api.resource(), reactor=self.reactor)
        self.site.access_log = False
        self.http_channels = 0
        build_channel = self.site.buildProtocol

        def count_channel(addr: Any) -> Any:
            self.http_channels += 1
            return build_channel(addr)

        self.site.buildProtocol = count_channel  # type: ignore[method-assign]
        self.switch = SwitchFactory(self.site, self.factory, self.reactor)
        self.listening = {"switch": self.switch, "site": self.site}[route]

    def open(self, *args: Any, **kwargs: Any) -> Connection:
        listening = self.listening
        factory = self.factory

        def build(addr: Any) -> Any:
            # Harness.open builds the server side with the bridge factory:
            # build it with the listening factory instead (which may ask
            # the bridge factory in turn).
            del factory.buildProtocol
            return listening.buildProtocol(addr)

        factory.buildProtocol = build  # type: ignore[method-assign]
        try:
            conn = super().open(*args, **kwargs)
        finally:
            factory.__dict__.pop("buildProtocol", None)
        for _ in range(3):
            conn.pump.flush()
        return conn


def observe(h: RoutedHarness, conn: Connection, **extra: Any) -> Dict[str, Any]:
    """
    What a console's client and the operator see of it.
    """
    texts = [json.loads(p) for p, binary in conn.messages if not binary]
    return dict(
        opened=conn.cf.opened,
        subprotocol=conn.cf.subprotocol,
        closed=conn.closed,
        binary=[p for p, binary in conn.messages if binary],
        texts=texts,
        handshake_refused=(conn.client.wasNotCleanReason or "") if not conn.cf.opened else None,
        outcomes=[(o.error, o.vm_uuid, o.user) for o in h.observer.outcomes],
        live=h.limiter.live(),
        consoles=len(h.registry.consoles()),
        **extra,
    )


def success(h: RoutedHarness) -> Dict[str, Any]:
    conn = h.open(h.token(), protocols=["binary"])
    backend = conn.connect_backend()
    conn.send(b"client bytes")
    conn.from_vm(b"vm bytes")
    return observe(h, conn, to_vm=backend.value(), target=conn.target)


def no_subprotocol(h: RoutedHarness) -> Dict[str, Any]:
    conn = h.open(h.token(), protocols=["other"])
    return observe(h, conn)


def missing_token(h: RoutedHarness) -> Dict[str, Any]:
    return observe(h, h.open(None))


def invalid_token(h: RoutedHarness) -> Dict[str, Any]:
    return observe(h, h.open("ab" * 32))


def token_for_other_vm(h: RoutedHarness) -> Dict[str, Any]:
    return observe(h, h.open(h.token(), vm_ref=VM2_UUID))


def token_expired(h: RoutedHarness) -> Dict[str, Any]:
    token = h.token()
    h.reactor.advance(301)
    return observe(h, h.open(token))


def token_used(h: RoutedHarness) -> Dict[str, Any]:
    token = h.token()
    h.open(token).connect_backend()
    return observe(h, h.open(token))


def vm_not_found(h: RoutedHarness) -> Dict[str, Any]:
    token = h.token()
    h.locator.remove(VM_UUID)
    return observe(h, h.open(token))


def no_console(h: RoutedHarness) -> Dict[str, Any]:
    token = h.token()
    h.locator.add(replace(VM, running=False))
    return observe(h, h.open(token))


def backend_refused(h: RoutedHarness) -> Dict[str, Any]:
    conn = h.open(h.token())
    h.reactor.tcpClients[0][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    conn.pump.flush()
    return observe(h, conn)


def connection_timeout(h: RoutedHarness) -> Dict[str, Any]:
    conn = h.open(h.token())
    h.reactor.advance(10.1)
    conn.pump.flush()
    return observe(h, conn)


def max_connections(h: RoutedHarness) -> Dict[str, Any]:
    h.limiter.inner.set_limits(1, 100)
    h.open(h.token()).connect_backend()
    return observe(h, h.open(h.token()))


def host_not_allowed(h: RoutedHarness) -> Dict[str, Any]:
    return observe(h, h.open(h.token(vm_uuid=VM2_UUID), vm_ref=VM2_UUID))


def hypervisor_down(h: RoutedHarness) -> Dict[str, Any]:
    token = h.token()
    h.locator.broken = "down"
    return observe(h, h.open(token))


def store_unavailable(h: RoutedHarness) -> Dict[str, Any]:
    token = h.token()
    h.tokens.redeem = lambda *a: fail(ConsoleError(ErrorCode.SERVICE_UNAVAILABLE))  # type: ignore[method-assign]
    return observe(h, h.open(token))


def terminated(h: RoutedHarness) -> Dict[str, Any]:
    conn = h.open(h.token())
    conn.connect_backend()
    h.registry.terminate_vm(VM_UUID)
    conn.pump.flush()
    return observe(h, conn)


def idle(h: RoutedHarness) -> Dict[str, Any]:
    conn = h.open(h.token())
    conn.connect_backend()
    h.reactor.advance(61)
    conn.pump.flush()
    return observe(h, conn)


def text_message(h: RoutedHarness) -> Dict[str, Any]:
    conn = h.open(h.token())
    conn.connect_backend()
    conn.send(b"hello", binary=False)
    return observe(h, conn)


def shutdown(h: RoutedHarness) -> Dict[str, Any]:
    conn = h.open(h.token())
    conn.connect_backend()
    h.registry.close_all()
    conn.pump.flush()
    return observe(h, conn)


def vm_closes(h: RoutedHarness) -> Dict[str, Any]:
    conn = h.open(h.token())
    conn.connect_backend()
    conn.vm_closes()
    return observe(h, conn)


def foreign_origin(h: RoutedHarness) -> Dict[str, Any]:
    token = h.token()
    conn = h.open(token, origin="http://evil.test")
    unused = [not entry.used for entry in h.tokens._entries.values()]
    return observe(h, conn, token_unused=unused)


def forwarded_client(h: RoutedHarness) -> Dict[str, Any]:
    h.factory.reload(replace(h.config, server=ServerConfig(trusted_proxies=("198.51.100.0/24",))))
    good = h.open(h.token(client_ip="203.0.113.9"), headers={"X-Forwarded-For": "203.0.113.9"})
    bad = h.open(h.token(client_ip="203.0.113.9"), headers={"X-Forwarded-For": "203.0.113.10"})
    return observe(h, bad, good_closed=good.closed, dialled=len(h.reactor.tcpClients))


def _require_tls(h: RoutedHarness, **server: Any) -> None:
    config = replace(h.config, console=replace(h.config.console, enable_tls=True))
    if server:
        config = replace(config, server=ServerConfig(**server))
    h.factory.reload(config)


def tls_required_plain(h: RoutedHarness) -> Dict[str, Any]:
    _require_tls(h)
    conn = h.open(h.token())
    unused = [not entry.used for entry in h.tokens._entries.values()]
    return observe(h, conn, token_unused=unused, dialled=len(h.reactor.tcpClients))


def tls_required_secure(h: RoutedHarness) -> Dict[str, Any]:
    _require_tls(h)
    conn = h.open(h.token(), secure=True)
    conn.connect_backend()
    return observe(h, conn)


def tls_required_trusted_proxy(h: RoutedHarness) -> Dict[str, Any]:
    _require_tls(h, trusted_proxies=("198.51.100.0/24",))
    conn = h.open(h.token(), headers={"X-Forwarded-Proto": "https"})
    conn.connect_backend()
    return observe(h, conn)


def tls_required_untrusted_proxy(h: RoutedHarness) -> Dict[str, Any]:
    _require_tls(h)
    conn = h.open(h.token(), headers={"X-Forwarded-Proto": "https"})
    return observe(h, conn, dialled=len(h.reactor.tcpClients))


SCENARIOS: Dict[str, Callable[[RoutedHarness], Dict[str, Any]]] = {
    "success": success,
    "no_subprotocol": no_subprotocol,
    "missing_token": missing_token,
    "invalid_token": invalid_token,
    "token_for_other_vm": token_for_other_vm,
    "token_expired": token_expired,
    "token_used": token_used,
    "vm_not_found": vm_not_found,
    "no_console": no_console,
    "backend_refused": backend_refused,
    "connection_timeout": connection_timeout,
    "max_connections": max_connections,
    "host_not_allowed": host_not_allowed,
    "hypervisor_down": hypervisor_down,
    "terminated": terminated,
    "idle": idle,
    "text_message": text_message,
    "store_unavailable": store_unavailable,
    "shutdown": shutdown,
    "vm_closes": vm_closes,
    "foreign_origin": foreign_origin,
    "forwarded_client": forwarded_client,
    "tls_required_plain": tls_required_plain,
    "tls_required_secure": tls_required_secure,
    "tls_required_trusted_proxy": tls_required_trusted_proxy,
    "tls_required_untrusted_proxy": tls_required_untrusted_proxy,
}

#: What each scenario must show (the close code, or the handshake refusal).
EXPECTED_CLOSE = {
    "success": None,
    "no_subprotocol": None,
    "missing_token": (4001, "INVALID_TOKEN"),
    "invalid_token": (4001, "INVALID_TOKEN"),
    "token_for_other_vm": (4001, "INVALID_TOKEN"),
    "token_expired": (4002, "TOKEN_EXPIRED"),
    "token_used": (4003, "TOKEN_ALREADY_USED"),
    "vm_not_found": (4004, "VM_NOT_FOUND"),
    "no_console": (4005, "NO_CONSOLE_AVAILABLE"),
    "backend_refused": (4006, "CONNECTION_FAILED"),
    "connection_timeout": (4006, "CONNECTION_FAILED"),
    "max_connections": (4007, "MAX_CONNECTIONS_REACHED"),
    "host_not_allowed": (4008, "UNAUTHORIZED"),
    "hypervisor_down": (4009, "INTERNAL_ERROR"),
    "terminated": (4010, "SESSION_TERMINATED"),
    "idle": (4011, "IDLE_TIMEOUT"),
    "text_message": (4012, "BAD_REQUEST"),
    "store_unavailable": (4013, "SERVICE_UNAVAILABLE"),
    "vm_closes": (1000, None),
    "forwarded_client": (4001, "INVALID_TOKEN"),
    "tls_required_plain": (4008, "UNAUTHORIZED"),
    "tls_required_secure": None,
    "tls_required_trusted_proxy": None,
    "tls_required_untrusted_proxy": (4008, "UNAUTHORIZED"),
}


class RouteEquivalenceTests(SynchronousTestCase):
    """
    The same console WebSocket requests, straight from the switch and
    through twisted.web's upgrade route, give the same results.
    """

    def setUp(self) -> None:
        PassthroughGuard.instances = []

    def run_both(self, name: str, **harness: Any) -> Dict[str, Any]:
        results, channels = {}, {}
        for route in ("switch", "site"):
            h = RoutedHarness(route, **harness)
            results[route] = SCENARIOS[name](h)
            channels[route] = h.http_channels
        self.assertEqual(results["switch"], results["site"], name)
        # The switch handed every upgrade straight to the bridge.
        self.assertEqual(channels["switch"], 0, name)
        self.assertGreater(channels["site"], 0, name)
        return results["switch"]

    def test_everyScenarioSameThroughBothRoutes(self) -> None:
        """
        When each console scenario (success, every error close code, the
        shutdown and VM-closed ends, a refused origin, a forwarded client)
        runs through the switch and through twisted.web, the client, the
        limiter, the registry and the observer see the same things.
        """
        for name in SCENARIOS:
            result = self.run_both(name)
            if name not in EXPECTED_CLOSE:
                continue
            expected, closed = EXPECTED_CLOSE[name], result["closed"]
            if expected is None or expected[1] is not None:
                self.assertEqual(closed, expected, name)
            else:
                self.assertEqual(closed[0], expected[0], name)

    def test_successDetails(self) -> None:
        """
        When a console opens with the binary subprotocol offered, it is
        echoed and bytes flow both ways through either route.
        """
        result = self.run_both("success")
        self.assertTrue(result["opened"])
        self.assertEqual(result["subprotocol"], "binary")
        self.assertEqual(result["binary"], [b"vm bytes"])
        self.assertEqual(result["to_vm"], b"client bytes")
        self.assertEqual(result["target"], ("127.0.0.1", 5901))
        self.assertEqual(result["consoles"], 1)
        self.assertIsNone(self.run_both("no_subprotocol")["subprotocol"])

    def test_errorBodies(self) -> None:
        """
        When a console fails, the JSON error message comes before the close
        through either route.
        """
        result = self.run_both("vm_not_found")
        self.assertEqual([t["code"] for t in result["texts"]], ["VM_NOT_FOUND"])
        self.assertEqual(result["outcomes"], [("VM_NOT_FOUND", VM_UUID, "alice")])

    def test_shutdownGoingAway(self) -> None:
        """
        When the proxy shuts down, the console closes with 1001 through
        either route.
        """
        self.assertEqual(self.run_both("shutdown")["closed"][0], 1001)

    def test_tlsRequired(self) -> None:
        """
        When console.enable_tls is on, a console WebSocket in clear (or
        whose untrusted peer claims X-Forwarded-Proto: https) opens, is
        told UNAUTHORIZED "console connections require TLS" (4008), its
        token stays unused and nothing is dialled; over TLS, or from a
        trusted proxy saying https, it relays; through either route.
        """
        plain = self.run_both("tls_required_plain")
        self.assertTrue(plain["opened"])
        self.assertEqual(plain["closed"], (4008, "UNAUTHORIZED"))
        self.assertEqual(
            [(t["code"], t["error"]) for t in plain["texts"]],
            [("UNAUTHORIZED", "console connections require TLS")],
        )
        self.assertEqual(plain["token_unused"], [True])
        self.assertEqual(plain["dialled"], 0)
        self.assertEqual(plain["outcomes"], [("UNAUTHORIZED", None, None)])
        untrusted = self.run_both("tls_required_untrusted_proxy")
        self.assertEqual(untrusted["closed"], (4008, "UNAUTHORIZED"))
        self.assertEqual(untrusted["dialled"], 0)
        for name in ("tls_required_secure", "tls_required_trusted_proxy"):
            result = self.run_both(name)
            self.assertIsNone(result["closed"], name)
            self.assertEqual(result["consoles"], 1, name)
            self.assertEqual(result["outcomes"], [], name)

    def test_originRefused403(self) -> None:
        """
        When the origin is foreign, the handshake is refused with 403 and
        the token stays unused, through either route.
        """
        result = self.run_both("foreign_origin")
        self.assertFalse(result["opened"])
        self.assertIn("403", result["handshake_refused"])
        self.assertEqual(result["token_unused"], [True])
        self.assertEqual(result["outcomes"], [("UNAUTHORIZED", None, None)])

    def test_forwardedClient(self) -> None:
        """
        When a trusted proxy forwards the client's address, a token bound to
        it works and one bound to another address does not, through either
        route.
        """
        result = self.run_both("forwarded_client")
        self.assertIsNone(result["good_closed"])
        self.assertEqual(result["dialled"], 1)


class SwitchRouteTests(SynchronousTestCase):
    """
    Connections through the switch that are not plain console upgrades.
    """

    def test_keepAliveUpgradeLater(self) -> None:
        """
        When a connection first carries an ordinary request, twisted.web
        keeps it, and a console upgrade later on the same connection still
        opens through twisted.web's route.
        """
        h = RoutedHarness("switch")
        server = h.switch.buildProtocol(PEER)
        transport = iosim.FakeTransport(server, isServer=True, peerAddress=PEER)
        server.makeConnection(transport)
        server.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: proxy.test\r\n\r\n")
        answer = b"".join(transport.stream)
        self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer[:80])
        self.assertIn(b'{"status": "ok"}', answer)
        token = h.token()
        del transport.stream[:]
        server.dataReceived(
            b"GET /api/v1/virtualization/virtualmachines/" + VM_UUID.encode() + b"/console/ws?token="
            + token.encode() + b" HTTP/1.1\r\nHost: proxy.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )  # fmt: skip
        answer = b"".join(transport.stream)
        self.assertTrue(answer.startswith(b"HTTP/1.1 101"), answer[:80])
        self.assertEqual(h.reactor.tcpClients[0][:2], ("127.0.0.1", 5901))

    def test_getWithoutUpgradeRefused(self) -> None:
        """
        When the console path is asked without an Upgrade header, the
        answer is 426 through either route (no status page, no redirect).
        """
        for route in ("switch", "site"):
            h = RoutedHarness(route)
            server = h.listening.buildProtocol(PEER)
            transport = iosim.FakeTransport(server, isServer=True, peerAddress=PEER)
            server.makeConnection(transport)
            server.dataReceived(b"GET " + WS_PATH + b"?redirect=http%3A%2F%2Fevil.test HTTP/1.1\r\n"
                                b"Host: proxy.test\r\n\r\n")  # fmt: skip
            answer = b"".join(transport.stream)
            self.assertTrue(answer.startswith(b"HTTP/1.1 426"), (route, answer[:80]))
            self.assertNotIn(b"evil.test", answer)

    def test_handshakeBounded(self) -> None:
        """
        When a console upgrade's headers go on without end, the handshake
        is refused (431) once they pass twisted.web's limits, instead of
        being buffered.
        """
        h = RoutedHarness("switch")
        server = h.switch.buildProtocol(PEER)
        transport = iosim.FakeTransport(server, isServer=True, peerAddress=PEER)
        server.makeConnection(transport)
        server.dataReceived(WS_LINE)
        for _ in range(40):
            if transport.disconnecting:
                break
            server.dataReceived(b"X-Filler: " + b"f" * 1000 + b"\r\n")
        answer = b"".join(transport.stream)
        self.assertTrue(answer.startswith(b"HTTP/1.1 431"), answer[:80])
        self.assertTrue(transport.disconnecting)

    def test_openHandshakeTimeout(self) -> None:
        """
        When a console upgrade's headers stop half-way, Autobahn's opening
        handshake timeout (connection_timeout) drops the connection.
        """
        h = RoutedHarness("switch")
        server = h.switch.buildProtocol(PEER)
        transport = iosim.FakeTransport(server, isServer=True, peerAddress=PEER)
        server.makeConnection(transport)
        server.dataReceived(WS_LINE + b"Host: proxy.test\r\n")
        h.reactor.advance(9.9)
        self.assertFalse(transport.disconnecting)
        h.reactor.advance(0.2)
        self.assertTrue(transport.disconnecting)


def _tls_options() -> Any:
    import twisted.test

    pem = FilePath(twisted.test.__file__).sibling("server.pem").getContent()
    return PrivateCertificate.loadPEM(pem).options()


class TLSTests(SynchronousTestCase):
    """
    The switch inside TLS (an C{ssl:} endpoint).
    """

    def test_consoleOverTLS(self) -> None:
        """
        When the switch is wrapped by L{TLSMemoryBIOFactory}, a console
        WebSocket over TLS opens straight to the bridge, relays, and knows
        it is secure.
        """
        from autobahn.twisted.websocket import WebSocketClientFactory

        from tests.ws.test_bridge import ClientProtocol, _ReactorTimer

        h = RoutedHarness("switch")
        tls_server = TLSMemoryBIOFactory(_tls_options(), False, h.switch, clock=h.reactor)
        self.assertIn("ConsoleSite", tls_server.logPrefix())
        built: List[Any] = []
        original = h.factory.buildProtocol
        h.factory.buildProtocol = lambda addr: built.append(original(addr)) or built[-1]  # type: ignore
        url = f"wss://proxy.test/api/v1/virtualization/virtualmachines/{VM_UUID}/console/ws?token={h.token()}"
        cf = WebSocketClientFactory(url, reactor=h.reactor)
        cf._batched_timer = _ReactorTimer(h.reactor)
        cf.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0, autoPingInterval=0)
        cf.protocol = ClientProtocol
        cf.messages, cf.pongs, cf.closed, cf.opened, cf.subprotocol = [], [], None, False, None
        tls_client = TLSMemoryBIOFactory(CertificateOptions(), True, cf, clock=h.reactor)
        server = tls_server.buildProtocol(PEER)
        client = tls_client.buildProtocol(PEER)
        pump = iosim.connect(
            server, iosim.FakeTransport(server, isServer=True, peerAddress=PEER),
            client, iosim.FakeTransport(client, isServer=False), clock=h.reactor,
        )  # fmt: skip
        def flush() -> None:
            for _ in range(6):
                h.reactor.advance(0)  # TLS write aggregation runs on the clock
                pump.flush()

        flush()
        self.assertTrue(cf.opened)
        [bridge] = built
        self.assertIs(server.wrappedProtocol, bridge)
        self.assertTrue(bridge.transport_details.is_secure)
        host, port, factory, _, _ = h.reactor.tcpClients.pop(0)
        backend = factory.buildProtocol(IPv4Address("TCP", host, port))
        backend_transport = StringTransport()
        backend.makeConnection(backend_transport)
        flush()
        client.wrappedProtocol.sendMessage(b"over tls", isBinary=True)
        flush()
        self.assertEqual(backend_transport.value(), b"over tls")
        backend.dataReceived(b"from vm")
        flush()
        self.assertEqual(cf.messages, [(b"from vm", True)])
