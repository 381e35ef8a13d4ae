"""
Tests for L{vaporproxy.relay.dial} (and L{vaporproxy.vm.dial}'s TLS
settings): plain TCP, TLS from the first byte and
UNIX sockets, on a L{MemoryReactor}; the TLS handshake with real TLS in
memory (L{iosim}).
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Any, List, Optional

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.testing import MemoryReactor
from twisted.logger import globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from tests.guards.playbook import RecordingSink
from tests.guards.test_spice import OAEP, PASSWORD, browser_ticket, link_message, link_reply, private_key
from tests.integration.qemu_fixture import write_x509_credentials
from vaporproxy.config import ConfigError, HypervisorConfig, SpiceTLSConfig
from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.guards.spice import SpiceGuard
from vaporproxy.interfaces import Graphics
from vaporproxy.relay.dial import GraphicsHandOff, dial
from vaporproxy.vm.dial import spice_tls_by_uri
from vaporproxy.vm.hosts import LIBVIRT_HANDOFF
from vaporproxy.vm.target import ConsoleTarget

URI = "qemu:///system"
PLAIN = Graphics("spice", 0, 5900, 5901, "127.0.0.1")
TLS_ONLY = Graphics("spice", 0, None, 5901, "127.0.0.1")
SOCKET = Graphics("vnc", 0, None, listen_type="socket", socket="/run/q/vnc.sock")
NO_LISTENER = Graphics("vnc", 0, None, listen_type="none")


class _Recorder(Protocol):
    """The application side of the VM connection: what arrived, and why it ended."""

    def __init__(self) -> None:
        self.received: List[bytes] = []
        self.lost: Optional[Failure] = None

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = reason


class _Locator:
    """Opens consoles without a listener: records the target, answers C{pending}."""

    def __init__(self, opened: List[ConsoleTarget], pending: Deferred):
        self.opened = opened
        self.pending = pending

    def open_graphics(self, target: ConsoleTarget) -> Deferred:
        self.opened.append(target)
        return self.pending


class _Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"vm:" + data)


class DialTests(SynchronousTestCase):
    """
    Tests for L{dial}.
    """

    def setUp(self) -> None:
        base = self.mktemp()
        self.vm = write_x509_credentials(os.path.join(base, "vm"), names=("127.0.0.1",))
        self.other = write_x509_credentials(os.path.join(base, "other"), ca_name="other CA")
        with open(self.vm["server-cert.pem"], "rb") as c, open(self.vm["server-key.pem"], "rb") as k:
            self.server_options = PrivateCertificate.loadPEM(c.read() + k.read()).options()
        self.reactor = MemoryReactor()
        self.app = ClientFactory.forProtocol(_Recorder)
        self.events: List[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def tls(self, ca: str) -> Any:
        hv = HypervisorConfig(URI, spice_tls=SpiceTLSConfig(ca_file=ca))
        return spice_tls_by_uri([hv])[URI]

    def test_plain(self) -> None:
        """
        When a SPICE channel may be plain, the plain port is dialled with the factory itself and the timeout given.
        """
        dial(self.reactor, ConsoleTarget("127.0.0.1", PLAIN, URI), None, self.app, 7, 1)
        self.assertEqual(self.reactor.tcpClients, [("127.0.0.1", 5900, self.app, 7, None)])

    def test_tlsPort(self) -> None:
        """
        When the console has only a TLS port, the TLS port is dialled through a TLS wrapper of the factory.
        """
        dial(self.reactor, ConsoleTarget("127.0.0.1", TLS_ONLY, URI), self.tls(self.vm["ca-cert.pem"]), self.app, None, 1)
        ((host, port, factory, timeout, _),) = self.reactor.tcpClients
        self.assertEqual((host, port, timeout), ("127.0.0.1", 5901, None))
        self.assertIs(factory.wrappedFactory, self.app)

    def test_tlsWithoutSettings(self) -> None:
        """
        When a channel needs TLS and the hypervisor has no spice_tls, nothing is dialled and NO_CONSOLE_AVAILABLE is raised.
        """
        error = self.assertRaises(ConsoleError, dial, self.reactor, ConsoleTarget("127.0.0.1", TLS_ONLY, URI), None, self.app)
        self.assertIs(error.code, ErrorCode.NO_CONSOLE_AVAILABLE)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_unixSocket(self) -> None:
        """
        When the console listens on a UNIX socket, the checked path is dialled.
        """
        dial(self.reactor, ConsoleTarget("/run/q/vnc.sock", SOCKET, URI), None, self.app, 5)
        self.assertEqual(self.reactor.unixClients, [("/run/q/vnc.sock", self.app, 5, False)])

    def handshake(self, ca: str) -> _Recorder:
        """Dial TLS_ONLY and run its connection against a TLS echo server in memory."""
        dial(self.reactor, ConsoleTarget("127.0.0.1", TLS_ONLY, URI, "127.0.0.1"), self.tls(ca), self.app, None, 1)
        factory = self.reactor.tcpClients[0][2]
        server = TLSMemoryBIOFactory(self.server_options, False, Factory.forProtocol(_Echo))
        # Twisted's default server protocol holds small writes for a reactor turn iosim never takes.
        server.protocol = TLSMemoryBIOProtocol
        client = factory.buildProtocol(None)
        recorder = client.wrappedProtocol
        _, _, pump = connectedServerAndClient(lambda: server.buildProtocol(None), lambda: client, greet=False)
        client.write(b"REDQ")
        pump.flush()
        return recorder

    def test_plaintextInsideTLS(self) -> None:
        """
        When the VM's certificate verifies, the application protocol exchanges plaintext through TLS.
        """
        recorder = self.handshake(self.vm["ca-cert.pem"])
        self.assertEqual(b"".join(recorder.received), b"vm:REDQ")
        self.assertIsNone(recorder.lost)

    def test_unverifiedCertificateLogged(self) -> None:
        """
        When the VM's certificate does not verify, the connection is lost and a log line says why.
        """
        recorder = self.handshake(self.other["ca-cert.pem"])
        self.assertEqual(recorder.received, [])
        self.assertIsNotNone(recorder.lost)
        lines = [e for e in self.events if e.get("log_format", "").startswith("TLS to the console")]
        self.assertEqual(len(lines), 1)
        self.assertIn("certificate verify failed", lines[0]["why"])
        self.assertEqual(lines[0]["where"], "127.0.0.1:5901")

    def test_handOff(self) -> None:
        """
        When a console has no listener, the locator opens it and the reactor adopts the descriptor as a UNIX stream for the factory; the descriptor is closed after.
        """
        pending: Deferred = Deferred()
        opened: List[ConsoleTarget] = []
        target = ConsoleTarget(LIBVIRT_HANDOFF, NO_LISTENER, URI, LIBVIRT_HANDOFF, "u", _Locator(opened, pending))
        adopted: List[tuple] = []
        self.reactor.adoptStreamConnection = lambda fd, family, factory: adopted.append((fd, family, factory))
        connector = dial(self.reactor, target, None, self.app)
        self.assertIsInstance(connector, GraphicsHandOff)
        self.assertEqual(opened, [target])
        left, right = socket.socketpair()
        self.addCleanup(right.close)
        fd = left.detach()
        pending.callback(fd)
        self.assertEqual(adopted, [(fd, socket.AF_UNIX, self.app)])
        self.assertRaises(OSError, os.fstat, fd)

    def test_handOffStopped(self) -> None:
        """
        When the console gives up before libvirt answers, the descriptor is closed unused and the factory is not told.
        """
        pending: Deferred = Deferred()
        target = ConsoleTarget(LIBVIRT_HANDOFF, NO_LISTENER, URI, "", "u", _Locator([], pending))
        failed: List[Any] = []
        self.app.clientConnectionFailed = lambda connector, reason: failed.append(reason)
        dial(self.reactor, target, None, self.app).stopConnecting()
        left, right = socket.socketpair()
        self.addCleanup(right.close)
        fd = left.detach()
        pending.callback(fd)
        self.assertRaises(OSError, os.fstat, fd)
        self.assertEqual(failed, [])

    def test_handOffFailed(self) -> None:
        """
        When libvirt cannot open the console, the factory's clientConnectionFailed gets the error.
        """
        pending: Deferred = Deferred()
        target = ConsoleTarget(LIBVIRT_HANDOFF, NO_LISTENER, URI, "", "u", _Locator([], pending))
        failed: List[Failure] = []
        self.app.clientConnectionFailed = lambda connector, reason: failed.append(reason)
        dial(self.reactor, target, None, self.app)
        pending.errback(ConsoleError(ErrorCode.CONNECTION_FAILED))
        self.assertEqual([f.value.code for f in failed], [ErrorCode.CONNECTION_FAILED])

    def test_noLocator(self) -> None:
        """
        When a console has no listener and nothing can open it, NO_CONSOLE_AVAILABLE is raised.
        """
        target = ConsoleTarget(LIBVIRT_HANDOFF, NO_LISTENER, URI)
        error = self.assertRaises(ConsoleError, dial, self.reactor, target, None, self.app)
        self.assertIs(error.code, ErrorCode.NO_CONSOLE_AVAILABLE)

    def test_badFile(self) -> None:
        """
        When a spice_tls file is unusable, loading fails with a ConfigError naming the key.
        """
        hv = HypervisorConfig(URI, spice_tls=SpiceTLSConfig(ca_file=self.vm["server-key.pem"]))
        error = self.assertRaises(ConfigError, spice_tls_by_uri, [hv])
        self.assertIn("hypervisors[0].spice_tls.ca_file", str(error))


class _SpiceVM(Protocol):
    """
    A SPICE server's link handshake (behind TLS in these tests): answers the
    link message with the test key and the ticket with OK when it decrypts
    to the console password; keeps the password it read.
    """

    def __init__(self) -> None:
        self.buffer = b""
        self.password: Optional[bytes] = None

    def dataReceived(self, data: bytes) -> None:
        # The guard sends the ticket only after the reply: no chunk spans both.
        self.buffer += data
        link = len(link_message())
        if len(self.buffer) == link:
            self.transport.write(link_reply())
        elif len(self.buffer) == link + 4 + 128:
            self.password = private_key().decrypt(self.buffer[link + 4 :], OAEP)
            self.transport.write(struct.pack("<I", 0 if self.password == PASSWORD.encode() + b"\0" else 7))


class _GuardedVM(Protocol):
    """The VM side of the bridge: feeds the guard, writes what it sends."""

    def __init__(self, guard: Any, sink: RecordingSink):
        self.guard = guard
        self.sink = sink

    def connectionMade(self) -> None:
        self.sink.send_to_server = self.transport.write  # type: ignore[method-assign]
        self.guard.server_connected()

    def dataReceived(self, data: bytes) -> None:
        self.guard.server_data(data)


class SpiceGuardOverTLSTests(SynchronousTestCase):
    """
    The SPICE guard over a VM connection that is TLS from the first byte
    (L{dial} to a tlsPort), with real TLS in memory: the guard sees
    plaintext and injects the ticket as over plain TCP.
    """

    def test_ticketInjectedThroughTLS(self) -> None:
        """
        When the browser links the main channel of a TLS-only console, the VM gets the link message and the real password through TLS, and the browser gets the link reply and result.
        """
        base = self.mktemp()
        certs = write_x509_credentials(os.path.join(base, "vm"), names=("127.0.0.1",))
        with open(certs["server-cert.pem"], "rb") as c, open(certs["server-key.pem"], "rb") as k:
            server_options = PrivateCertificate.loadPEM(c.read() + k.read()).options()
        tls = spice_tls_by_uri([HypervisorConfig(URI, spice_tls=SpiceTLSConfig(ca_file=certs["ca-cert.pem"]))])[URI]
        sink = RecordingSink()
        guard = SpiceGuard(sink, PASSWORD, None)
        guard.start()
        guard.client_data(link_message())
        self.assertIn(("admit", True), sink.calls)

        reactor = MemoryReactor()
        app = ClientFactory.forProtocol(lambda: _GuardedVM(guard, sink))
        target = ConsoleTarget("127.0.0.1", TLS_ONLY, URI, "127.0.0.1")
        dial(reactor, target, tls, app, None, guard.channel_type)
        ((_, port, factory, _, _),) = reactor.tcpClients
        self.assertEqual(port, TLS_ONLY.tls_port)
        vm = _SpiceVM()
        server = TLSMemoryBIOFactory(server_options, False, Factory.forProtocol(lambda: vm))
        server.protocol = TLSMemoryBIOProtocol
        _, _, pump = connectedServerAndClient(lambda: server.buildProtocol(None), lambda: factory.buildProtocol(None))
        pump.flush()
        self.assertEqual(sink.to_client, link_reply())
        guard.client_data(browser_ticket())
        pump.flush()
        self.assertEqual(vm.password, PASSWORD.encode() + b"\0")
        self.assertEqual(sink.to_client, link_reply() + struct.pack("<I", 0))
