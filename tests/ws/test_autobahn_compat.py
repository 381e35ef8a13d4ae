"""
The contract between L{vaporproxy.ws.autobahn_compat} and the installed
Autobahn: every private name the compat module relies on exists.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, List

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from vaporproxy.ws import autobahn_compat
from autobahn.websocket.protocol import WebSocketProtocol

from vaporproxy.ws.autobahn_compat import READ_BY, RELIES_ON, FastServerFactory, FastServerProtocol


HANDSHAKE = (
    b"GET /ws HTTP/1.1\r\nHost: proxy.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def _resolve(dotted: str) -> Any:
    """
    The module or class named C{dotted}.
    """
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


def _connected_protocol() -> FastServerProtocol:
    factory = FastServerFactory(reactor=MemoryReactorClock())
    factory.use_reactor(factory.reactor)
    factory.protocol = FastServerProtocol
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(StringTransport())
    protocol.dataReceived(HANDSHAKE)
    return protocol


class AutobahnContractTests(SynchronousTestCase):
    """
    The installed Autobahn has what L{vaporproxy.ws.autobahn_compat} uses.
    """

    def test_namesExist(self) -> None:
        """When Autobahn is upgraded, every module-level and class-level private name the compat module relies on still exists."""
        missing: List[str] = []
        for owner, name in RELIES_ON:
            if owner == "instance":
                continue
            try:
                if not hasattr(_resolve(owner), name):
                    missing.append(f"{owner}.{name}")
            except (ImportError, AttributeError):
                missing.append(f"{owner} (itself)")
        self.assertEqual(
            missing,
            [],
            "the installed Autobahn (or Twisted) lacks names vaporproxy/ws/autobahn_compat/ relies on: "
            + ", ".join(missing)
            + "; pin Autobahn to the tested range (requirements.txt) or update the compat module",
        )

    def test_instanceAttributesExist(self) -> None:
        """When a console WebSocket is connected, every Autobahn instance attribute the compat module reads or sets exists."""
        protocol = _connected_protocol()
        factory = protocol.factory
        missing = [
            name
            for owner, name in RELIES_ON
            if owner == "instance" and not (hasattr(protocol, name) or hasattr(factory, name))
        ]
        self.assertEqual(
            missing,
            [],
            "the installed Autobahn's WebSocket protocol lacks attributes vaporproxy/ws/autobahn_compat/ relies on: "
            + ", ".join(missing),
        )

    def test_readByStillRead(self) -> None:
        """When Autobahn is upgraded, the methods that read attributes vaporproxy sets for them still read those names."""
        stale = [f"{where} no longer reads {name}" for where, name in READ_BY if name not in inspect.getsource(_resolve(where))]
        self.assertEqual(stale, [], "vaporproxy/ws/autobahn_compat/ relies on: " + "; ".join(stale))

    def test_everyPrivateImportListed(self) -> None:
        """When the compat module imports a private Autobahn function, it is listed in RELIES_ON (so the contract covers it)."""
        listed = {name for _, name in RELIES_ON}
        from vaporproxy.ws.autobahn_compat import handshake

        imported = [
            name
            for module in (autobahn_compat, handshake)
            for name, value in vars(module).items()
            if name.startswith("_") and not name.startswith("__")
            and getattr(value, "__module__", "").startswith("autobahn")
        ]
        self.assertEqual([n for n in imported if n not in listed], [])
        self.assertIn("_is_tls_error", imported)
        self.assertIn("_url_to_origin", imported)

    def test_controlFrameThroughAutobahn(self) -> None:
        """When the relay hands a ping to Autobahn through control_frame, Autobahn answers it with a pong carrying the same payload."""
        protocol = _connected_protocol()
        self.assertTrue(protocol.parser_between_messages())
        protocol.transport.clear()
        protocol.control_frame(9, b"hi")
        self.assertEqual(protocol.transport.value(), b"\x8a\x02hi")


class _GuardSpy:
    """
    A connection guard that stepped aside (L{vaporproxy.http.guard}): what
    it was told.
    """

    pending = True

    def __init__(self) -> None:
        self.seen: List[bytes] = []
        self.lost_count = 0

    def saw(self, data: bytes) -> None:
        self.seen.append(data)
        if data.startswith(b"HTTP/1.1 101 "):
            self.pending = False

    def lost(self) -> None:
        self.lost_count += 1


class GuardHookTests(SynchronousTestCase):
    """
    A protocol put past the connection guard tells it its answer and its end.
    """

    def connect(self) -> Any:
        factory = FastServerFactory(reactor=MemoryReactorClock())
        factory.use_reactor(factory.reactor)
        factory.protocol = FastServerProtocol
        protocol = factory.buildProtocol(None)
        guard = _GuardSpy()
        protocol.guarded_by(guard)
        transport = StringTransport()
        # (A socket lets a protocol unregister without a producer; Autobahn does on refusal.)
        transport.unregisterProducer = lambda: None  # type: ignore[method-assign]
        protocol.makeConnection(transport)
        return protocol, guard

    def test_101_told_then_let_go(self) -> None:
        """When the opening handshake succeeds, the guard is told of the 101 answer and of nothing after it."""
        protocol, guard = self.connect()
        protocol.dataReceived(HANDSHAKE)
        self.assertEqual(len(guard.seen), 1)
        self.assertTrue(guard.seen[0].startswith(b"HTTP/1.1 101 "))
        self.assertTrue(protocol.transport.value().startswith(b"HTTP/1.1 101 "))
        protocol.autobahn_connection_lost(Failure(ConnectionDone()))
        self.assertEqual(guard.lost_count, 0)

    def test_refusal_told_and_close(self) -> None:
        """When the handshake is refused, the guard is told of the error answer and of the close."""
        protocol, guard = self.connect()
        protocol.dataReceived(b"POST /ws HTTP/1.1\r\nHost: proxy.test\r\n\r\n")
        self.assertEqual([s[:12] for s in guard.seen], [b"HTTP/1.1 405"])
        self.assertTrue(guard.pending)
        protocol.autobahn_connection_lost(Failure(ConnectionDone()))
        self.assertEqual(guard.lost_count, 1)


class _AutobahnOwn(FastServerProtocol):
    """Autobahn's own per-connection set-up (its __init__ and _connectionMade), for comparison."""

    CONFIG_ATTRS = FastServerProtocol._OPTIONS_FROM_FACTORY

    def __init__(self) -> None:
        WebSocketProtocol.__init__(self)

    def _connectionMade(self) -> None:
        WebSocketProtocol._connectionMade(self)


class InitialStateTests(SynchronousTestCase):
    """
    A connection reads the same initial state as Autobahn's own set-up
    would give it, though most of it is class defaults (issue 8).
    """

    def connect(self, protocol_class: type) -> Any:
        factory = FastServerFactory(reactor=MemoryReactorClock())
        factory.use_reactor(factory.reactor)
        factory.setProtocolOptions(perMessageCompressionAccept=lambda offers: None, autoPingInterval=30.0)
        factory.protocol = protocol_class
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        return protocol

    def test_sameAsAutobahn(self) -> None:
        """When Autobahn is upgraded, every attribute its own set-up gives a connection reads the same on ours (mutable ones: a fresh object of the same type)."""
        own = self.connect(_AutobahnOwn)
        ours = self.connect(FastServerProtocol)
        differ = []
        for name, value in vars(own).items():
            if name in ("factory", "transport", "connected", "peer", "_ws_direct", "_transport_details"):
                continue
            mine = getattr(ours, name, AttributeError)
            if isinstance(value, (bool, int, float, str, bytes, type(None), tuple, frozenset)):
                same = type(mine) is type(value) and mine == value
            elif isinstance(value, (list, dict)):
                same = mine == value
            elif name in FastServerProtocol._OPTIONS_FROM_FACTORY:
                same = mine is value  # (a function option)
            else:
                same = type(mine) is type(value)  # a connection's own object (future, stats, queue)
            if not same:
                differ.append(f"{name}: Autobahn {value!r}, ours {mine!r}")
        self.assertEqual(differ, [], "vaporproxy/ws/autobahn_compat/ FastServerProtocol's initial state")

    def test_fewAttributesOfItsOwn(self) -> None:
        """When a connection opens, it holds few attributes of its own: Autobahn's options, constant state and handshake text are not copied onto it."""
        protocol = self.connect(FastServerProtocol)
        protocol.dataReceived(HANDSHAKE)
        own = vars(protocol)
        for name in ("maxFramePayloadSize", "closedByMe", "utf8validator", "is_closed"):
            self.assertNotIn(name, own)
        self.assertEqual(protocol.autoPingInterval, 30.0)
        self.assertIsNone(protocol.perMessageCompressionAccept([]))
        self.assertIsNone(protocol.http_headers)
        self.assertEqual(protocol.state, FastServerProtocol.STATE_OPEN)

    def test_perConnectionObjects(self) -> None:
        """When two connections use their send queue or closed future, each gets its own."""
        a, b = self.connect(FastServerProtocol), self.connect(FastServerProtocol)
        a.send_queue.append(b"x")
        self.assertEqual(len(b.send_queue), 0)
        self.assertIsNot(a.is_closed, b.is_closed)
        self.assertIs(a.is_closed, a.is_closed)

    def test_optionsOfTheMoment(self) -> None:
        """When the factory's options change, a new connection has the new ones and an earlier one keeps its own."""
        factory = FastServerFactory(reactor=MemoryReactorClock())
        factory.use_reactor(factory.reactor)
        factory.protocol = FastServerProtocol
        factory.setProtocolOptions(maxFramePayloadSize=100)
        first = factory.buildProtocol(None)
        factory.setProtocolOptions(maxFramePayloadSize=200)
        second = factory.buildProtocol(None)
        factory.maxFramePayloadSize = 300
        third = factory.buildProtocol(None)
        self.assertEqual([p.maxFramePayloadSize for p in (first, second, third)], [100, 200, 300])
        self.assertEqual(type(first).__name__, "FastServerProtocol")
        self.assertIsInstance(first, FastServerProtocol)
