"""
Tests for L{vaporproxy.ws.bridge}: full WebSocket handshakes in memory over
L{iosim} with an Autobahn client, backend connections completed by hand on a
L{MemoryReactorClock}.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, List, Optional, Tuple

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from vaporproxy.http.request import client_ip_from, origin_allowed, vm_ref_from_path
from vaporproxy.relay.fastwrite import high_water as _high_water
from vaporproxy.timestamps import iso_utc
from vaporproxy.console.registry import ConsoleRegistry
from vaporproxy.ws.autobahn_compat import ReactorTimer as _ReactorTimer
from vaporproxy.ws.channel import MAX_SPICE_CHANNELS
from vaporproxy.ws.factory import ConsoleBridgeFactory
from vaporproxy.config import Config, ConsoleConfig, ServerConfig
from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.vm.hosts import HostPolicy
from vaporproxy.interfaces import Grant, ILease, IOutcomeObserver, Graphics, VMConsoles
from vaporproxy.stores.limits import MemoryLimiter
from vaporproxy.testing import FakeConsoleLocator
from vaporproxy.stores.tokens import MemoryTokenStore
from tests.ws.test_frames import frame

VM_UUID = "6f1b2a3c-1111-4222-8333-944455556666"
VM2_UUID = "6f1b2a3c-1111-4222-8333-944455557777"
VNC = Graphics(type="vnc", index=0, port=5901, listen="127.0.0.1", password="s3cret")
SPICE = Graphics(type="spice", index=0, port=5930, listen="127.0.0.1", password="sp1ce")
VM = VMConsoles(uuid=VM_UUID, name="web1", running=True, graphics=(VNC, SPICE))
VM_FAR = VMConsoles(
    uuid=VM2_UUID,
    name="far",
    running=True,
    graphics=(Graphics(type="vnc", index=0, port=5901, listen="192.0.2.10"),),
)
PROXY_HOST = "proxy.test"
PEER = IPv4Address("TCP", "198.51.100.7", 40000)
BUFFER = 4096


def ws_path(vm_ref: str) -> str:
    return f"/api/v1/virtualization/virtualmachines/{vm_ref}/console/ws"


# ---------------------------------------------------------------------------
# Fakes
# ---------------------------------------------------------------------------


class PassthroughGuard:
    """
    A VNC-shaped guard that does no handshake: it holds the client's bytes
    until the VM is connected, forwards them, and is established.
    """

    instances: List["PassthroughGuard"] = []

    def __init__(self, sink: Any, password: Optional[str]):
        self.sink = sink
        self.password = password
        self.pending: List[bytes] = []
        self.started = False
        PassthroughGuard.instances.append(self)

    def start(self) -> None:
        self.started = True

    def client_data(self, data: bytes) -> None:
        self.pending.append(data)

    def server_connected(self) -> None:
        for data in self.pending:
            self.sink.send_to_server(data)
        self.pending = []
        self.sink.established()

    def server_data(self, data: bytes) -> None:
        raise AssertionError("no server data before established")


class FakeSpiceGuard:
    """
    A SPICE-shaped guard over a toy link protocol: the client's first
    message is C{b"MAIN"} or C{b"CHAN:<session id>"}; the VM answers a main
    link with C{b"SESSION:<id>"}.  It refuses with the codes of the real
    L{vaporproxy.guards.spice.SpiceGuard}: a link that does not match the token's
    use (a main channel twice, a later channel first, another session id)
    is TOKEN_ALREADY_USED (4003), an unreadable link BAD_REQUEST (4012).
    """

    def __init__(self, sink: Any, password: Optional[str], expected: Optional[int]):
        self.sink = sink
        self.password = password
        self.expected = expected
        self.main: Optional[bool] = None

    def start(self) -> None:
        pass

    def client_data(self, data: bytes) -> None:
        if self.main is not None:
            self.sink.send_to_server(data)
            return
        if data == b"MAIN":
            if self.expected is not None:
                self.sink.fail(ConsoleError(ErrorCode.TOKEN_ALREADY_USED), "second main channel")
                return
            self.main = True
            self.sink.admit(True)
        elif data.startswith(b"CHAN:"):
            if self.expected is None:
                self.sink.fail(ConsoleError(ErrorCode.TOKEN_ALREADY_USED), "first use not the main channel")
                return
            if int(data[5:]) != self.expected:
                self.sink.fail(ConsoleError(ErrorCode.TOKEN_ALREADY_USED), "wrong session id")
                return
            self.main = False
            self.sink.admit(False)
        else:
            self.sink.fail(ConsoleError(ErrorCode.BAD_REQUEST), "not a link message")

    def server_connected(self) -> None:
        self.sink.send_to_server(b"LINK-MAIN" if self.main else b"LINK-CHAN")
        if not self.main:
            self.sink.established()

    def server_data(self, data: bytes) -> None:
        if data.startswith(b"SESSION:"):
            self.sink.spice_session(int(data[8:]))
            self.sink.send_to_client(data)
            self.sink.established()


@implementer(ILease)
class CountingLease:
    def __init__(self, inner: Any):
        self.inner = inner
        self.console_id = inner.console_id
        self.vm_uuid = inner.vm_uuid
        self.releases = 0

    def release(self) -> None:
        self.releases += 1
        self.inner.release()


class CountingLimiter:
    """
    A L{MemoryLimiter} whose leases count their releases; C{hold} makes
    C{acquire} wait until the test fires it.
    """

    def __init__(self, max_per_vm: int = 5, max_total: int = 100):
        self.inner = MemoryLimiter(max_per_vm, max_total)
        self.leases: List[CountingLease] = []
        self.hold = False
        self.waiting: List[Tuple[Deferred, Deferred]] = []

    def acquire(self, vm_uuid: str, console_id: str, user: Any = None, client: Any = None) -> Deferred:
        d = self.inner.acquire(vm_uuid, console_id, user=user, client=client).addCallback(self._wrap)
        if not self.hold:
            return d
        outer: Deferred = Deferred()
        self.waiting.append((d, outer))
        return outer

    def _wrap(self, lease: Any) -> CountingLease:
        counted = CountingLease(lease)
        self.leases.append(counted)
        return counted

    def release_waiting(self) -> None:
        for inner, outer in self.waiting:
            inner.chainDeferred(outer)
        self.waiting = []

    def live(self) -> int:
        return len(self.inner._leases)


@implementer(IOutcomeObserver)
class RecordingObserver:
    def __init__(self) -> None:
        self.opened: List[str] = []
        self.outcomes: List[Any] = []

    def console_opened(self, console_type: str) -> None:
        self.opened.append(console_type)

    def console_closed(self, outcome: Any) -> None:
        self.outcomes.append(outcome)

    def token_issued(self) -> None:
        pass

    def view_only_opened(self) -> None:
        pass

    def recording_started(self) -> None:
        pass


class NoResolver:
    """An IHostnameResolver that knows no names."""

    def resolveHostName(self, receiver: Any, hostName: str, portNumber: int = 0, *a: Any, **kw: Any) -> Any:
        receiver.resolutionBegan(None)
        receiver.resolutionComplete()
        return receiver


class RecordingFakeTransport(iosim.FakeTransport):
    """An iosim transport that remembers pause/resume of reading."""

    def __init__(self, *a: Any, **kw: Any):
        super().__init__(*a, **kw)
        self.reading_states: List[str] = []

    def pauseProducing(self) -> None:
        self.reading_states.append("paused")

    def resumeProducing(self) -> None:
        self.reading_states.append("producing")


@implementer(ISSLTransport)
class TLSLayer:
    """Stands for a TLS layer (a TLSMemoryBIOProtocol) under a transport."""

    def getPeerCertificate(self) -> None:
        return None


class SecureFakeTransport(RecordingFakeTransport):
    """
    An iosim transport over a TLS layer (as a protocol wrapper, e.g. the
    PROXY-header one, over a TLSMemoryBIOProtocol).
    """

    def __init__(self, *a: Any, **kw: Any):
        super().__init__(*a, **kw)
        self.transport = TLSLayer()


class ClientProtocol(WebSocketClientProtocol):
    def onConnect(self, response: Any) -> None:
        self.factory.subprotocol = response.protocol

    def onOpen(self) -> None:
        self.factory.opened = True

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.messages.append((payload, isBinary))

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        self.factory.closed = (code, reason)

    def onPong(self, payload: bytes) -> None:
        self.factory.pongs.append(payload)


# ---------------------------------------------------------------------------
# Harness
# ---------------------------------------------------------------------------


class Harness:
    """
    A bridge over in-memory collaborators, and helpers to open WebSockets
    against it and complete backend connections.
    """

    def __init__(self, console: Optional[ConsoleConfig] = None, server: Optional[ServerConfig] = None, **limits: int):
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1_700_000_000)
        self.config = Config(
            console=console
            or ConsoleConfig(
                connection_timeout=10.0,
                idle_timeout=60.0,
                buffer_size=BUFFER,
                allowed_hosts=("127.0.0.1", "::1"),
            ),
            server=server or ServerConfig(),
        )
        self.tokens = MemoryTokenStore(self.reactor, ttl=300)
        self.locator = FakeConsoleLocator([VM, VM_FAR])
        self.limiter = CountingLimiter(**limits)
        self.hosts = HostPolicy(self.config.console.allowed_hosts, NoResolver())
        self.registry = ConsoleRegistry(self.reactor)
        self.observer = RecordingObserver()
        self.factory = ConsoleBridgeFactory(
            config=self.config,
            token_store=self.tokens,
            locator=self.locator,
            limiter=self.limiter,
            host_policy=self.hosts,
            registry=self.registry,
            observer=self.observer,
            reactor=self.reactor,
        )
        self.factory.vnc_guard = PassthroughGuard
        self.factory.spice_guard = FakeSpiceGuard

    def token(self, vm_uuid: str = VM_UUID, console_type: str = "vnc", **kw: Any) -> str:
        grant = Grant(vm_ref=vm_uuid, vm_uuid=vm_uuid, console_type=console_type, display=0, user="alice", **kw)
        result: List[Any] = []
        self.tokens.issue(grant).addCallback(result.append)
        return result[0].token

    def open(
        self,
        token: Optional[str],
        vm_ref: str = VM_UUID,
        protocols: Optional[List[str]] = None,
        origin: Optional[str] = None,
        headers: Optional[dict] = None,
        peer: IPv4Address = PEER,
        secure: bool = False,
        scheme: Optional[str] = None,
    ) -> "Connection":
        # The Host header the client sends follows the URL: proxy.test:443
        # for wss (as a TLS-terminating proxy forwards it), :80 for ws.
        url = f"{scheme or ('wss' if secure else 'ws')}://{PROXY_HOST}{ws_path(vm_ref)}"
        if token is not None:
            url += f"?token={token}"
        client_factory = WebSocketClientFactory(
            url, protocols=protocols, origin=origin, headers=headers, reactor=self.reactor
        )
        client_factory._batched_timer = _ReactorTimer(self.reactor)
        client_factory.setProtocolOptions(
            openHandshakeTimeout=0, closeHandshakeTimeout=0, serverConnectionDropTimeout=0, autoPingInterval=0
        )
        client_factory.protocol = ClientProtocol
        client_factory.messages = []
        client_factory.pongs = []
        client_factory.closed = None
        client_factory.opened = False
        client_factory.subprotocol = None
        server = self.factory.buildProtocol(peer)
        client = client_factory.buildProtocol(peer)
        transport_class = SecureFakeTransport if secure else RecordingFakeTransport
        server_transport = transport_class(server, isServer=True, peerAddress=peer)
        client_transport = iosim.FakeTransport(client, isServer=False)
        pump = iosim.connect(server, server_transport, client, client_transport, clock=self.reactor)
        return Connection(self, server, client, client_factory, server_transport, pump)


class Connection:
    def __init__(self, harness: Harness, server: Any, client: Any, client_factory: Any, transport: Any, pump: Any):
        self.harness = harness
        self.server = server
        self.client = client
        self.cf = client_factory
        self.transport = transport
        self.pump = pump
        self.backend: Any = None
        self.backend_transport: Optional[StringTransport] = None

    @property
    def messages(self) -> List[Tuple[bytes, bool]]:
        return self.cf.messages

    @property
    def closed(self) -> Any:
        return self.cf.closed

    def send(self, data: bytes, binary: bool = True) -> None:
        self.client.sendMessage(data, isBinary=binary)
        self.pump.flush()

    def connect_backend(self) -> StringTransport:
        """Complete the pending backend connection with a StringTransport."""
        reactor = self.harness.reactor
        host, port, factory, timeout, bind = reactor.tcpClients.pop(0)
        self.target = (host, port)
        self.backend = factory.buildProtocol(IPv4Address("TCP", host, port))
        self.backend_transport = StringTransport()
        self.backend.makeConnection(self.backend_transport)
        self.pump.flush()
        return self.backend_transport

    def send_raw(self, data: bytes) -> None:
        """Send C{data} as it is, frames built by hand."""
        self.client.transport.write(data)
        self.pump.flush()

    def from_vm(self, data: bytes) -> None:
        self.backend.dataReceived(data)
        self.pump.flush()

    def vm_closes(self) -> None:
        self.backend.connectionLost(Failure(ConnectionDone()))
        self.pump.flush()


def error_of(conn: Connection) -> dict:
    texts = [payload for payload, binary in conn.messages if not binary]
    assert len(texts) == 1, conn.messages
    return json.loads(texts[0].decode("utf-8"))


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------


class RelayTests(SynchronousTestCase):
    """
    The happy path of a VNC console.
    """

    def setUp(self) -> None:
        PassthroughGuard.instances = []
        self.h = Harness()

    def test_relaysBothWays(self) -> None:
        """
        When the token is good and the VM answers, bytes flow both ways in
        order and are counted in the registry.
        """
        conn = self.h.open(self.h.token())
        self.assertTrue(conn.cf.opened)
        self.assertEqual(self.h.reactor.tcpClients[0][:2], ("127.0.0.1", 5901))
        conn.send(b"early-1")
        conn.send(b"early-2")
        backend = conn.connect_backend()
        self.assertEqual(backend.value(), b"early-1early-2")
        conn.from_vm(b"hello browser")
        self.assertEqual(conn.messages, [(b"hello browser", True)])
        conn.send(b"key press")
        self.assertEqual(backend.value(), b"early-1early-2key press")
        [record] = self.h.registry.consoles()
        info = record.as_dict(self.h.reactor.seconds())
        self.assertEqual((info["vm_id"], info["type"], info["user"]), (VM_UUID, "vnc", "alice"))
        self.assertEqual(info["bytes_sent"], len(b"hello browser"))
        self.assertEqual(info["bytes_received"], len(b"early-1early-2key press"))
        self.assertEqual(self.h.observer.opened, ["vnc"])
        self.assertEqual(PassthroughGuard.instances[0].password, "s3cret")

    def test_largeFrames(self) -> None:
        """
        When the VM sends chunks that need 16-bit and 64-bit frame lengths,
        the browser receives them intact.
        """
        conn = self.h.open(self.h.token())
        conn.connect_backend()
        medium, large = b"m" * 300, bytes(range(256)) * 300
        conn.from_vm(medium)
        conn.from_vm(large)
        self.assertEqual(conn.messages, [(medium, True), (large, True)])

    def test_noSubprotocol(self) -> None:
        """
        When the client offers no subprotocol (noVNC), none is chosen.
        """
        conn = self.h.open(self.h.token())
        self.assertTrue(conn.cf.opened)
        self.assertIsNone(conn.cf.subprotocol)

    def test_binaryEchoed(self) -> None:
        """
        When the client offers C{binary} (spice-html5), it is echoed.
        """
        conn = self.h.open(self.h.token(), protocols=["binary"])
        self.assertTrue(conn.cf.opened)
        self.assertEqual(conn.cf.subprotocol, "binary")

    def test_clientCloses(self) -> None:
        """
        When the browser closes, the VM connection is closed, one outcome
        without error is recorded and the lease is released once.
        """
        conn = self.h.open(self.h.token())
        backend = conn.connect_backend()
        conn.from_vm(b"abc")
        conn.client.sendClose(1000)
        conn.pump.flush()
        self.assertTrue(backend.disconnecting)
        [outcome] = self.h.observer.outcomes
        self.assertIsNone(outcome.error)
        self.assertEqual((outcome.bytes_sent, outcome.vm_uuid, outcome.user), (3, VM_UUID, "alice"))
        self.assertEqual([lease.releases for lease in self.h.limiter.leases], [1])
        self.assertEqual(self.h.limiter.live(), 0)
        self.assertEqual(self.h.registry.consoles(), [])

    def test_backendCloses(self) -> None:
        """
        When the VM closes its connection, the WebSocket closes with 1000
        and the lease is released once.
        """
        conn = self.h.open(self.h.token())
        conn.connect_backend()
        conn.vm_closes()
        self.assertEqual(conn.closed[0], 1000)
        [outcome] = self.h.observer.outcomes
        self.assertEqual((outcome.error, outcome.reason), (None, "backend closed"))
        self.assertEqual([lease.releases for lease in self.h.limiter.leases], [1])

    def test_textRefused(self) -> None:
        """
        When the client sends a text message while relaying, the console
        closes with BAD_REQUEST.
        """
        conn = self.h.open(self.h.token())
        conn.connect_backend()
        conn.send(b"hello", binary=False)
        self.assertEqual(error_of(conn)["code"], "BAD_REQUEST")
        self.assertEqual(conn.closed, (4012, "BAD_REQUEST"))
        self.assertEqual([lease.releases for lease in self.h.limiter.leases], [1])

    def test_setupBufferBounded(self) -> None:
        """
        When the client sends more than C{buffer_size} before the console is
        ready, it is refused instead of buffered.
        """
        self.h.limiter.hold = True
        conn = self.h.open(self.h.token())
        conn.send(b"x" * (BUFFER + 1))
        self.assertEqual(error_of(conn)["code"], "BAD_REQUEST")
        self.h.limiter.release_waiting()
        self.assertEqual([lease.releases for lease in self.h.limiter.leases], [1])
        self.assertEqual(self.h.limiter.live(), 0)

    def test_readsGoOnWhileDialling(self) -> None:
        """
        While the VM is being dialled, the browser's bytes are read and
        given to the guard (its handshake with the browser goes on
        meanwhile); reads are never paused for it.
        """
        conn = self.h.open(self.h.token())
        self.assertEqual(len(self.h.reactor.tcpClients), 1, "dialling")
        conn.send(b"RFB 003.008\n")
        [guard] = PassthroughGuard.instances
        self.assertEqual(guard.pending, [b"RFB 003.008\n"])
        conn.connect_backend()
        self.assertEqual(conn.transport.reading_states, [])


class RelayParserTests(SynchronousTestCase):
    """
    Once relaying, the browser's frames go through the relay's own parser,
    with Autobahn's handling of control frames and the frame caps kept.
    """

    def setUp(self) -> None:
        self.h = Harness(
            ConsoleConfig(
                connection_timeout=10.0,
                idle_timeout=600.0,
                buffer_size=BUFFER,
                max_message_size=1000,
                allowed_hosts=("127.0.0.1",),
            )
        )
        self.conn = self.h.open(self.h.token())
        self.backend = self.conn.connect_backend()
        self.conn.send(b"first")

    def test_parserTakesOver(self) -> None:
        """
        When the console relays, the relay's parser reads the browser's
        frames: whole, fragmented and split across reads, in order.
        """
        self.assertIsNotNone(self.conn.server._parser)
        stream = frame(2, b"ab", fin=False) + frame(0, b"cd", fin=False) + frame(0, b"e") + frame(2, b"f" * 300)
        for i in range(0, len(stream), 7):
            self.conn.send_raw(stream[i : i + 7])
        self.assertEqual(self.backend.value(), b"firstabcde" + b"f" * 300)
        [record] = self.h.registry.consoles()
        self.assertEqual(record.bytes_received, len(b"firstabcde") + 300)

    def test_pingAnswered(self) -> None:
        """
        When the browser pings between fragments of a message, it gets the
        pong and the message goes on.
        """
        self.conn.send_raw(frame(2, b"ab", fin=False) + frame(9, b"hi") + frame(0, b"cd"))
        self.assertEqual(self.conn.cf.pongs, [b"hi"])
        self.assertEqual(self.backend.value(), b"firstabcd")

    def test_autoPing(self) -> None:
        """
        When the proxy's keep-alive ping is answered through the relay's
        parser, the ping timeout is cancelled and the console stays open.
        """
        self.h.reactor.advance(31)
        self.conn.pump.flush()
        server = self.conn.server
        self.assertIsNone(server.autoPingPending)
        self.assertIsNone(server.autoPingTimeoutCall)
        self.h.reactor.advance(29)
        self.conn.pump.flush()
        self.assertIsNone(self.conn.closed)

    def test_oversizeFrame(self) -> None:
        """
        When a frame is larger than C{max_message_size}, the WebSocket
        closes with 1009 and none of it reaches the VM.
        """
        self.conn.send_raw(frame(2, b"x" * 1001))
        self.assertEqual(self.conn.closed[0], 1009)
        self.assertEqual(self.backend.value(), b"first")
        self.assertTrue(self.backend.disconnecting)
        [outcome] = self.h.observer.outcomes
        self.assertIn("1001 bytes", outcome.reason)
        self.assertEqual([lease.releases for lease in self.h.limiter.leases], [1])

    def test_oversizeMessage(self) -> None:
        """
        When the frames of one message add up to more than
        C{max_message_size}, the WebSocket closes with 1009.
        """
        self.conn.send_raw(frame(2, b"x" * 600, fin=False) + frame(0, b"y" * 600))
        self.assertEqual(self.conn.closed[0], 1009)
        self.assertEqual(self.backend.value(), b"first" + b"x" * 600)

    def test_protocolError(self) -> None:
        """
        When the browser sends an unmasked frame, the WebSocket closes with
        1002 and the console ends once.
        """
        self.conn.send_raw(frame(2, b"oops", mask=None))
        self.assertEqual(self.conn.closed[0], 1002)
        self.assertTrue(self.backend.disconnecting)
        self.assertEqual(len(self.h.observer.outcomes), 1)
        self.assertEqual(self.h.limiter.live(), 0)

    def test_textBetweenFrames(self) -> None:
        """
        When a text frame follows binary ones in the same read, the binary
        data is relayed and the console is refused with BAD_REQUEST.
        """
        self.conn.send_raw(frame(2, b"ok") + frame(1, b"text"))
        self.assertEqual(self.backend.value(), b"firstok")
        self.assertEqual(error_of(self.conn)["code"], "BAD_REQUEST")
        self.assertEqual(self.conn.closed, (4012, "BAD_REQUEST"))

    def test_closeReasonNotLeaked(self) -> None:
        """
        When the VM closes, the browser gets 1000 without the log-only
        reason text.
        """
        self.conn.vm_closes()
        self.assertEqual(self.conn.closed[0], 1000)
        self.assertFalse(self.conn.closed[1])
        [outcome] = self.h.observer.outcomes
        self.assertEqual(outcome.reason, "backend closed")


class FlowControlTests(SynchronousTestCase):
    """
    The two transports are producers of each other once relaying.
    """

    def test_registerProducers(self) -> None:
        """
        When relaying starts, each transport has a streaming valve as its
        producer: the browser's side full pauses reads from the VM and from
        the browser, the VM's side full pauses reads from the browser.
        """
        h = Harness()
        conn = h.open(h.token())
        backend = conn.connect_backend()
        self.assertTrue(conn.transport.streamingProducer)
        self.assertTrue(backend.streaming)
        # The browser's side is full: reading from the VM pauses (and from
        # the browser, whose pings would otherwise queue pongs).
        before = len(conn.transport.reading_states)
        conn.transport.producer.pauseProducing()
        self.assertEqual(backend.producerState, "paused")
        conn.transport.producer.resumeProducing()
        self.assertEqual(backend.producerState, "producing")
        self.assertEqual(conn.transport.reading_states[before:], ["paused", "producing"])
        # The VM's side is full: reading from the browser pauses.
        before = len(conn.transport.reading_states)
        backend.producer.pauseProducing()
        backend.producer.resumeProducing()
        self.assertEqual(conn.transport.reading_states[before:], ["paused", "producing"])
        self.assertEqual(backend.producerState, "producing")

    def test_unregisterOnClose(self) -> None:
        """
        When the console ends, the producers are unregistered.
        """
        h = Harness()
        conn = h.open(h.token())
        backend = conn.connect_backend()
        conn.vm_closes()
        self.assertIsNone(conn.transport.producer)
        self.assertIsNone(backend.producer)

    def test_highWaterMark(self) -> None:
        """
        When a transport is a file descriptor, or wraps one (TLS), its
        C{bufferSize} becomes the high-water mark.
        """
        fd = FileDescriptor(MemoryReactorClock())

        class Wrapper:
            transport = fd

        _high_water(Wrapper(), 1234)
        self.assertEqual(fd.bufferSize, 1234)
        _high_water(fd, 99)
        self.assertEqual(fd.bufferSize, 99)


class ErrorTests(SynchronousTestCase):
    """
    Every console error reaches the client as the JSON text message, then
    a close frame with its code, and is recorded once.
    """

    def setUp(self) -> None:
        self.h = Harness()

    def assertError(self, conn: Connection, code: ErrorCode) -> None:
        body = error_of(conn)
        self.assertEqual((body["type"], body["code"]), ("error", code.name))
        self.assertIsInstance(body["error"], str)
        self.assertEqual(set(body), {"type", "code", "error"})
        self.assertEqual(conn.closed, (code.close_code, code.name))
        [outcome] = self.h.observer.outcomes
        self.assertEqual(outcome.error, code.name)
        self.assertTrue(all(lease.releases == 1 for lease in self.h.limiter.leases))
        self.assertEqual(self.h.limiter.live(), 0)
        self.assertEqual(self.h.registry.consoles(), [])

    def test_missingToken(self) -> None:
        """
        When no token is given, INVALID_TOKEN (4001).
        """
        conn = self.h.open(None)
        self.assertError(conn, ErrorCode.INVALID_TOKEN)

    def test_invalidToken(self) -> None:
        """
        When the token was never issued, INVALID_TOKEN (4001).
        """
        conn = self.h.open("ab" * 32)
        self.assertError(conn, ErrorCode.INVALID_TOKEN)

    def test_tokenForOtherVM(self) -> None:
        """
        When the token is for another VM, INVALID_TOKEN (4001).
        """
        conn = self.h.open(self.h.token(), vm_ref=VM2_UUID)
        self.assertError(conn, ErrorCode.INVALID_TOKEN)

    def test_tokenExpired(self) -> None:
        """
        When the token is older than its TTL, TOKEN_EXPIRED (4002).
        """
        token = self.h.token()
        self.h.reactor.advance(301)
        conn = self.h.open(token)
        self.assertError(conn, ErrorCode.TOKEN_EXPIRED)

    def test_tokenAlreadyUsed(self) -> None:
        """
        When a VNC token is presented twice, the second is TOKEN_ALREADY_USED
        (4003) and the first console is untouched.
        """
        token = self.h.token()
        first = self.h.open(token)
        first.connect_backend()
        second = self.h.open(token)
        body = error_of(second)
        self.assertEqual(body["code"], "TOKEN_ALREADY_USED")
        self.assertEqual(second.closed, (4003, "TOKEN_ALREADY_USED"))
        self.assertIsNone(first.closed)
        self.assertEqual(len(self.h.registry.consoles()), 1)

    def test_vmNotFound(self) -> None:
        """
        When the VM is gone, VM_NOT_FOUND (4004).
        """
        token = self.h.token()
        self.h.locator.remove(VM_UUID)
        conn = self.h.open(token)
        self.assertError(conn, ErrorCode.VM_NOT_FOUND)

    def test_noConsole(self) -> None:
        """
        When the VM is not running, NO_CONSOLE_AVAILABLE (4005).
        """
        token = self.h.token()
        self.h.locator.add(replace(VM, running=False))
        conn = self.h.open(token)
        self.assertError(conn, ErrorCode.NO_CONSOLE_AVAILABLE)

    def test_backendRefused(self) -> None:
        """
        When the VM refuses the connection, CONNECTION_FAILED (4006) and the
        lease is released once.
        """
        conn = self.h.open(self.h.token())
        self.h.reactor.tcpClients[0][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        conn.pump.flush()
        self.assertError(conn, ErrorCode.CONNECTION_FAILED)
        self.assertEqual(len(self.h.limiter.leases), 1)

    def test_connectionTimeout(self) -> None:
        """
        When the VM does not answer within C{connection_timeout}, the
        connection attempt is cancelled and CONNECTION_FAILED (4006): the
        console's connection timer does it (the dial has no timer of its
        own).
        """
        conn = self.h.open(self.h.token())
        connector = self.h.reactor.connectors[0]
        self.assertIsNone(self.h.reactor.tcpClients[0][3], "no connect timeout of the dial's own")
        self.h.reactor.advance(9.9)
        conn.pump.flush()
        self.assertIsNone(conn.closed)
        self.h.reactor.advance(0.2)
        conn.pump.flush()
        self.assertError(conn, ErrorCode.CONNECTION_FAILED)
        self.assertTrue(connector.stoppedConnecting)

    def test_guardHandshakeTimeout(self) -> None:
        """
        When the guard's handshake does not finish within
        C{connection_timeout}, CONNECTION_FAILED (4006) and the VM
        connection is dropped.
        """

        class SilentGuard(PassthroughGuard):
            def server_connected(self) -> None:
                pass

        self.h.factory.vnc_guard = SilentGuard
        conn = self.h.open(self.h.token())
        backend = conn.connect_backend()
        self.h.reactor.advance(11)
        conn.pump.flush()
        self.assertError(conn, ErrorCode.CONNECTION_FAILED)
        self.assertTrue(backend.disconnecting)

    def test_maxConnections(self) -> None:
        """
        When the VM already has its maximum of consoles, MAX_CONNECTIONS_REACHED
        (4007) and the live console keeps its slot.
        """
        self.h = Harness(max_per_vm=1)
        first = self.h.open(self.h.token())
        first.connect_backend()
        second = self.h.open(self.h.token())
        self.assertEqual(error_of(second)["code"], "MAX_CONNECTIONS_REACHED")
        self.assertEqual(second.closed, (4007, "MAX_CONNECTIONS_REACHED"))
        self.assertEqual(self.h.limiter.live(), 1)
        self.assertEqual(self.h.observer.outcomes[0].error, "MAX_CONNECTIONS_REACHED")

    def test_maxConnectionsDoesNotSpendToken(self) -> None:
        """
        When a console is refused with MAX_CONNECTIONS_REACHED, its token
        is not spent: once a slot is free, the same token opens a console.
        """
        self.h = Harness(max_per_vm=1)
        first = self.h.open(self.h.token())
        first.connect_backend()
        token = self.h.token()
        refused = self.h.open(token)
        self.assertEqual(refused.closed, (4007, "MAX_CONNECTIONS_REACHED"))
        first.vm_closes()
        retry = self.h.open(token)
        retry.connect_backend()
        self.assertIsNone(retry.closed)
        self.assertEqual(self.h.limiter.live(), 1)
        self.assertEqual(len(self.h.registry.consoles()), 1)

    def test_unauthorizedHost(self) -> None:
        """
        When the VM's console address is not in C{allowed_hosts},
        UNAUTHORIZED (4008) and nothing is dialled.
        """
        conn = self.h.open(self.h.token(vm_uuid=VM2_UUID), vm_ref=VM2_UUID)
        self.assertEqual(error_of(conn)["code"], "UNAUTHORIZED")
        self.assertEqual(conn.closed, (4008, "UNAUTHORIZED"))
        self.assertEqual(self.h.reactor.tcpClients, [])

    def test_internalError(self) -> None:
        """
        When the hypervisor is unreachable, INTERNAL_ERROR (4009).
        """
        token = self.h.token()
        self.h.locator.broken = "down"
        conn = self.h.open(token)
        body = error_of(conn)
        self.assertEqual(body["code"], "INTERNAL_ERROR")
        self.assertEqual(conn.closed, (4009, "INTERNAL_ERROR"))

    def test_unexpectedException(self) -> None:
        """
        When a collaborator raises something unexpected, INTERNAL_ERROR
        (4009) without details reaches the client.
        """
        token = self.h.token()
        self.h.locator.locate = lambda ref: succeed(None)  # type: ignore[assignment]
        conn = self.h.open(token)
        self.assertError(conn, ErrorCode.INTERNAL_ERROR)
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)

    def test_sessionTerminated(self) -> None:
        """
        When the VM's sessions are terminated, SESSION_TERMINATED (4010).
        """
        conn = self.h.open(self.h.token())
        backend = conn.connect_backend()
        self.assertEqual(self.h.registry.terminate_vm(VM2_UUID), 0)
        self.assertEqual(self.h.registry.terminate_vm(VM_UUID), 1)
        conn.pump.flush()
        self.assertError(conn, ErrorCode.SESSION_TERMINATED)
        self.assertTrue(backend.disconnecting)

    def test_idleTimeout(self) -> None:
        """
        When no byte flows either way for C{idle_timeout}, IDLE_TIMEOUT
        (4011); activity in between postpones it.
        """
        conn = self.h.open(self.h.token())
        conn.connect_backend()
        self.h.reactor.advance(50)
        conn.from_vm(b"frame")
        self.h.reactor.advance(10)  # the first check: 10 s since activity
        conn.pump.flush()
        self.assertIsNone(conn.closed)
        self.h.reactor.advance(49)
        conn.pump.flush()
        self.assertIsNone(conn.closed)
        self.h.reactor.advance(1)
        conn.pump.flush()
        self.assertError(conn, ErrorCode.IDLE_TIMEOUT)

    def test_shutdown(self) -> None:
        """
        When the proxy shuts down, consoles close with 1001 and no error.
        """
        conn = self.h.open(self.h.token())
        conn.connect_backend()
        self.assertEqual(self.h.registry.close_all(), 1)
        conn.pump.flush()
        self.assertEqual(conn.closed[0], 1001)
        [outcome] = self.h.observer.outcomes
        self.assertIsNone(outcome.error)
        self.assertEqual([lease.releases for lease in self.h.limiter.leases], [1])


class LifecycleTests(SynchronousTestCase):
    """
    Leases and outcomes when the client leaves early.
    """

    def test_clientLeavesWhileAdmitting(self) -> None:
        """
        When the client drops while the lease is being acquired, the lease
        that arrives later is released at once, exactly once.
        """
        h = Harness()
        h.limiter.hold = True
        conn = h.open(h.token())
        conn.client.dropConnection(abort=True)
        conn.pump.flush()
        self.assertEqual(len(h.observer.outcomes), 1)
        h.limiter.release_waiting()
        self.assertEqual([lease.releases for lease in h.limiter.leases], [1])
        self.assertEqual(h.limiter.live(), 0)
        self.assertEqual(h.reactor.tcpClients, [])
        self.assertEqual(h.registry.consoles(), [])

    def test_clientLeavesWhileDialling(self) -> None:
        """
        When the client drops while the VM is being dialled, the attempt is
        cancelled and the lease released once.
        """
        h = Harness()
        conn = h.open(h.token())
        connector = h.reactor.connectors[0]
        conn.client.dropConnection(abort=True)
        conn.pump.flush()
        self.assertTrue(connector.stoppedConnecting)
        self.assertEqual([lease.releases for lease in h.limiter.leases], [1])
        [outcome] = h.observer.outcomes
        self.assertIsNone(outcome.error)

    def test_handshakeTimeout(self) -> None:
        """
        When the client never finishes the WebSocket handshake, the
        connection is dropped after C{connection_timeout} with one outcome.
        """
        h = Harness()
        server = h.factory.buildProtocol(PEER)
        transport = iosim.FakeTransport(server, isServer=True, peerAddress=PEER)
        server.makeConnection(transport)
        server.dataReceived(b"GET " + ws_path(VM_UUID).encode() + b" HTTP/1.1\r\n")
        h.reactor.advance(9)
        self.assertFalse(transport.disconnecting)
        h.reactor.advance(2)
        self.assertTrue(transport.disconnecting)
        server.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(h.observer.outcomes), 1)


class OriginTests(SynchronousTestCase):
    """
    The Origin check of the opening handshake.
    """

    def test_foreignOriginRefused(self) -> None:
        """
        When a browser page of another origin opens the WebSocket, the
        handshake is refused and nothing is redeemed.
        """
        h = Harness()
        token = h.token()
        conn = h.open(token, origin="http://evil.test")
        self.assertFalse(conn.cf.opened)
        self.assertEqual(h.observer.outcomes[0].error, "UNAUTHORIZED")
        self.assertEqual(h.tokens._entries[list(h.tokens._entries)[0]].used, False)

    def test_sameOriginAllowed(self) -> None:
        """
        When the allow-list is empty, a page of the request's own origin may
        open the WebSocket.
        """
        h = Harness()
        conn = h.open(h.token(), origin=f"http://{PROXY_HOST}")
        self.assertTrue(conn.cf.opened)

    def test_allowList(self) -> None:
        """
        When origins are listed, only they may open the WebSocket.
        """
        h = Harness(server=ServerConfig(allowed_origins=("https://app.example",)))
        self.assertTrue(h.open(h.token(), origin="https://app.example").cf.opened)
        self.assertFalse(h.open(h.token(), origin=f"http://{PROXY_HOST}").cf.opened)

    def test_originRules(self) -> None:
        """
        When origins are compared, default ports and case do not matter and
        a missing Origin is allowed.
        """
        self.assertTrue(origin_allowed(None, "x.test", (), secure=False))
        self.assertTrue(origin_allowed("HTTPS://X.test:443", "x.test", (), secure=True))
        self.assertTrue(origin_allowed("http://x.test:8080", "x.test:8080", (), secure=False))
        self.assertFalse(origin_allowed("http://x.test:8081", "x.test:8080", (), secure=False))
        self.assertFalse(origin_allowed("null", "x.test", (), secure=False))
        self.assertTrue(origin_allowed("https://a.test", "x.test", ("https://a.test/",), secure=False))
        # Not a wildcard (the configuration refuses "*" as an origin).
        self.assertFalse(origin_allowed("https://b.test", "x.test", ("*",), secure=True))

    def test_originSchemeRules(self) -> None:
        """
        When the allow-list is empty, the Origin's scheme must be the
        request's too: http or ws over plain TCP, https or wss over TLS.
        """
        self.assertTrue(origin_allowed("https://x.test", "x.test", (), secure=True))
        self.assertTrue(origin_allowed("wss://x.test", "x.test", (), secure=True))
        self.assertTrue(origin_allowed("ws://x.test", "x.test", (), secure=False))
        self.assertFalse(origin_allowed("http://x.test", "x.test", (), secure=True))
        self.assertFalse(origin_allowed("https://x.test", "x.test", (), secure=False))
        self.assertFalse(origin_allowed("wss://x.test", "x.test", (), secure=False))
        self.assertFalse(origin_allowed("ftp://x.test", "x.test", (), secure=False))
        # Default ports follow the Origin's scheme: https://x.test is :443.
        self.assertFalse(origin_allowed("https://x.test", "x.test:80", (), secure=True))

    def test_sameOriginSchemeChecked(self) -> None:
        """
        When the allow-list is empty, a page of the same host but the other
        scheme may not open the WebSocket; the scheme of the request is the
        transport's, or a trusted proxy's X-Forwarded-Proto.
        """
        h = Harness()
        self.assertFalse(h.open(h.token(), origin=f"https://{PROXY_HOST}").cf.opened)
        self.assertTrue(h.open(h.token(), origin=f"https://{PROXY_HOST}", secure=True).cf.opened)
        self.assertFalse(h.open(h.token(), origin=f"http://{PROXY_HOST}", secure=True).cf.opened)
        # An untrusted peer's X-Forwarded-Proto is ignored.
        forwarded = {"X-Forwarded-Proto": "https"}
        self.assertFalse(h.open(h.token(), origin=f"https://{PROXY_HOST}", headers=forwarded).cf.opened)
        self.assertFalse(
            h.open(h.token(), origin=f"https://{PROXY_HOST}", headers=forwarded, scheme="wss").cf.opened
        )
        # A TLS-terminating trusted proxy: plain TCP to the proxy, the
        # client's Host (proxy.test:443) and X-Forwarded-Proto forwarded.
        trusted = Harness(server=ServerConfig(trusted_proxies=("198.51.100.0/24",)))
        self.assertTrue(
            trusted.open(trusted.token(), origin=f"https://{PROXY_HOST}", headers=forwarded, scheme="wss").cf.opened
        )
        self.assertFalse(
            trusted.open(trusted.token(), origin=f"http://{PROXY_HOST}", headers=forwarded, scheme="wss").cf.opened
        )
        plain = {"X-Forwarded-Proto": "http"}
        self.assertFalse(
            trusted.open(trusted.token(), origin=f"https://{PROXY_HOST}", headers=plain, secure=True).cf.opened
        )

    def test_reload(self) -> None:
        """
        When the configuration is reloaded, new connections use the new
        origins.
        """
        h = Harness()
        h.factory.reload(replace(h.config, server=ServerConfig(allowed_origins=("https://app.example",))))
        self.assertFalse(h.open(h.token(), origin=f"http://{PROXY_HOST}").cf.opened)
        self.assertTrue(h.open(h.token(), origin="https://app.example").cf.opened)


class RequireTLSTests(SynchronousTestCase):
    """
    C{console.enable_tls}: console WebSockets only over TLS.
    """

    def harness(self, **server: Any) -> Harness:
        h = Harness(server=ServerConfig(**server) if server else None)
        h.factory.reload(replace(h.config, console=replace(h.config.console, enable_tls=True)))
        return h

    def assertRefused(self, h: Harness, conn: Connection) -> None:
        self.assertTrue(conn.cf.opened)
        self.assertEqual(conn.closed, (4008, "UNAUTHORIZED"))
        self.assertEqual(error_of(conn)["error"], "console connections require TLS")
        self.assertEqual([entry.used for entry in h.tokens._entries.values()], [False])
        self.assertEqual(h.reactor.tcpClients, [])

    def test_plainRefused(self) -> None:
        """
        When enable_tls is on and the WebSocket is in clear, it is closed
        with UNAUTHORIZED (4008), its token unused, nothing dialled.
        """
        h = self.harness()
        self.assertRefused(h, h.open(h.token()))

    def test_untrustedForwardedProtoIgnored(self) -> None:
        """
        When an untrusted peer in clear says X-Forwarded-Proto: https, the
        WebSocket is still refused.
        """
        h = self.harness()
        self.assertRefused(h, h.open(h.token(), headers={"X-Forwarded-Proto": "https"}))

    def test_trustedProxySaysHttp(self) -> None:
        """
        When a trusted proxy says the client came in clear
        (X-Forwarded-Proto: http), the WebSocket is refused.
        """
        h = self.harness(trusted_proxies=("198.51.100.0/24",))
        self.assertRefused(h, h.open(h.token(), headers={"X-Forwarded-Proto": "http"}))

    def test_tlsAllowed(self) -> None:
        """
        When enable_tls is on and the WebSocket is over TLS, it relays.
        """
        h = self.harness()
        conn = h.open(h.token(), secure=True)
        conn.connect_backend()
        self.assertIsNone(conn.closed)
        self.assertEqual(len(h.registry.consoles()), 1)

    def test_trustedProxyHttpsAllowed(self) -> None:
        """
        When a trusted proxy says X-Forwarded-Proto: https, the WebSocket
        relays.
        """
        h = self.harness(trusted_proxies=("198.51.100.0/24",))
        conn = h.open(h.token(), headers={"X-Forwarded-Proto": "https"})
        conn.connect_backend()
        self.assertIsNone(conn.closed)
        self.assertEqual(len(h.registry.consoles()), 1)

    def test_offAllowsPlain(self) -> None:
        """
        When enable_tls is off, a WebSocket in clear relays.
        """
        h = Harness()
        conn = h.open(h.token())
        conn.connect_backend()
        self.assertIsNone(conn.closed)


class IsoUtcTests(SynchronousTestCase):
    """
    L{iso_utc}: the one ISO-8601 formatter (console records and the HTTP
    API's C{expires_at}).
    """

    def test_eachSecondItsOwn(self) -> None:
        """
        When times of the same and of different seconds are formatted in
        any order, each gets its own second in UTC with a Z, fractions
        dropped (the last answer is kept, never a stale one).
        """
        times = [1700000000.7, 1700000000.1, 1700000001.0, 0.0, 1700000000.99, -0.5]
        self.assertEqual(
            [iso_utc(t) for t in times],
            [
                "2023-11-14T22:13:20Z",
                "2023-11-14T22:13:20Z",
                "2023-11-14T22:13:21Z",
                "1970-01-01T00:00:00Z",
                "2023-11-14T22:13:20Z",
                "1969-12-31T23:59:59Z",
            ],
        )

    def test_recordTimes(self) -> None:
        """
        When a console record is described, its times are iso_utc's.
        """
        h = Harness()
        conn = h.open(h.token())
        conn.connect_backend()
        [record] = h.registry.consoles()
        info = record.as_dict(h.reactor.seconds())
        self.assertEqual(info["started_at"], iso_utc(h.reactor.seconds()))
        self.assertEqual(info["started_at"], "2023-11-14T22:13:20Z")
        self.assertEqual(info["last_activity"], info["started_at"])


class ClientAddressTests(SynchronousTestCase):
    """
    L{client_ip_from} and its use by the bridge.
    """

    def test_untrustedPeer(self) -> None:
        """
        When the peer is not a trusted proxy, its X-Forwarded-For is ignored.
        """
        self.assertEqual(client_ip_from("198.51.100.7", "1.2.3.4", ()), "198.51.100.7")

    def test_trustedPeer(self) -> None:
        """
        When the peer is trusted, the rightmost untrusted address is used.
        """
        self.assertEqual(
            client_ip_from("10.0.0.1", "6.6.6.6, 1.2.3.4, 10.0.0.2", ["10.0.0.0/8"]),
            "1.2.3.4",
        )
        self.assertEqual(client_ip_from("10.0.0.1", "10.0.0.3", ["10.0.0.0/8"]), "10.0.0.3")
        self.assertEqual(client_ip_from("10.0.0.1", "junk, 1.2.3.4", ["10.0.0.1"]), "1.2.3.4")
        self.assertEqual(client_ip_from("10.0.0.1", "junk", ["10.0.0.1"]), "10.0.0.1")

    def test_addressForms(self) -> None:
        """
        When addresses are bracketed or IPv4-mapped they are read as
        L{vaporproxy.vm.hosts.parse_address} reads them; a half-bracketed
        entry is not an address and stops the walk.
        """
        self.assertEqual(client_ip_from("::ffff:10.0.0.1", "[2001:db8::1]", ["10.0.0.0/8"]), "2001:db8::1")
        self.assertEqual(client_ip_from("[::ffff:198.51.100.7]", None, ()), "198.51.100.7")
        self.assertEqual(client_ip_from("10.0.0.1", "[1.2.3.4", ["10.0.0.0/8"]), "10.0.0.1")

    def test_boundToken(self) -> None:
        """
        When a token is bound to an address, a client behind a trusted proxy
        with that address in X-Forwarded-For may use it, another may not.
        """
        h = Harness(server=ServerConfig(trusted_proxies=("198.51.100.0/24",)))
        good = h.open(h.token(client_ip="203.0.113.9"), headers={"X-Forwarded-For": "203.0.113.9"})
        self.assertEqual(h.reactor.tcpClients[0][:2], ("127.0.0.1", 5901))
        self.assertIsNone(good.closed)
        bad = h.open(h.token(client_ip="203.0.113.9"), headers={"X-Forwarded-For": "203.0.113.10"})
        self.assertEqual(bad.closed, (4001, "INVALID_TOKEN"))

    def test_pathParsing(self) -> None:
        """
        When the path is a console path, the VM reference is taken from it.
        """
        self.assertEqual(vm_ref_from_path(ws_path("web%201")), "web 1")
        self.assertIsNone(vm_ref_from_path("/api/v1/other"))
        self.assertIsNone(vm_ref_from_path(ws_path("a/b")))


class SpiceTests(SynchronousTestCase):
    """
    SPICE channel grouping (DESIGN.md rule 7).
    """

    def setUp(self) -> None:
        self.h = Harness(max_per_vm=1)
        self.token = self.h.token(console_type="spice")

    def open_main(self) -> Connection:
        main = self.h.open(self.token, protocols=["binary"])
        main.send(b"MAIN")
        backend = main.connect_backend()
        self.assertEqual(main.target, ("127.0.0.1", 5930))
        self.assertEqual(backend.value(), b"LINK-MAIN")
        main.from_vm(b"SESSION:77")
        self.assertEqual(main.messages, [(b"SESSION:77", True)])
        return main

    def test_mainTakesLease(self) -> None:
        """
        When the main channel is admitted, it takes the console's lease and
        attaches its session id to the token.
        """
        self.open_main()
        self.assertEqual(self.h.limiter.live(), 1)
        entry = list(self.h.tokens._entries.values())[0]
        self.assertEqual(entry.spice_session_id, 77)

    def test_channelJoinsWithoutLease(self) -> None:
        """
        When a later channel presents the token with the right session id,
        it joins the console without a lease and its bytes count there.
        """
        main = self.open_main()
        chan = self.h.open(self.token, protocols=["binary"])
        chan.send(b"CHAN:77")
        backend = chan.connect_backend()
        self.assertEqual(backend.value(), b"LINK-CHAN")
        chan.from_vm(b"pixels")
        chan.send(b"input")
        self.assertEqual(chan.messages, [(b"pixels", True)])
        self.assertEqual(backend.value(), b"LINK-CHANinput")
        self.assertEqual(self.h.limiter.live(), 1)
        self.assertEqual(len(self.h.limiter.leases), 1)
        [record] = self.h.registry.consoles()
        self.assertEqual(len(record.channels), 2)
        self.assertEqual(record.bytes_sent, len(b"SESSION:77pixels"))
        self.assertEqual(record.bytes_received, len(b"MAIN") + len(b"CHAN:77input"))
        # The channel ends: its bytes stay with the console, no outcome yet.
        chan.client.sendClose(1000)
        chan.pump.flush()
        self.assertEqual(self.h.observer.outcomes, [])
        self.assertEqual(record.bytes_sent, len(b"SESSION:77pixels"))
        main.vm_closes()
        [outcome] = self.h.observer.outcomes
        self.assertEqual(outcome.bytes_sent, len(b"SESSION:77pixels"))

    def test_wrongSessionRefused(self) -> None:
        """
        When a later channel carries another session id, it is refused and
        the console is untouched.
        """
        main = self.open_main()
        chan = self.h.open(self.token, protocols=["binary"])
        chan.send(b"CHAN:78")
        self.assertEqual(chan.closed, (4003, "TOKEN_ALREADY_USED"))
        self.assertIsNone(main.closed)
        self.assertEqual(self.h.reactor.tcpClients, [])

    def test_firstUseNotMainRefused(self) -> None:
        """
        When the token's first WebSocket is not a main channel, it is
        refused with TOKEN_ALREADY_USED (4003), as the real SPICE guard
        does, and nothing is dialled.
        """
        chan = self.h.open(self.token, protocols=["binary"])
        chan.send(b"CHAN:77")
        self.assertEqual(chan.closed, (4003, "TOKEN_ALREADY_USED"))
        self.assertEqual(self.h.reactor.tcpClients, [])

    def test_admitMismatchRefused(self) -> None:
        """
        When a guard admits a later channel on the token's first use, the
        bridge refuses it with TOKEN_ALREADY_USED (4003), the real guard's
        code for a link that does not match the token's use.
        """

        class WrongAdmit(FakeSpiceGuard):
            def client_data(self, data: bytes) -> None:
                self.sink.admit(False)

        self.h.factory.spice_guard = WrongAdmit
        chan = self.h.open(self.token, protocols=["binary"])
        chan.send(b"CHAN:77")
        self.assertEqual(chan.closed, (4003, "TOKEN_ALREADY_USED"))
        self.assertEqual(self.h.reactor.tcpClients, [])

    def test_mainEndsConsole(self) -> None:
        """
        When the main channel ends, the session is detached from the token,
        the other channels close, and a new channel is refused.
        """
        main = self.open_main()
        chan = self.h.open(self.token, protocols=["binary"])
        chan.send(b"CHAN:77")
        chan.connect_backend()
        main.client.sendClose(1000)
        main.pump.flush()
        chan.pump.flush()
        self.assertEqual(chan.closed[0], 1000)
        self.assertEqual(len(self.h.observer.outcomes), 1)
        self.assertEqual([lease.releases for lease in self.h.limiter.leases], [1])
        later = self.h.open(self.token, protocols=["binary"])
        self.assertEqual(later.closed, (4003, "TOKEN_ALREADY_USED"))

    def open_channel(self) -> Connection:
        chan = self.h.open(self.token, protocols=["binary"])
        chan.send(b"CHAN:77")
        return chan

    def test_channelCap(self) -> None:
        """
        When a console already has MAX_SPICE_CHANNELS channels (main
        included), a further channel is refused with MAX_CONNECTIONS_REACHED
        (4007) before the VM is dialled; once one leaves, another may join.
        """
        main = self.open_main()
        channels = []
        for _ in range(MAX_SPICE_CHANNELS - 1):
            chan = self.open_channel()
            chan.connect_backend()
            self.assertIsNone(chan.closed)
            channels.append(chan)
        [record] = self.h.registry.consoles()
        self.assertEqual(len(record.channels), MAX_SPICE_CHANNELS)
        extra = self.open_channel()
        self.assertEqual(extra.closed, (4007, "MAX_CONNECTIONS_REACHED"))
        self.assertEqual(error_of(extra)["code"], "MAX_CONNECTIONS_REACHED")
        self.assertEqual(self.h.reactor.tcpClients, [])
        self.assertIsNone(main.closed)
        self.assertEqual(len(record.channels), MAX_SPICE_CHANNELS)
        channels[0].client.sendClose(1000)
        channels[0].pump.flush()
        again = self.open_channel()
        again.connect_backend()
        self.assertIsNone(again.closed)
        self.assertEqual(len(record.channels), MAX_SPICE_CHANNELS)

    def test_terminateClosesEveryChannel(self) -> None:
        """
        When the VM's sessions are terminated, every channel gets 4010.
        """
        main = self.open_main()
        chan = self.h.open(self.token, protocols=["binary"])
        chan.send(b"CHAN:77")
        chan.connect_backend()
        self.assertEqual(self.h.registry.terminate_vm(VM_UUID), 1)
        main.pump.flush()
        chan.pump.flush()
        self.assertEqual(main.closed, (4010, "SESSION_TERMINATED"))
        self.assertEqual(chan.closed, (4010, "SESSION_TERMINATED"))


class RemoteSpiceChannelTests(SynchronousTestCase):
    """
    SPICE channels whose main channel lives in another process (scale-out).
    """

    def setUp(self) -> None:
        self.a = Harness(max_per_vm=1)
        self.b = Harness(max_per_vm=1)
        # Both processes share one token store (Redis in production).
        self.b.factory.token_store = self.a.tokens
        self.token = self.a.token(console_type="spice")
        main = self.a.open(self.token, protocols=["binary"])
        main.send(b"MAIN")
        main.connect_backend()
        main.from_vm(b"SESSION:77")
        self.main = main

    def open_remote(self) -> Connection:
        chan = self.b.open(self.token, protocols=["binary"])
        chan.send(b"CHAN:77")
        chan.connect_backend()
        chan.from_vm(b"pixels")
        self.assertEqual(chan.messages, [(b"pixels", True)])
        return chan

    def test_remoteChannelIsNotAConsole(self) -> None:
        """
        When a channel joins a console whose main channel is in another
        process, this process counts no console, no lease, no opened or
        closed console.
        """
        chan = self.open_remote()
        self.assertEqual(self.b.registry.consoles(), [])
        self.assertEqual(self.b.registry.count_by_vm(), {})
        self.assertEqual(self.b.limiter.live(), 0)
        self.assertEqual(self.b.observer.opened, [])
        self.assertEqual([r.console_id for r in self.a.registry.consoles()], [self.main.server.console_id])
        chan.client.sendClose(1000)
        chan.pump.flush()
        self.assertEqual(self.b.observer.outcomes, [])

    def test_laterRemoteChannelsJoin(self) -> None:
        """
        When a second channel of the same remote console lands in this
        process, it joins the first one's record instead of adding one.
        """
        first = self.open_remote()
        second = self.open_remote()
        self.assertEqual(len(self.b.registry._records), 1)
        [record] = self.b.registry._records.values()
        self.assertEqual(record.channels, [first.server, second.server])

    def test_remoteChannelCap(self) -> None:
        """
        When this process already relays MAX_SPICE_CHANNELS channels of one
        remote console (one token and session), a further one is refused
        with MAX_CONNECTIONS_REACHED (4007) before the VM is dialled.
        """
        for _ in range(MAX_SPICE_CHANNELS):
            self.open_remote()
        extra = self.b.open(self.token, protocols=["binary"])
        extra.send(b"CHAN:77")
        self.assertEqual(extra.closed, (4007, "MAX_CONNECTIONS_REACHED"))
        self.assertEqual(self.b.reactor.tcpClients, [])
        self.assertEqual(sum(len(r.channels) for r in self.b.registry._records.values()), MAX_SPICE_CHANNELS)
        self.assertIsNone(self.main.closed)

    def test_terminateClosesRemoteChannels(self) -> None:
        """
        When a VM's sessions are terminated, channels of remote consoles
        close with 4010 but are not counted as consoles.
        """
        chan = self.open_remote()
        self.assertEqual(self.b.registry.terminate_vm(VM_UUID), 0)
        chan.pump.flush()
        self.assertEqual(chan.closed, (4010, "SESSION_TERMINATED"))
        self.assertEqual(self.b.registry._records, {})


class LocatorInvalidationTests(SynchronousTestCase):
    """
    The locator caches running VMs briefly; a console that finds the VM
    not answering as located drops that VM from the cache.
    """

    def setUp(self) -> None:
        self.h = Harness()
        self.invalidated: List[str] = []
        self.h.locator.invalidate = self.invalidated.append  # type: ignore[attr-defined]

    def test_backendRefused(self) -> None:
        """When the VM refuses the connection, the locator forgets the VM once."""
        conn = self.h.open(self.h.token())
        self.h.reactor.tcpClients[0][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        conn.pump.flush()
        self.assertEqual(error_of(conn)["code"], "CONNECTION_FAILED")
        self.assertEqual(self.invalidated, [VM_UUID])

    def test_guardFails(self) -> None:
        """When the guard fails the VM's handshake, the locator forgets the VM."""

        class FailingGuard(PassthroughGuard):
            def server_connected(self) -> None:
                self.sink.fail(ConsoleError(ErrorCode.CONNECTION_FAILED), "bad server version")

        self.h.factory.vnc_guard = FailingGuard
        conn = self.h.open(self.h.token())
        conn.connect_backend()
        self.assertEqual(error_of(conn)["code"], "CONNECTION_FAILED")
        self.assertEqual(self.invalidated, [VM_UUID])

    def test_guardRaises(self) -> None:
        """When the guard refuses by raising a console error, the locator forgets the VM."""

        class RefusingGuard(PassthroughGuard):
            def server_connected(self) -> None:
                raise ConsoleError(ErrorCode.UNAUTHORIZED)

        self.h.factory.vnc_guard = RefusingGuard
        conn = self.h.open(self.h.token())
        conn.connect_backend()
        self.assertEqual(error_of(conn)["code"], "UNAUTHORIZED")
        self.assertEqual(self.invalidated, [VM_UUID])

    def test_normalConsoleKeepsCache(self) -> None:
        """When a console relays and closes normally, or a token is bad, nothing is invalidated."""
        conn = self.h.open(self.h.token())
        conn.connect_backend()
        conn.from_vm(b"hello")
        conn.vm_closes()
        bad = self.h.open("ab" * 32)
        self.assertEqual(error_of(bad)["code"], "INVALID_TOKEN")
        self.assertEqual(self.invalidated, [])

    def test_locatorWithoutInvalidate(self) -> None:
        """When the locator has no invalidate, a failed connection ends the console as before."""
        del self.h.locator.invalidate  # type: ignore[attr-defined]
        self.assertFalse(hasattr(self.h.locator, "invalidate"))
        conn = self.h.open(self.h.token())
        self.h.reactor.tcpClients[0][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        conn.pump.flush()
        self.assertEqual(error_of(conn)["code"], "CONNECTION_FAILED")
        self.assertEqual(self.h.limiter.live(), 0)


class AutobahnDebugArgumentsTests(SynchronousTestCase):
    """
    Autobahn's per-connection debug lines are skipped, with their costly
    arguments, unless txaio's log level is debug.
    """

    def test_noDebugFormatting(self) -> None:
        """When debug is off, a console opens and closes without _connectionMade/_connectionLost's hltype(), and the factory's count is kept."""
        from autobahn.websocket import protocol

        calls: List[Any] = []
        self.patch(protocol, "hltype", lambda *a: calls.append(a) or "")
        self.patch(protocol, "hlval", lambda *a, **k: calls.append(a) or "")
        h = Harness()
        conn = h.open(h.token())
        conn.connect_backend()
        self.assertEqual(h.factory.countConnections, 1)
        conn.client.sendClose(1000)
        conn.pump.flush()
        conn.pump.flush()
        self.assertEqual(h.factory.countConnections, 0)
        mine = [getattr(c[0], "__name__", "") for c in calls if c and getattr(c[0], "__self__", None) is conn.server]
        self.assertNotIn("_connectionMade", mine)
        self.assertNotIn("_connectionLost", mine)
        self.assertIn("sendData", mine)  # the patch does see the server's calls
        self.assertNotIn("processHandshake", mine)  # (the ordinary request takes the fast check)

    def test_noDebugFormattingOnConnectionLost(self) -> None:
        """When debug is off, the adapter's connectionLost debug lines (hltype()) are skipped and the WebSocket still learns of the loss."""
        from autobahn.twisted import websocket

        calls: List[Any] = []
        self.patch(websocket, "hltype", lambda *a: calls.append(a) or "")
        self.patch(websocket, "hlval", lambda *a, **k: calls.append(a) or "")
        h = Harness()
        conn = h.open(h.token())
        conn.connect_backend()
        del calls[:]
        conn.server.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(calls, [])
        self.assertEqual(h.factory.countConnections, 0)
        self.assertEqual(h.limiter.live(), 0)
        self.assertEqual(h.registry.consoles(), [])

    def test_debugKept(self) -> None:
        """When txaio's level is debug, Autobahn's own methods (and their debug lines) run."""
        import txaio
        from autobahn.websocket import protocol

        calls: List[Any] = []
        self.patch(protocol, "hltype", lambda *a: calls.append((getattr(a[0], "__name__", ""), getattr(a[0], "__self__", None))) or "")
        previous = txaio.get_global_log_level()
        txaio.set_global_log_level("debug")
        self.addCleanup(txaio.set_global_log_level, previous)
        h = Harness()
        conn = h.open(h.token())
        self.assertIn(("_connectionMade", conn.server), calls)
        self.assertEqual(h.factory.countConnections, 1)
        conn.client.sendClose(1000)
        conn.pump.flush()
        conn.pump.flush()
        self.assertIn(("_connectionLost", conn.server), calls)
        self.assertEqual(h.factory.countConnections, 0)


class GreetingGuard(PassthroughGuard):
    """
    A guard that greets the client as soon as it starts (as the RFB guard
    sends its version).
    """

    def start(self) -> None:
        self.started = True
        self.sink.send_to_client(b"HELLO")


class CorkTests(SynchronousTestCase):
    """
    On plain TCP the 101 answer and what opening the WebSocket sends at
    once (the guard's greeting) leave in one write.
    """

    def setUp(self) -> None:
        from vaporproxy.ws import autobahn_compat, channel, guard_sink, relay_path

        self.sends: List[List[bytes]] = []

        def send_now(transport: Any, chunks: Any) -> None:
            self.sends.append(list(chunks))
            transport.writeSequence(list(chunks))

        # The fake transport stands in for a plain TCP connection.
        for module in (autobahn_compat, channel, guard_sink, relay_path):
            if hasattr(module, "direct_writer"):
                self.patch(module, "direct_writer", lambda transport: transport)
            if hasattr(module, "send_now"):
                self.patch(module, "send_now", send_now)
        self.h = Harness()
        self.h.factory.vnc_guard = GreetingGuard

    def test_answerAndGreetingInOneWrite(self) -> None:
        """When the guard greets the client on start, the 101 answer and the greeting frame go in one write, and the client reads both."""
        conn = self.h.open(self.h.token())
        first = b"".join(self.sends[0])
        self.assertTrue(first.startswith(b"HTTP/1.1 101"))
        self.assertTrue(first.endswith(b"\x82\x05HELLO"))
        self.assertIsNone(conn.server._cork)
        self.assertEqual(conn.messages, [(b"HELLO", True)])

    def test_laterBytesNotCorked(self) -> None:
        """When the WebSocket is open, bytes for the client are written as they come (one write each)."""
        conn = self.h.open(self.h.token())
        backend = conn.connect_backend()
        del self.sends[:]
        conn.from_vm(b"abc")
        conn.from_vm(b"de")
        self.assertEqual([b"".join(c) for c in self.sends], [b"\x82\x03abc", b"\x82\x02de"])
        self.assertEqual(conn.messages[1:], [(b"abc", True), (b"de", True)])
        self.assertIsNotNone(backend)

    def test_refusalAfterOpenNotLost(self) -> None:
        """When the console is refused as the WebSocket opens (bad token), the 101, the error and the close frame all reach the client, in order."""
        conn = self.h.open("0" * 64)
        self.assertTrue(b"".join(self.sends[0]).startswith(b"HTTP/1.1 101"))
        self.assertEqual(error_of(conn)["code"], "INVALID_TOKEN")
        self.assertEqual(conn.closed, (4001, "INVALID_TOKEN"))


class HandshakeGuard(PassthroughGuard):
    """
    A guard with a client-side handshake: established once the client has
    sent 5 bytes (forwarded to the VM then).
    """

    def server_connected(self) -> None:
        self.connected = True

    def client_data(self, data: bytes) -> None:
        self.pending.append(data)
        if sum(map(len, self.pending)) >= 5:
            self.sink.send_to_server(b"".join(self.pending))
            self.pending = []
            self.sink.established()


class SetupParserTests(SynchronousTestCase):
    """
    The relay's frame parser reads the browser's frames from the opening on,
    the guard's handshake included.
    """

    def setUp(self) -> None:
        self.h = Harness()
        self.h.factory.vnc_guard = HandshakeGuard

    def test_handshakeThroughParser(self) -> None:
        """When the guard's handshake runs, the client's frames reach it through the relay parser, then relay."""
        conn = self.h.open(self.h.token())
        backend = conn.connect_backend()
        conn.send(b"he")
        self.assertIsNotNone(conn.server._parser)
        self.assertFalse(conn.server.relaying)
        conn.send_raw(frame(2, b"ll", fin=False) + frame(0, b"o!"))
        self.assertTrue(conn.server.relaying)
        conn.send(b"after")
        self.assertEqual(backend.value(), b"hello!after")
        [record] = self.h.registry.consoles()
        self.assertEqual(record.bytes_received, len(b"hello!after"))

    def test_textDuringHandshake(self) -> None:
        """When the client sends text during the guard's handshake, BAD_REQUEST (4000) as before."""
        conn = self.h.open(self.h.token())
        conn.connect_backend()
        conn.send(b"he")
        conn.send(b"text", binary=False)
        self.assertEqual(error_of(conn)["code"], "BAD_REQUEST")
        self.assertEqual(self.h.limiter.live(), 0)

    def test_setupBufferBoundedThroughParser(self) -> None:
        """When the client sends more than buffer_size before the guard exists, through the parser, BAD_REQUEST."""
        self.h.limiter.hold = True
        conn = self.h.open(self.h.token())
        conn.send(b"x")
        self.assertIsNotNone(conn.server._parser)
        conn.send(b"y" * BUFFER)
        self.assertEqual(error_of(conn)["code"], "BAD_REQUEST")
        self.h.limiter.release_waiting()
        self.assertEqual(self.h.limiter.live(), 0)


class DialTests(SynchronousTestCase):
    """
    The VM connection is made with C{connectTCP} on the checked address.
    """

    def test_ipv6(self) -> None:
        """When the console listens on an IPv6 address, that literal is dialled and the console relays."""
        h = Harness()
        h.locator.add(replace(VM, graphics=(replace(VNC, listen="::1"),)))
        conn = h.open(h.token())
        self.assertEqual(h.reactor.tcpClients[0][:2], ("::1", 5901))
        backend = conn.connect_backend()
        conn.send(b"hi")
        self.assertEqual(backend.value(), b"hi")

    def test_peerKnown(self) -> None:
        """
        When the WebSocket connects, Autobahn's peer is set as its adapter
        would; the transport details (built on first use) describe the
        connection as the adapter's would.
        """
        h = Harness()
        conn = h.open(h.token())
        self.assertEqual(conn.server.peer, "tcp4:198.51.100.7:40000")
        details = conn.server.transport_details
        self.assertEqual(
            (details.peer, details.is_server, details.is_secure, details.channel_framing),
            (conn.server.peer, True, False, details.CHANNEL_FRAMING_WEBSOCKET),
        )
        self.assertIs(conn.server.transport_details, details)


class ProtocolOptionsTests(SynchronousTestCase):
    """
    The Autobahn options each connection takes from the factory (copied
    from a per-configuration snapshot instead of option by option).
    """

    def test_sameOptionsAsAutobahnCopies(self) -> None:
        """
        When a connection is made, it has every option of the factory that
        its class does not set itself, with the factory's values.
        """
        h = Harness()
        conn = h.open(h.token())
        for name in type(conn.server)._OPTIONS_FROM_FACTORY:
            self.assertEqual(getattr(conn.server, name), getattr(h.factory, name), name)
        self.assertEqual(conn.server.openHandshakeTimeout, 10.0)
        self.assertFalse(conn.server.webStatus)

    def test_changedOptionsReachNewConnections(self) -> None:
        """
        When the options change (a reload, or an option set directly),
        the next connection has the new values and a live one keeps its own.
        """
        h = Harness()
        first = h.open(h.token())
        h.factory.reload(replace(h.config, console=replace(h.config.console, connection_timeout=7.0)))
        second = h.open(h.token())
        h.factory.autoPingInterval = 12.0
        third = h.open(h.token())
        self.assertEqual(
            [c.server.openHandshakeTimeout for c in (first, second, third)], [10.0, 7.0, 7.0]
        )
        self.assertEqual([c.server.autoPingInterval for c in (first, second, third)], [30.0, 30.0, 12.0])
