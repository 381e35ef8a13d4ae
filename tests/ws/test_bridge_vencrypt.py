"""
Tests for the VeNCrypt wiring of L{vaporproxy.ws.bridge}: the per-hypervisor
C{vnc_tls} map, the sink's C{start_tls} (C{transport.startTLS} on the VM
connection) and C{server_lost} (why the VM connection closed during the
handshake).  In memory, with the harness of L{tests.ws.test_bridge}: the TLS
layer itself is a transport stub that records the connection creator, so
the bytes after C{start_tls} are plaintext here.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any, List, Optional

from OpenSSL import SSL
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.integration.qemu_fixture import write_x509_credentials
from tests.ws.test_bridge import BUFFER, Connection, Harness, error_of
from tests.guards.rfb_scripts import CHALLENGE, client_script, expected_to_client, u32, vencrypt_before_tls, version
from vaporproxy.ws.factory import ConsoleBridgeFactory, _rfb_guard
from vaporproxy.config import ConfigError, ConsoleConfig, HypervisorConfig, VncTLSConfig
from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.interfaces import Graphics, VMConsoles
from vaporproxy.guards.rfb import vnc_auth_response
from vaporproxy.guards.vencrypt import VENCRYPT_X509_NONE, VENCRYPT_X509_VNC, VncTLS

HV_TLS = "qemu+tls://kvm1.example.com/system"
HV_PLAIN = "qemu:///system"
VM_TLS_UUID = "7a2c3b4d-2222-4333-8444-a55566667777"
VM_PLAIN_UUID = "7a2c3b4d-2222-4333-8444-a55566668888"
PASSWORD = "s3cret"
#: Where the VMs' VNC servers listen (the address of their remote host).
VM_HOST = "192.0.2.20"
VM_TLS = VMConsoles(
    uuid=VM_TLS_UUID,
    name="secure",
    running=True,
    graphics=(Graphics(type="vnc", index=0, port=5902, listen=VM_HOST, password=PASSWORD),),
    hypervisor=HV_TLS,
)
VM_PLAIN = VMConsoles(
    uuid=VM_PLAIN_UUID,
    name="plain",
    running=True,
    graphics=(Graphics(type="vnc", index=0, port=5903, listen=VM_HOST, password=PASSWORD),),
    hypervisor=HV_PLAIN,
)
SERVER_INIT = b"\x04\x00\x03\x00" + b"P" * 16 + u32(2) + b"vm"


class TLSStringTransport(StringTransport):
    """
    A L{StringTransport} with C{startTLS} that records the connection
    creator (and leaves the bytes in the clear).
    """

    def __init__(self) -> None:
        super().__init__()
        self.tls_creators: List[Any] = []

    def startTLS(self, contextFactory: Any, *args: Any) -> None:
        self.tls_creators.append(contextFactory)


class RecordingTLSGuard:
    """
    A VNC-shaped guard with the VeNCrypt hooks: it records the TLS settings
    it was given, asks for TLS when the VM sends C{b"TLS"}, is established
    on C{b"READY"}, and records every C{server_lost} reason.
    """

    instances: List["RecordingTLSGuard"] = []

    def __init__(self, sink: Any, password: Optional[str], tls: Any = None):
        self.sink = sink
        self.password = password
        self.tls = tls
        self.lost: List[Any] = []
        RecordingTLSGuard.instances.append(self)

    def start(self) -> None:
        pass

    def client_data(self, data: bytes) -> None:
        pass

    def server_connected(self) -> None:
        pass

    def server_data(self, data: bytes) -> None:
        if data == b"TLS":
            self.sink.start_tls(self.tls.creator)
        elif data == b"READY":
            self.sink.established()

    def server_lost(self, reason: Any = None) -> None:
        self.lost.append(reason)
        self.sink.fail(ConsoleError(ErrorCode.CONNECTION_FAILED), "recorded loss")


def write_junk(path: str) -> str:
    """
    Write a file that exists but is no certificate; answer its path.
    """
    with open(path, "w") as f:
        f.write("not a certificate\n")
    return path


class VeNCryptHarness(Harness):
    """
    The bridge harness with two hypervisors: one whose VMs need VeNCrypt
    (its C{vnc_tls} trusting a fresh test CA), one without C{vnc_tls}; both
    remote, their VMs' consoles listening on L{VM_HOST}.
    """

    def __init__(self, directory: str):
        super().__init__(
            console=ConsoleConfig(
                connection_timeout=10.0,
                idle_timeout=60.0,
                buffer_size=BUFFER,
                allowed_hosts=("127.0.0.1", "::1", VM_HOST),
            )
        )
        self.credentials = write_x509_credentials(os.path.join(directory, "vm"))
        self.config = replace(
            self.config,
            hypervisors=(
                HypervisorConfig(HV_PLAIN),
                HypervisorConfig(HV_TLS, vnc_tls=VncTLSConfig(ca_file=self.credentials["ca-cert.pem"])),
            ),
        )
        self.locator.add(VM_TLS)
        self.locator.add(VM_PLAIN)
        self.factory.reload(self.config)
        # The real RFB guard, as wired in production (tests may swap it).
        self.factory.vnc_guard = _rfb_guard

    def connect_backend(self, conn: Connection) -> TLSStringTransport:
        """
        Complete C{conn}'s pending VM connection over a transport that
        records C{startTLS}.
        """
        host, port, factory, timeout, bind = self.reactor.tcpClients.pop(0)
        conn.target = (host, port)
        conn.backend = factory.buildProtocol(IPv4Address("TCP", host, port))
        conn.backend_transport = TLSStringTransport()
        conn.backend.makeConnection(conn.backend_transport)
        conn.pump.flush()
        return conn.backend_transport


def capture_logs(testcase: SynchronousTestCase) -> List[dict]:
    """
    Every log event emitted until the end of C{testcase}.
    """
    events: List[dict] = []
    globalLogPublisher.addObserver(events.append)
    testcase.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


class StartTLSTests(SynchronousTestCase):
    """
    The bridge starts TLS on the VM connection when the guard asks, with
    the creator of the VM's hypervisor.
    """

    def setUp(self) -> None:
        RecordingTLSGuard.instances = []
        self.h = VeNCryptHarness(self.mktemp())

    def test_guardGetsHypervisorTLS(self) -> None:
        """
        When a VM's hypervisor has vnc_tls, its guard gets that hypervisor's
        settings for the dialled host; a VM elsewhere gets none.
        """
        self.h.factory.vnc_guard = RecordingTLSGuard
        self.h.open(self.h.token(VM_TLS_UUID), vm_ref=VM_TLS_UUID)
        self.h.open(self.h.token(VM_PLAIN_UUID), vm_ref=VM_PLAIN_UUID)
        secure, plain = RecordingTLSGuard.instances
        expected = self.h.factory.vnc_tls[HV_TLS].for_host(VM_HOST)
        self.assertIs(secure.tls.creator, expected.creator)
        self.assertIsNone(secure.tls.anonymous)
        self.assertEqual(secure.password, PASSWORD)
        self.assertIsNone(plain.tls)

    def test_startTLSOnBackendTransport(self) -> None:
        """
        When the guard calls start_tls, the bridge calls startTLS on the VM
        connection's transport with that creator, once.
        """
        self.h.factory.vnc_guard = RecordingTLSGuard
        conn = self.h.open(self.h.token(VM_TLS_UUID), vm_ref=VM_TLS_UUID)
        backend = self.h.connect_backend(conn)
        self.assertEqual(backend.tls_creators, [])
        conn.from_vm(b"TLS")
        [guard] = RecordingTLSGuard.instances
        self.assertEqual(backend.tls_creators, [guard.tls.creator])
        conn.from_vm(b"READY")
        conn.from_vm(b"relayed")
        self.assertEqual(conn.messages, [(b"relayed", True)])
        self.assertEqual(len(backend.tls_creators), 1)

    def test_realGuardX509Vnc(self) -> None:
        """
        When the real RFB guard meets a VM offering VeNCrypt X509Vnc, the
        bridge starts TLS with the hypervisor's creator right after the
        sub-type ack, the DES answer and ClientInit go inside it and
        ServerInit reaches the browser.
        """
        conn = self.h.open(self.h.token(VM_TLS_UUID), vm_ref=VM_TLS_UUID)
        backend = self.h.connect_backend(conn)
        conn.send(client_script(8))
        conn.from_vm(vencrypt_before_tls([VENCRYPT_X509_NONE, VENCRYPT_X509_VNC]))
        clear = version(8) + b"\x13" + b"\x00\x02" + u32(VENCRYPT_X509_VNC)
        self.assertEqual(backend.value(), clear)
        creator = self.h.factory.vnc_tls[HV_TLS].for_host(VM_HOST).creator
        self.assertEqual(backend.tls_creators, [creator])
        conn.from_vm(CHALLENGE + u32(0) + SERVER_INIT)
        self.assertEqual(backend.value(), clear + vnc_auth_response(PASSWORD, CHALLENGE) + b"\x01")
        received = b"".join(payload for payload, binary in conn.messages if binary)
        self.assertEqual(received, expected_to_client(8) + SERVER_INIT)
        self.assertIsNone(conn.closed)

    def test_startTLSAfterEndIgnored(self) -> None:
        """
        When the console has already ended, a late start_tls does not touch
        the VM connection's transport.
        """
        self.h.factory.vnc_guard = RecordingTLSGuard
        conn = self.h.open(self.h.token(VM_TLS_UUID), vm_ref=VM_TLS_UUID)
        backend = self.h.connect_backend(conn)
        conn.client.sendClose(1000)
        conn.pump.flush()
        conn.server.start_tls(object())
        self.assertEqual(backend.tls_creators, [])


class ServerLostTests(SynchronousTestCase):
    """
    The guard is told why the VM connection closed during the handshake.
    """

    def setUp(self) -> None:
        RecordingTLSGuard.instances = []
        self.h = VeNCryptHarness(self.mktemp())

    def test_reasonPassedToGuard(self) -> None:
        """
        When the VM connection closes mid-handshake, the guard's server_lost
        gets the very failure of connectionLost, and the console closes
        with CONNECTION_FAILED.
        """
        self.h.factory.vnc_guard = RecordingTLSGuard
        conn = self.h.open(self.h.token(VM_TLS_UUID), vm_ref=VM_TLS_UUID)
        self.h.connect_backend(conn)
        conn.from_vm(b"TLS")
        reason = Failure(SSL.Error([("SSL routines", "", "certificate verify failed")]))
        conn.backend.connectionLost(reason)
        conn.pump.flush()
        [guard] = RecordingTLSGuard.instances
        self.assertEqual(len(guard.lost), 1)
        self.assertIs(guard.lost[0], reason)
        self.assertEqual(conn.closed, (4006, "CONNECTION_FAILED"))
        [outcome] = self.h.observer.outcomes
        self.assertEqual((outcome.error, outcome.reason), ("CONNECTION_FAILED", "guard: recorded loss"))

    def test_tlsFailureLogged(self) -> None:
        """
        When the TLS handshake with the VM fails under the real guard, the
        browser gets CONNECTION_FAILED (4006) and the console's log line
        carries OpenSSL's reason.
        """
        events = capture_logs(self)
        conn = self.h.open(self.h.token(VM_TLS_UUID), vm_ref=VM_TLS_UUID)
        backend = self.h.connect_backend(conn)
        conn.send(client_script(8))
        conn.from_vm(vencrypt_before_tls([VENCRYPT_X509_VNC]))
        self.assertEqual(len(backend.tls_creators), 1)
        conn.backend.connectionLost(Failure(SSL.Error([("SSL routines", "", "certificate verify failed")])))
        conn.pump.flush()
        self.assertEqual(error_of(conn)["code"], "CONNECTION_FAILED")
        self.assertEqual(conn.closed, (4006, "CONNECTION_FAILED"))
        [outcome] = self.h.observer.outcomes
        self.assertEqual(outcome.reason, "guard: TLS handshake with the VM failed: certificate verify failed")
        closed = [e for e in events if e.get("console_id") == outcome.console_id and "reason" in e]
        self.assertEqual([e["reason"] for e in closed], [outcome.reason])
        self.assertEqual([lease.releases for lease in self.h.limiter.leases], [1])

    def test_closedBeforeTLS(self) -> None:
        """
        When the VM closes before TLS was started, the real guard says so
        instead of blaming TLS.
        """
        conn = self.h.open(self.h.token(VM_TLS_UUID), vm_ref=VM_TLS_UUID)
        self.h.connect_backend(conn)
        conn.vm_closes()
        self.assertEqual(conn.closed, (4006, "CONNECTION_FAILED"))
        [outcome] = self.h.observer.outcomes
        self.assertTrue(
            outcome.reason.startswith("guard: VM closed the connection during the handshake"), outcome.reason
        )

    def test_notCalledWhenRelaying(self) -> None:
        """
        When the VM closes after the handshake, the guard is not called and
        the console ends normally with 1000.
        """
        self.h.factory.vnc_guard = RecordingTLSGuard
        conn = self.h.open(self.h.token(VM_TLS_UUID), vm_ref=VM_TLS_UUID)
        self.h.connect_backend(conn)
        conn.from_vm(b"TLS")
        conn.from_vm(b"READY")
        conn.backend.connectionLost(Failure(ConnectionDone()))
        conn.pump.flush()
        [guard] = RecordingTLSGuard.instances
        self.assertEqual(guard.lost, [])
        self.assertEqual(conn.closed[0], 1000)


class VncTLSMapTests(SynchronousTestCase):
    """
    The factory's per-hypervisor C{vnc_tls} map, at start-up and on reload.
    """

    def setUp(self) -> None:
        self.h = VeNCryptHarness(self.mktemp())

    def factory_for(self, hypervisors: Any) -> ConsoleBridgeFactory:
        h = self.h
        return ConsoleBridgeFactory(
            config=replace(h.config, hypervisors=hypervisors),
            token_store=h.tokens,
            locator=h.locator,
            limiter=h.limiter,
            host_policy=h.hosts,
            registry=h.registry,
            observer=h.observer,
            reactor=h.reactor,
        )

    def test_builtPerHypervisor(self) -> None:
        """
        When the factory is built, only hypervisors with vnc_tls are in the
        map, keyed by URI, each loaded from its own files.
        """
        vnc_tls = self.h.factory.vnc_tls
        self.assertEqual(list(vnc_tls), [HV_TLS])
        self.assertIsInstance(vnc_tls[HV_TLS], VncTLS)
        self.assertEqual(vnc_tls[HV_TLS].config.ca_file, self.h.credentials["ca-cert.pem"])
        self.assertEqual(self.factory_for((HypervisorConfig(HV_PLAIN),)).vnc_tls, {})

    def test_badCertificateAtStart(self) -> None:
        """
        When a hypervisor's CA file is not a certificate, building the
        factory raises a ConfigError naming the key.
        """
        junk = write_junk(self.mktemp())
        error = self.assertRaises(
            ConfigError,
            self.factory_for,
            (HypervisorConfig(HV_PLAIN), HypervisorConfig(HV_TLS, vnc_tls=VncTLSConfig(ca_file=junk))),
        )
        self.assertTrue(str(error).startswith("hypervisors[1].vnc_tls.ca_file: "), str(error))

    def test_badCertificateOnReloadKeepsMap(self) -> None:
        """
        When a reload has an unusable certificate, the previous map is kept
        (new consoles still use it), the rest of the config applies, and
        the ConfigError is logged.
        """
        events = capture_logs(self)
        before = self.h.factory.vnc_tls
        junk = write_junk(self.mktemp())
        new = replace(
            self.h.config,
            hypervisors=(HypervisorConfig(HV_TLS, vnc_tls=VncTLSConfig(ca_file=junk)),),
        )
        self.h.factory.reload(new)
        self.assertIs(self.h.factory.vnc_tls, before)
        self.assertIs(self.h.factory.config, new)
        [error] = [e for e in events if e.get("log_level") == LogLevel.error]
        self.assertIn("vnc_tls not reloaded", error["log_format"])
        self.assertTrue(error["error"].startswith("hypervisors[0].vnc_tls.ca_file: "), error["error"])
        RecordingTLSGuard.instances = []
        self.h.factory.vnc_guard = RecordingTLSGuard
        self.h.open(self.h.token(VM_TLS_UUID), vm_ref=VM_TLS_UUID)
        [guard] = RecordingTLSGuard.instances
        self.assertIs(guard.tls.creator, before[HV_TLS].for_host(VM_HOST).creator)

    def test_goodReloadReplacesMap(self) -> None:
        """
        When a reload has usable certificates (e.g. a renewed CA), they are
        read again and new consoles use them.
        """
        renewed = write_x509_credentials(os.path.join(self.mktemp(), "renewed"))
        before = self.h.factory.vnc_tls[HV_TLS]
        self.h.factory.reload(
            replace(
                self.h.config,
                hypervisors=(HypervisorConfig(HV_TLS, vnc_tls=VncTLSConfig(ca_file=renewed["ca-cert.pem"])),),
            )
        )
        after = self.h.factory.vnc_tls[HV_TLS]
        self.assertIsNot(after, before)
        self.assertEqual(after.config.ca_file, renewed["ca-cert.pem"])
        RecordingTLSGuard.instances = []
        self.h.factory.vnc_guard = RecordingTLSGuard
        self.h.open(self.h.token(VM_TLS_UUID), vm_ref=VM_TLS_UUID)
        [guard] = RecordingTLSGuard.instances
        self.assertIs(guard.tls.creator, after.for_host(VM_HOST).creator)
