"""
The bridge on the real reactor over loopback: a bare
L{WebSocketResource} in a L{Site}, a real TCP echo server as the VM, a real
Autobahn WebSocket client.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from vaporproxy.console.registry import ConsoleRegistry
from vaporproxy.ws.factory import ConsoleBridgeFactory
from vaporproxy.config import Config, ConsoleConfig
from vaporproxy.vm.hosts import HostPolicy
from vaporproxy.interfaces import Grant, Graphics, VMConsoles
from vaporproxy.stores.limits import MemoryLimiter
from vaporproxy.testing import FakeConsoleLocator
from vaporproxy.stores.tokens import MemoryTokenStore

VM_UUID = "0d4c2b1a-2222-4333-8444-955566667777"


class PassthroughGuard:
    """
    A guard without a handshake: client bytes held until the VM is
    connected, then relayed.
    """

    def __init__(self, sink: Any, password: Optional[str]):
        self.sink = sink
        self.pending: List[bytes] = []

    def start(self) -> None:
        pass

    def client_data(self, data: bytes) -> None:
        self.pending.append(data)

    def server_connected(self) -> None:
        for data in self.pending:
            self.sink.send_to_server(data)
        self.sink.established()

    def server_data(self, data: bytes) -> None:
        pass


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class Observer:
    def __init__(self) -> None:
        self.outcomes: List[Any] = []

    def console_opened(self, console_type: str) -> None:
        pass

    def console_closed(self, outcome: Any) -> None:
        self.outcomes.append(outcome)

    def token_issued(self) -> None:
        pass

    def view_only_opened(self) -> None:
        pass

    def recording_started(self) -> None:
        pass


class Proxy:
    """
    A bridge listening on loopback in front of one VM port.
    """

    def __init__(self, test: TestCase, vm_port: int, console: ConsoleConfig):
        self.tokens = MemoryTokenStore(reactor, ttl=60)
        self.registry = ConsoleRegistry(reactor)
        self.observer = Observer()
        self.limiter = MemoryLimiter(5, 10)
        vm = VMConsoles(
            uuid=VM_UUID,
            name="loop",
            running=True,
            graphics=(Graphics(type="vnc", index=0, port=vm_port, listen="127.0.0.1"),),
        )
        self.factory = ConsoleBridgeFactory(
            config=Config(console=console),
            token_store=self.tokens,
            locator=FakeConsoleLocator([vm]),
            limiter=self.limiter,
            host_policy=HostPolicy(["127.0.0.1"], reactor.nameResolver),
            registry=self.registry,
            observer=self.observer,
            reactor=reactor,
        )
        self.factory.vnc_guard = PassthroughGuard
        self.port = reactor.listenTCP(0, Site(WebSocketResource(self.factory)), interface="127.0.0.1")
        test.addCleanup(self.port.stopListening)

    def token(self) -> str:
        grant = Grant(vm_ref=VM_UUID, vm_uuid=VM_UUID, console_type="vnc", display=0, user="bob")
        result: List[Any] = []
        self.tokens.issue(grant).addCallback(result.append)
        return result[0].token

    def url(self, token: str) -> str:
        port = self.port.getHost().port
        return f"ws://127.0.0.1:{port}/api/v1/virtualization/virtualmachines/{VM_UUID}/console/ws?token={token}"

    async def open_client(self, protocol: Any = None) -> Tuple[Any, WebSocketClientFactory]:
        """
        Connect a WebSocket client (C{protocol}, by default L{Client}) with
        a fresh token; answer it once open, and its factory.
        """
        factory = client_factory(self.url(self.token()))
        if protocol is not None:
            factory.protocol = protocol
        await TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port).connect(factory)
        return await factory.opened, factory


class Client(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.received.append(payload)
        waiting = self.factory.waiting
        if waiting is not None and sum(map(len, self.factory.received)) >= waiting[0]:
            self.factory.waiting = None
            waiting[1].callback(b"".join(self.factory.received))

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        self.factory.closed.callback((code, reason))


def client_factory(url: str) -> WebSocketClientFactory:
    factory = WebSocketClientFactory(url, reactor=reactor)
    factory.protocol = Client
    factory.opened = Deferred()
    factory.closed = Deferred()
    factory.received = []
    factory.waiting = None
    return factory


def until(factory: WebSocketClientFactory, n: int) -> Deferred:
    d: Deferred = Deferred()
    factory.waiting = (n, d)
    return d


class BridgeLoopbackTests(TestCase):
    """
    A console over real sockets.
    """

    timeout = 20

    async def _relay(self) -> None:
        vm = reactor.listenTCP(0, Factory.forProtocol(Echo), interface="127.0.0.1")
        self.addCleanup(vm.stopListening)
        proxy = Proxy(self, vm.getHost().port, ConsoleConfig(buffer_size=32 * 1024, connection_timeout=5))
        client, factory = await proxy.open_client()
        payload = bytes(range(256)) * 1024  # 256 KiB in several messages
        received = until(factory, len(payload) + 5)
        client.sendMessage(b"hello", isBinary=True)
        for i in range(0, len(payload), 50_000):
            client.sendMessage(payload[i : i + 50_000], isBinary=True)
        echoed = await received
        self.assertEqual(echoed, b"hello" + payload)
        [record] = proxy.registry.consoles()
        self.assertEqual(record.bytes_sent, len(payload) + 5)
        self.assertEqual(record.bytes_received, len(payload) + 5)
        client.sendClose(1000)
        code, _ = await factory.closed
        self.assertEqual(code, 1000)
        [outcome] = proxy.observer.outcomes
        self.assertEqual((outcome.error, outcome.bytes_sent), (None, len(payload) + 5))
        self.assertEqual(proxy.limiter._leases, {})

    def test_echo(self) -> Deferred:
        """
        When a WebSocket client talks to a VM through the bridge, its bytes
        come back intact and the console is recorded with its byte counts.
        """
        return Deferred.fromCoroutine(self._relay())

    async def _refused(self) -> None:
        vm = reactor.listenTCP(0, Factory.forProtocol(Echo), interface="127.0.0.1")
        port = vm.getHost().port
        await vm.stopListening()
        proxy = Proxy(self, port, ConsoleConfig(connection_timeout=5))
        _, factory = await proxy.open_client()
        code, reason = await factory.closed
        self.assertEqual((code, reason), (4006, "CONNECTION_FAILED"))
        self.assertIn(b"CONNECTION_FAILED", b"".join(factory.received))
        self.assertEqual(proxy.limiter._leases, {})

    def test_backendRefused(self) -> None:
        """
        When nothing listens on the VM's port, the client gets
        CONNECTION_FAILED and the slot is free again.
        """
        return Deferred.fromCoroutine(self._refused())
