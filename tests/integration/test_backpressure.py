"""
Back-pressure on the real reactor: a VM that streams without end, a browser
that stops reading.  The proxy's buffers must stay within a few
C{buffer_size}s and the VM must be paused, instead of memory growing.
"""

from __future__ import annotations

from typing import Any, List, Tuple

from autobahn.twisted.websocket import WebSocketClientProtocol
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from tests.integration.fake_vnc import STREAM_CHUNK, Flood
from tests.integration.test_bridge_loopback import Proxy
from vaporproxy.relay.fastwrite import write_buffered
from vaporproxy.config import ConsoleConfig

BUFFER = 64 * 1024


class Streamer(Flood, Protocol):
    """
    A VM that writes as fast as its transport lets it, forever.
    """

    def connectionMade(self) -> None:
        self.start_flood()

    def connectionLost(self, reason: Any = None) -> None:
        self.stop_flood()


def streaming_vm(testcase: TestCase) -> Tuple[int, List[Streamer]]:
    """
    Listen on loopback as a VM whose every connection is a L{Streamer};
    answer the port and the list the streamers are added to.
    """
    streamers: List[Streamer] = []

    def build(addr: Any) -> Streamer:
        streamers.append(Streamer())
        return streamers[-1]

    vm_factory = Factory()
    vm_factory.buildProtocol = build  # type: ignore[assignment]
    vm = reactor.listenTCP(0, vm_factory, interface="127.0.0.1")
    testcase.addCleanup(vm.stopListening)
    return vm.getHost().port, streamers


class StalledClient(WebSocketClientProtocol):
    """
    A browser that reads nothing once the WebSocket is open.
    """

    def onOpen(self) -> None:
        self.transport.pauseProducing()
        self.factory.opened.callback(self)

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        self.factory.closed.callback((code, reason))


def sleep(seconds: float) -> Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


class BackpressureTests(TestCase):
    """
    A slow browser pauses the VM.
    """

    timeout = 30

    async def _stalled(self) -> None:
        vm_port, streamers = streaming_vm(self)
        proxy = Proxy(self, vm_port, ConsoleConfig(buffer_size=BUFFER, connection_timeout=5))
        client, factory = await proxy.open_client(StalledClient)
        # Let the kernel's socket buffers on both legs fill up.
        await sleep(1.5)
        [record] = proxy.registry.consoles()
        bridge = record.owner
        samples = []
        written = []
        for _ in range(5):
            ws_buffered = write_buffered(bridge.transport)
            vm_buffered = write_buffered(bridge._backend.transport)
            samples.append(ws_buffered + vm_buffered)
            written.append(streamers[0].streamed)
            await sleep(0.1)
        # The proxy holds at most a few buffer_size (plus one 64 KiB read
        # that may land after the high-water mark is crossed).
        self.assertLessEqual(max(samples), 3 * BUFFER + len(STREAM_CHUNK), samples)
        # The VM is paused: it can write no more once everything is full.
        self.assertTrue(streamers[0].paused)
        self.assertGreater(streamers[0].pauses, 0)
        self.assertEqual(written[0], written[-1], written)
        # And the proxy is not the one buffering the stream.
        self.assertGreater(written[-1], 10 * max(samples))
        client.transport.resumeProducing()
        client.dropConnection(abort=True)
        await factory.closed
        await sleep(0.05)
        self.assertEqual(len(proxy.observer.outcomes), 1)
        self.assertEqual(proxy.limiter._leases, {})
        vm_transport = streamers[0].transport
        if vm_transport.connected:
            vm_transport.abortConnection()
            await sleep(0.05)

    def test_stalledBrowserPausesVM(self) -> None:
        """
        When the browser stops reading, the proxy's buffers stay within a
        few C{buffer_size} and the VM is paused.
        """
        return Deferred.fromCoroutine(self._stalled())


class PingFlooder(WebSocketClientProtocol):
    """
    A browser that sends pings as fast as it can and reads nothing.
    """

    def onOpen(self) -> None:
        self.transport.pauseProducing()
        self.sent = 0
        self._loop = task.LoopingCall(self._flood)
        self._loop.start(0.001)
        self.factory.opened.callback(self)

    def _flood(self) -> None:
        # Keep our own socket buffer from growing without bound too.
        if write_buffered(self.transport) > 4 * BUFFER:
            return
        for _ in range(200):
            self.sendPing(b"p" * 125)
            self.sent += 1

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        self.stop()
        self.factory.closed.callback((code, reason))


class PingFloodTests(TestCase):
    """
    A browser that pings and never reads its pongs (issue 11).
    """

    timeout = 30

    async def _flood(self) -> None:
        vm_factory = Factory()
        vm_factory.protocol = Protocol
        vm = reactor.listenTCP(0, vm_factory, interface="127.0.0.1")
        self.addCleanup(vm.stopListening)
        proxy = Proxy(self, vm.getHost().port, ConsoleConfig(buffer_size=BUFFER, connection_timeout=5))
        client, factory = await proxy.open_client(PingFlooder)
        [record] = proxy.registry.consoles()
        bridge = record.owner
        samples = []
        for _ in range(30):
            await sleep(0.1)
            samples.append(write_buffered(bridge.transport))
        # Every ping costs a pong; a browser that reads none gets its reads
        # paused, so the proxy holds at most buffer_size plus one read's pongs.
        self.assertGreater(client.sent, 5000)
        self.assertLessEqual(max(samples), BUFFER + 4 * 65536, samples)
        client.stop()
        client.transport.resumeProducing()
        client.dropConnection(abort=True)
        await factory.closed
        await sleep(0.05)

    def test_pingFloodBounded(self) -> None:
        """
        When a browser floods pings and reads nothing, the proxy's buffer for it stays within a few buffer_size and its reads are paused.
        """
        return Deferred.fromCoroutine(self._flood())
