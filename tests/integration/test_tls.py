"""
C{console.enable_tls}: the whole stack listening with an C{ssl:} endpoint
and a self-signed certificate made at run time; HTTPS console info and a
C{wss://} console trusting that certificate, with flow control still wired
through the TLS layer.
"""

from __future__ import annotations

import os
from typing import Tuple

from twisted.internet import reactor
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from vaporproxy import tap
from vaporproxy.relay.fastwrite import write_buffered

from .fake_vnc import STREAM_CHUNK, FakeVNCServer
from .libvirt_fixtures import domain_xml, graphics_xml
from .stack import Stack, self_signed
from .test_full_path import (
    ALICE_KEY,
    OPS_KEY,
    STATS_PATH,
    VM_PATH,
    VNC_PASSWORD,
    echo,
    rfb_client_handshake,
    start_stack,
)

try:
    import libvirt
except ImportError:  # pragma: no cover
    libvirt = None

UUID_TLS = "6c0f5a1e-7e0b-4c61-9d0e-5d9b0a1c2101"
#: console.buffer_size's default (32 KB), the high-water mark the bridge sets.
BUFFER_SIZE = 32 * 1024


def fd_under(transport: object) -> FileDescriptor:
    """
    The socket transport under C{transport} (through the TLS layer).
    """
    while not isinstance(transport, FileDescriptor):
        transport = transport.transport  # type: ignore[attr-defined]
    return transport


async def tls_console_stack(testcase: TestCase, stream: bool = False) -> Tuple[FakeVNCServer, Stack]:
    """
    A fake VNC server (streaming with C{stream}) behind the whole proxy
    listening on HTTPS/WSS with a fresh self-signed certificate.
    """
    directory = testcase.mktemp()
    os.makedirs(directory)
    vnc = await FakeVNCServer.listen(testcase, reactor, password=VNC_PASSWORD, stream=stream)
    domains = [domain_xml("vm-tls", UUID_TLS, [graphics_xml("vnc", vnc.port, passwd=VNC_PASSWORD)])]
    return vnc, start_stack(testcase, domains, tls_files=self_signed(directory))


class TLSConsoleTests(TestCase):
    """
    A VNC console over HTTPS and WSS.
    """

    timeout = 20
    if libvirt is None:
        skip = "libvirt-python is not installed"

    async def _start(self) -> None:
        self.vnc, self.stack = await tls_console_stack(self)

    def setUp(self) -> Deferred:
        return Deferred.fromCoroutine(self._start())

    async def _wss(self) -> None:
        status, info = await self.stack.get_json(f"{VM_PATH}/vm-tls/console", key=ALICE_KEY)
        self.assertEqual(status, 200, info)
        self.assertEqual((info["type"], info["tls_enabled"], info["password"]), ("vnc", True, "********"))
        status, ready = await self.stack.get_json("/readyz")
        self.assertEqual(status, 200, ready)
        ws = await self.stack.websocket(info["ws_path"], info["token"])
        client = await rfb_client_handshake(self, ws)
        [session] = self.vnc.sessions
        self.assertTrue(session.auth_ok)
        big = os.urandom(300_000)
        self.assertEqual(await echo(ws, client, big), big)
        self.assertEqual(session.echoed, big)

        # The server side of this console: its WebSocket runs over TLS.
        [record] = self.stack.pieces["registry"].consoles()
        console = record.owner
        tls, backend = console.transport, console._backend.transport
        self.assertNotIsInstance(tls, FileDescriptor)
        tcp = fd_under(tls)
        self.assertEqual((tcp.bufferSize, backend.bufferSize), (BUFFER_SIZE, BUFFER_SIZE))
        # The flow's valve for the browser's side is the (streaming)
        # producer of the TLS WebSocket, and holds the backend's reads...
        valve = tls._producer._producer
        self.assertIs(valve.flow.vm_transport, backend)
        self.assertTrue(tcp.streamingProducer)
        self.assertIs(tcp.producer, tls._producer)
        # ...and the VM side's valve the producer of the backend, holding
        # the TLS WebSocket's reads.
        self.assertIs(backend.producer.flow.ws_transport, tls)
        self.assertTrue(backend.streamingProducer)
        # The socket's buffer filling up pauses reads from the VM, through
        # the TLS layer; draining resumes them.
        tcp.producer.pauseProducing()
        self.assertNotIn(backend, reactor.getReaders())
        tcp.producer.resumeProducing()
        self.assertIn(backend, reactor.getReaders())
        self.assertEqual(await echo(ws, client, b"after resume"), b"after resume")

        status, stats = await self.stack.get_json(STATS_PATH, key=OPS_KEY)
        [live] = stats["connections"]
        self.assertEqual(live["bytes_received"], 12 + 1 + 1 + len(big) + len(b"after resume"))

    def test_wssConsole(self) -> Deferred:
        """
        When console.enable_tls is on with an ssl: endpoint, console info
        over HTTPS says tls_enabled, and a wss:// console trusting the
        certificate authenticates to the VM and relays bytes both ways with
        both transports registered as each other's producers.
        """
        return Deferred.fromCoroutine(self._wss())


class TLSBackPressureTests(TestCase):
    """
    Back-pressure through the TLS layer: a VM that streams without end, a
    wss:// browser that stops reading.
    """

    timeout = 20
    if libvirt is None:
        skip = "libvirt-python is not installed"

    async def _stalled(self) -> None:
        vnc, stack = await tls_console_stack(self, stream=True)
        status, info = await stack.get_json(f"{VM_PATH}/vm-tls/console", key=ALICE_KEY)
        self.assertEqual(status, 200, info)
        ws = await stack.websocket(info["ws_path"], info["token"])
        client = await rfb_client_handshake(self, ws)
        # The browser stops reading; let every socket buffer fill up.
        fd_under(client.transport).pauseProducing()
        await deferLater(reactor, 1.5, lambda: None)
        [session] = vnc.sessions
        [record] = stack.pieces["registry"].consoles()
        console = record.owner
        samples, streamed = [], []
        for _ in range(5):
            samples.append(write_buffered(console.transport) + write_buffered(console._backend.transport))
            streamed.append(session.streamed)
            await deferLater(reactor, 0.1, lambda: None)
        # The proxy holds at most a few buffer_size (plus one read that
        # lands after the high-water mark is crossed, grown by TLS framing).
        self.assertLessEqual(max(samples), 3 * BUFFER_SIZE + 2 * len(STREAM_CHUNK), samples)
        self.assertTrue(session.paused)
        self.assertGreater(session.pauses, 0)
        self.assertEqual(streamed[0], streamed[-1], streamed)
        self.assertGreater(streamed[-1], 10 * max(samples))
        # Reading again resumes the VM.
        fd_under(client.transport).resumeProducing()
        for _ in range(100):
            if session.streamed > streamed[-1]:
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.assertGreater(session.streamed, streamed[-1])
        self.assertGreater(len(ws.received), 4 * len(STREAM_CHUNK))

    def test_stalledBrowserPausesVM(self) -> Deferred:
        """
        When a wss:// browser stops reading, the proxy's buffers stay within
        a few buffer_size and the VM is paused; reading again resumes it.
        """
        return Deferred.fromCoroutine(self._stalled())


class TLSStartupTests(SynchronousTestCase):
    """
    Start-up checks of C{console.enable_tls}.
    """

    def test_enableTLSWithoutSSLEndpoint(self) -> None:
        """
        When enable_tls is true and only a tcp: endpoint listens, start-up
        (twistd's option parsing) stops with an error naming the key.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('console: {enable_tls: true}\nserver: {listen: ["tcp:0:interface=127.0.0.1"]}\n')
        options = tap.Options()
        options.environ = {}
        error = self.assertRaises(usage.UsageError, options.parseOptions, ["--config", path])
        self.assertIn("console.enable_tls", str(error))
        self.assertIn("ssl:", str(error))

    def test_listenOptionWithoutSSLEndpoint(self) -> None:
        """
        When the file listens with ssl: and enable_tls but --listen replaces
        it with a tcp: endpoint, start-up stops with an error naming the key.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        key, cert, _ = self_signed(directory)
        path = os.path.join(directory, "vapor.conf")
        with open(path, "w") as f:
            f.write(
                "console: {enable_tls: true}\n"
                f'server: {{listen: ["ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"]}}\n'
            )
        as_written = tap.Options()
        as_written.environ = {}
        as_written.parseOptions(["--config", path])
        self.assertTrue(as_written["parsed"].console.enable_tls)
        options = tap.Options()
        options.environ = {}
        error = self.assertRaises(
            usage.UsageError, options.parseOptions, ["--config", path, "--listen", "tcp:0:interface=127.0.0.1"]
        )
        self.assertIn("console.enable_tls", str(error))
