"""
Tests for L{vaporproxy.guards.vencrypt}: VeNCrypt as the RFB guard speaks it
(the TLS layer itself is the caller's), the TLS settings (checked with real
TLS in memory) and the log descriptions.
"""

from __future__ import annotations

import os
from typing import Optional

from OpenSSL import SSL
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.ssl import Certificate, CertificateOptions, PrivateCertificate
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tests.guards.playbook import (
    ClientData,
    Playbook,
    RecordingSink,
    ServerConnected,
    ServerData,
    ServerLost,
    Start,
    assert_plays,
)
from tests.guards.rfb_scripts import (
    ANON_CREATOR,
    CHALLENGE,
    PASSWORD,
    X509_CREATOR,
    client_script,
    expected_to_client,
    server_script,
    u32,
    vencrypt_before_tls,
    vencrypt_tls,
    version,
)
from tests.integration.qemu_fixture import write_x509_credentials
from vaporproxy.config import ConfigError, HypervisorConfig, VncTLSConfig
from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.guards.kit import Established, Failed, SendToClient, SendToServer, StartTLS
from vaporproxy.guards.rfb import SEC_VENCRYPT, RFBGuard, vnc_auth_response
from vaporproxy.guards.vencrypt import (
    VENCRYPT_TLS_NONE,
    VENCRYPT_TLS_VNC,
    VENCRYPT_X509_NONE,
    VENCRYPT_X509_VNC,
    AnonymousTLSCreator,
    VncTLS,
    describe_connection_lost,
    subtype_name,
    vnc_tls_by_uri,
)


class VeNCryptHandshakeTests(SynchronousTestCase):
    """
    Successful VeNCrypt handshakes of L{RFBGuard}: the TLS layer itself is
    the sink's (C{start_tls}), so here the bytes after it are plaintext.
    """

    def guard(
        self, password: Optional[str] = PASSWORD, anonymous: bool = False
    ) -> "tuple[RFBGuard, RecordingSink]":
        sink = RecordingSink()
        guard = RFBGuard(sink, password, tls=vencrypt_tls(anonymous))
        guard.start()
        guard.server_connected()
        return guard, sink

    def test_x509_vnc(self) -> None:
        """
        When the VM offers X509None and X509Vnc and a password is known, the
        guard picks X509Vnc, starts TLS right after the VM's ack, answers
        the challenge inside TLS and forwards ClientInit.
        """
        guard, sink = self.guard()
        guard.client_data(client_script(8))
        guard.server_data(vencrypt_before_tls([VENCRYPT_X509_NONE, VENCRYPT_X509_VNC]))
        self.assertEqual(sink.calls[-1], ("start_tls", X509_CREATOR))
        clear = version(8) + b"\x13" + b"\x00\x02" + u32(VENCRYPT_X509_VNC)
        self.assertEqual(sink.to_server, clear)
        guard.server_data(CHALLENGE + u32(0) + b"SERVERINIT")
        self.assertEqual(sink.to_server, clear + vnc_auth_response(PASSWORD, CHALLENGE) + b"\x01")
        self.assertEqual(sink.names(), ["start_tls", "established"])
        self.assertEqual(sink.calls[-2], ("send_to_client", b"SERVERINIT"))
        self.assertEqual(guard.security_type, SEC_VENCRYPT)
        self.assertEqual(guard.vencrypt_subtype, VENCRYPT_X509_VNC)
        self.assertEqual(sink.to_client, expected_to_client(8) + b"SERVERINIT")

    def test_byte_at_a_time(self) -> None:
        """
        When both sides arrive one byte at a time, in either order, the
        VeNCrypt handshake gives the same bytes and calls as in one piece.
        """
        server = vencrypt_before_tls([VENCRYPT_X509_VNC]) + CHALLENGE + u32(0)
        client = client_script(8)
        for server_first in (False, True):
            guard, sink = self.guard()
            sides = [(guard.client_data, client), (guard.server_data, server)]
            if server_first:
                sides.reverse()
            for feed, data in sides:
                for i in range(len(data)):
                    feed(data[i : i + 1])
            self.assertEqual(
                sink.to_server,
                version(8) + b"\x13\x00\x02" + u32(VENCRYPT_X509_VNC)
                + vnc_auth_response(PASSWORD, CHALLENGE) + b"\x01",
            )  # fmt: skip
            self.assertEqual(sink.names(), ["start_tls", "established"], server_first)

    def test_start_tls_before_inner_auth(self) -> None:
        """
        When the sub-type ack arrives, start_tls is the last call made, and
        nothing is written to the VM after it until the VM speaks inside TLS.
        """
        guard, sink = self.guard()
        guard.client_data(client_script(8))
        guard.server_data(vencrypt_before_tls([VENCRYPT_X509_VNC]))
        index = [c[0] for c in sink.calls].index("start_tls")
        self.assertEqual(index, len(sink.calls) - 1)
        self.assertEqual(sink.calls[index - 1], ("send_to_server", u32(VENCRYPT_X509_VNC)))

    def test_x509_none_without_password(self) -> None:
        """
        When no password is known and the VM offers X509None, the guard
        picks it, answers no challenge, and reads the SecurityResult.
        """
        guard, sink = self.guard(password=None)
        guard.client_data(client_script(8))
        guard.server_data(vencrypt_before_tls([VENCRYPT_X509_VNC, VENCRYPT_X509_NONE]))
        guard.server_data(u32(0))
        self.assertEqual(sink.to_server, version(8) + b"\x13\x00\x02" + u32(VENCRYPT_X509_NONE) + b"\x01")
        self.assertEqual(sink.names(), ["start_tls", "established"])

    def test_x509_none_with_password(self) -> None:
        """
        When a password is known but the VM only offers X509None, the guard
        uses X509None.
        """
        guard, sink = self.guard()
        guard.client_data(client_script(8))
        guard.server_data(vencrypt_before_tls([VENCRYPT_X509_NONE]))
        guard.server_data(u32(0))
        self.assertEqual(guard.vencrypt_subtype, VENCRYPT_X509_NONE)
        self.assertEqual(sink.names(), ["start_tls", "established"])

    def test_rfb37_reads_security_result(self) -> None:
        """
        When the VM speaks RFB 3.7, the SecurityResult after X509None is
        still read (VeNCrypt is not security type None).
        """
        guard, sink = self.guard(password=None)
        guard.client_data(client_script(7))
        guard.server_data(vencrypt_before_tls([VENCRYPT_X509_NONE], minor=7))
        self.assertEqual(sink.names(), ["start_tls"])
        guard.server_data(u32(0) + b"SI")
        self.assertEqual(sink.names(), ["start_tls", "established"])
        self.assertEqual(sink.calls[-2], ("send_to_client", b"SI"))

    def test_newer_vencrypt_version(self) -> None:
        """
        When the VM announces VeNCrypt 0.3, the guard answers 0.2.
        """
        guard, sink = self.guard()
        guard.client_data(client_script(8))
        guard.server_data(vencrypt_before_tls([VENCRYPT_X509_VNC], vencrypt=b"\x00\x03"))
        guard.server_data(CHALLENGE + u32(0))
        self.assertIn(b"\x13\x00\x02", sink.to_server)
        self.assertEqual(sink.names(), ["start_tls", "established"])

    def test_prefers_vencrypt(self) -> None:
        """
        When the VM offers VNC auth and VeNCrypt and TLS is configured, the
        guard picks VeNCrypt; without TLS settings it picks VNC auth.
        """
        guard, sink = self.guard()
        guard.server_data(version(8) + b"\x02\x02\x13")
        self.assertEqual(sink.to_server, version(8) + b"\x13")
        sink = RecordingSink()
        plain = RFBGuard(sink, PASSWORD)
        plain.start()
        plain.server_connected()
        plain.server_data(version(8) + b"\x02\x02\x13")
        self.assertEqual(sink.to_server, version(8) + b"\x02")

    def test_rfb33_vencrypt(self) -> None:
        """
        When an RFB 3.3 VM announces security type 19, the guard goes on
        with VeNCrypt without sending a choice byte.
        """
        guard, sink = self.guard()
        guard.client_data(client_script(8))
        guard.server_data(version(3) + u32(19) + b"\x00\x02\x00\x01" + u32(VENCRYPT_X509_VNC) + b"\x01")
        self.assertEqual(sink.to_server, version(3) + b"\x00\x02" + u32(VENCRYPT_X509_VNC))
        guard.server_data(CHALLENGE + u32(0))
        self.assertEqual(sink.names(), ["start_tls", "established"])

    def test_anonymous_allowed(self) -> None:
        """
        When anonymous TLS is allowed and the VM only offers TLSVnc, the
        guard uses it with the anonymous creator; X.509 is still preferred
        when offered.
        """
        guard, sink = self.guard(anonymous=True)
        guard.client_data(client_script(8))
        guard.server_data(vencrypt_before_tls([VENCRYPT_TLS_NONE, VENCRYPT_TLS_VNC]))
        guard.server_data(CHALLENGE + u32(0))
        self.assertEqual(guard.vencrypt_subtype, VENCRYPT_TLS_VNC)
        self.assertIn(("start_tls", ANON_CREATOR), sink.calls)
        self.assertEqual(sink.names(), ["start_tls", "established"])

        guard, sink = self.guard(password=None, anonymous=True)
        guard.server_data(vencrypt_before_tls([VENCRYPT_TLS_NONE, VENCRYPT_X509_NONE]))
        self.assertEqual(guard.vencrypt_subtype, VENCRYPT_X509_NONE)
        self.assertIn(("start_tls", X509_CREATOR), sink.calls)


class VeNCryptFailureTests(SynchronousTestCase):
    """
    VeNCrypt handshakes L{RFBGuard} refuses: lying or unusable VMs.
    """

    def run_server(
        self, data: bytes, password: Optional[str] = PASSWORD, anonymous: bool = False
    ) -> "tuple[RFBGuard, RecordingSink]":
        sink = RecordingSink()
        guard = RFBGuard(sink, password, tls=vencrypt_tls(anonymous))
        guard.start()
        guard.server_connected()
        guard.client_data(client_script(8))
        for i in range(len(data)):
            guard.server_data(data[i : i + 1])
        return guard, sink

    def assertFailed(self, sink: RecordingSink, text: str) -> None:
        failure = sink.failure()
        self.assertIsNotNone(failure)
        assert failure is not None
        self.assertEqual(failure[1], ErrorCode.CONNECTION_FAILED)
        self.assertIn(text, failure[2])
        self.assertNotIn("established", sink.names())
        self.assertEqual(sink.names().count("fail"), 1)

    def test_no_downgrade_to_vnc_auth(self) -> None:
        """
        When TLS is configured but the VM offers only VNC authentication,
        the guard fails and no DES answer (nor anything) goes out in clear.
        """
        _, sink = self.run_server(version(8) + b"\x01\x02" + CHALLENGE)
        self.assertFailed(sink, "does not offer VeNCrypt")
        self.assertEqual(sink.to_server, version(8))

    def test_no_downgrade_to_none(self) -> None:
        """
        When TLS is configured but the VM offers only None, the guard fails.
        """
        _, sink = self.run_server(version(8) + b"\x01\x01")
        self.assertFailed(sink, "does not offer VeNCrypt")
        self.assertEqual(sink.to_server, version(8))

    def test_old_vencrypt_version(self) -> None:
        """
        When the VM speaks VeNCrypt 0.1, the guard fails without answering.
        """
        _, sink = self.run_server(version(8) + b"\x01\x13\x00\x01")
        self.assertFailed(sink, "VeNCrypt 0.1")
        self.assertEqual(sink.to_server, version(8) + b"\x13")

    def test_version_refused(self) -> None:
        """
        When the VM refuses version 0.2 (ack not 0), the guard fails.
        """
        _, sink = self.run_server(version(8) + b"\x01\x13\x00\x02\x01")
        self.assertFailed(sink, "refused VeNCrypt version")

    def test_no_subtypes(self) -> None:
        """
        When the VM lists no sub-type, the guard fails.
        """
        _, sink = self.run_server(version(8) + b"\x01\x13\x00\x02\x00\x00")
        self.assertFailed(sink, "no VeNCrypt sub-type")

    def test_no_acceptable_subtype(self) -> None:
        """
        When the VM offers only Plain, X509Plain and SASL sub-types, the
        guard fails naming them and sends no choice.
        """
        data = version(8) + b"\x01\x13\x00\x02\x00\x03" + u32(256) + u32(262) + u32(264)
        _, sink = self.run_server(data)
        self.assertFailed(sink, "no acceptable VeNCrypt sub-type among: Plain (256), X509Plain (262), X509SASL (264)")
        self.assertEqual(sink.to_server, version(8) + b"\x13\x00\x02")

    def test_anonymous_refused_by_default(self) -> None:
        """
        When the VM only offers anonymous TLS and it is not allowed, the
        guard fails saying so.
        """
        _, sink = self.run_server(vencrypt_before_tls([VENCRYPT_TLS_VNC, VENCRYPT_TLS_NONE]))
        self.assertFailed(sink, "anonymous TLS")
        self.assertNotIn("start_tls", sink.names())

    def test_x509_vnc_without_password(self) -> None:
        """
        When the VM only offers X509Vnc and no password is known, the guard
        fails saying so.
        """
        _, sink = self.run_server(vencrypt_before_tls([VENCRYPT_X509_VNC]), password=None)
        self.assertFailed(sink, "no password is known")

    def test_subtype_refused(self) -> None:
        """
        When the VM answers the sub-type choice with anything but 1, the
        guard fails and never starts TLS.
        """
        for ack in (b"\x00", b"\x02"):
            data = vencrypt_before_tls([VENCRYPT_X509_VNC])[:-1] + ack
            _, sink = self.run_server(data)
            self.assertFailed(sink, "refused VeNCrypt sub-type X509Vnc (261)")
            self.assertNotIn("start_tls", sink.names())

    def test_data_before_tls(self) -> None:
        """
        When the VM sends bytes after its ack, before the TLS handshake, the
        guard fails instead of treating them as TLS plaintext.
        """
        sink = RecordingSink()
        guard = RFBGuard(sink, PASSWORD, tls=vencrypt_tls())
        guard.start()
        guard.server_connected()
        guard.server_data(vencrypt_before_tls([VENCRYPT_X509_VNC]) + CHALLENGE)
        self.assertFailed(sink, "before the TLS handshake")
        self.assertNotIn("start_tls", sink.names())

    def test_huge_subtype_count_waits(self) -> None:
        """
        When the VM announces 255 sub-types but sends fewer, the guard
        waits without choosing.
        """
        _, sink = self.run_server(version(8) + b"\x01\x13\x00\x02\x00\xff" + u32(VENCRYPT_X509_VNC))
        self.assertEqual(sink.to_server, version(8) + b"\x13\x00\x02")
        self.assertEqual(sink.names(), [])

    def test_auth_failure_inside_tls(self) -> None:
        """
        When the VM rejects the password after TLS, the guard fails with
        "console authentication failed" and the VM's reason.
        """
        reason = b"Authentication failed"
        data = vencrypt_before_tls([VENCRYPT_X509_VNC]) + CHALLENGE + u32(1) + u32(len(reason)) + reason
        _, sink = self.run_server(data)
        self.assertFailed(sink, "console authentication failed: Authentication failed")
        self.assertEqual(sink.names(), ["start_tls", "fail"])

    def test_tls_handshake_failure(self) -> None:
        """
        When the VM connection is lost after start_tls and before any
        plaintext, the guard fails naming the TLS error.
        """
        guard, sink = self.run_server(vencrypt_before_tls([VENCRYPT_X509_VNC]))
        error = SSL.Error([("SSL routines", "", "certificate verify failed")])
        guard.server_lost(Failure(error))
        self.assertFailed(sink, "TLS handshake with the VM failed: certificate verify failed")

    def test_lost_after_tls(self) -> None:
        """
        When the VM closes after the TLS handshake (plaintext seen), the
        guard fails saying the VM closed the connection.
        """
        guard, sink = self.run_server(vencrypt_before_tls([VENCRYPT_X509_VNC]) + CHALLENGE[:3])
        guard.server_lost(Failure(ConnectionDone()))
        self.assertFailed(sink, "VM closed the connection during the handshake: ConnectionDone")

    def test_lost_without_vencrypt(self) -> None:
        """
        When the VM closes during a plain handshake, the guard fails with
        CONNECTION_FAILED; after established(), server_lost does nothing.
        """
        sink = RecordingSink()
        guard = RFBGuard(sink, PASSWORD)
        guard.start()
        guard.server_connected()
        guard.server_lost(Failure(ConnectionLost("reset")))
        self.assertFailed(sink, "VM closed the connection during the handshake: ConnectionLost")

        sink = RecordingSink()
        guard = RFBGuard(sink, PASSWORD)
        guard.start()
        guard.server_connected()
        guard.client_data(client_script(8))
        guard.server_data(server_script(8, (2,), 2))
        before = list(sink.calls)
        guard.server_lost(None)
        self.assertEqual(sink.calls, before)
        self.assertEqual(sink.names(), ["established"])


class DescribeTests(SynchronousTestCase):
    """
    Log descriptions for VeNCrypt.
    """

    def test_subtype_names(self) -> None:
        """
        When a sub-type is named, known ones get their name and number,
        unknown ones just the number.
        """
        self.assertEqual(subtype_name(261), "X509Vnc (261)")
        self.assertEqual(subtype_name(257), "TLSNone (257)")
        self.assertEqual(subtype_name(9999), "9999")

    def test_connection_lost(self) -> None:
        """
        When a connection-lost reason is described, OpenSSL errors give
        their reasons, other exceptions their name and message.
        """
        ssl_error = SSL.Error([("SSL routines", "", "tlsv1 alert unknown ca"), ("x", "", "second")])
        self.assertEqual(describe_connection_lost(Failure(ssl_error)), "tlsv1 alert unknown ca; second")
        self.assertEqual(describe_connection_lost(ValueError("boom")), "ValueError: boom")
        self.assertEqual(describe_connection_lost(None), "connection closed")


class VeNCryptPlaybookTests(SynchronousTestCase):
    """
    The typed outputs of a VeNCrypt handshake, in one piece and one byte at
    a time.
    """

    def test_x509_vnc(self) -> None:
        """
        When the VM offers X509None and X509Vnc and a password is known,
        StartTLS with the X.509 creator follows the chosen sub-type, and
        the DES answer, ClientInit and Established come from the plaintext.
        """
        book = Playbook(lambda: RFBGuard(None, PASSWORD, tls=vencrypt_tls()))
        book >> Start() << SendToClient(version(8)) >> ServerConnected()
        book >> ClientData(client_script(8)) << SendToClient(b"\x01\x01") << SendToClient(u32(0))
        book >> ServerData(vencrypt_before_tls([VENCRYPT_X509_NONE, VENCRYPT_X509_VNC])) << SendToServer(
            version(8)
        ) << SendToServer(b"\x13") << SendToServer(b"\x00\x02") << SendToServer(u32(VENCRYPT_X509_VNC)) << StartTLS(
            X509_CREATOR
        )
        book >> ServerData(CHALLENGE) << SendToServer(vnc_auth_response(PASSWORD, CHALLENGE))
        book >> ServerData(u32(0)) << SendToServer(b"\x01") << Established()
        assert_plays(self, book)
        self.assertEqual(book.guard.vencrypt_subtype, VENCRYPT_X509_VNC)

    def test_tls_handshake_failure(self) -> None:
        """
        When the VM connection is lost after StartTLS and before any
        plaintext, server_lost hands out Failed naming OpenSSL's reason.
        """
        error = SSL.Error([("SSL routines", "", "certificate verify failed")])
        book = Playbook(lambda: RFBGuard(None, None, tls=vencrypt_tls()))
        book >> ServerConnected() >> ServerData(vencrypt_before_tls([VENCRYPT_X509_NONE])) << SendToServer(
            version(8)
        ) << SendToServer(b"\x13") << SendToServer(b"\x00\x02") << SendToServer(u32(VENCRYPT_X509_NONE)) << StartTLS(
            X509_CREATOR
        )
        book >> ServerLost(Failure(error)) << Failed(
            ConsoleError(ErrorCode.CONNECTION_FAILED), "TLS handshake with the VM failed: certificate verify failed"
        )
        assert_plays(self, book)

    def test_anonymous_refused(self) -> None:
        """
        When the VM offers only anonymous TLS and it is not allowed, the
        sub-types hand out Failed instead of a choice.
        """
        book = Playbook(lambda: RFBGuard(None, PASSWORD, tls=vencrypt_tls()))
        book >> ServerConnected() >> ServerData(vencrypt_before_tls([VENCRYPT_TLS_VNC])) << SendToServer(
            version(8)
        ) << SendToServer(b"\x13") << SendToServer(b"\x00\x02") << Failed(
            ConsoleError(ErrorCode.CONNECTION_FAILED),
            "VM offers only anonymous TLS (unauthenticated; allow_anonymous is off): TLSVnc (258)",
        )
        assert_plays(self, book)


# ---------------------------------------------------------------------------
# TLS settings, checked with real TLS in memory
# ---------------------------------------------------------------------------


@implementer(IHandshakeListener)
class _Recorder(Protocol):
    """
    The client end of an in-memory TLS connection: records whether the
    handshake completed and why the connection was lost.
    """

    def __init__(self) -> None:
        self.handshake = False
        self.lost: Optional[Failure] = None

    def handshakeCompleted(self) -> None:
        self.handshake = True

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = reason


class VncTLSTests(SynchronousTestCase):
    """
    L{VncTLS}: the connection creators built from a C{vnc_tls} section,
    tried against a TLS server in memory (L{iosim}).
    """

    def setUp(self) -> None:
        base = self.mktemp()
        self.vm = write_x509_credentials(os.path.join(base, "vm"), names=("127.0.0.1", "vm1.example.com"))
        self.other = write_x509_credentials(os.path.join(base, "other"), ca_name="other CA")
        with open(self.vm["server-cert.pem"], "rb") as c, open(self.vm["server-key.pem"], "rb") as k:
            self.server_options = PrivateCertificate.loadPEM(c.read() + k.read()).options()

    def handshake(self, creator: object) -> _Recorder:
        recorder = _Recorder()
        server = TLSMemoryBIOFactory(self.server_options, False, Factory.forProtocol(Protocol))
        client = TLSMemoryBIOFactory(creator, True, ClientFactory.forProtocol(lambda: recorder))
        _, _, pump = connectedServerAndClient(lambda: server.buildProtocol(None), lambda: client.buildProtocol(None))
        pump.flush()
        return recorder

    def assertConnected(self, recorder: _Recorder) -> None:
        self.assertTrue(recorder.handshake)
        self.assertIsNone(recorder.lost)

    def test_trusted_ca_and_address(self) -> None:
        """
        When the CA signed the VM's certificate and it names the dialled
        address, the handshake completes.
        """
        tls = VncTLS(VncTLSConfig(ca_file=self.vm["ca-cert.pem"]))
        self.assertConnected(self.handshake(tls.for_host("127.0.0.1").creator))
        self.assertConnected(self.handshake(tls.for_host("vm1.example.com").creator))

    def test_other_ca(self) -> None:
        """
        When the configured CA did not sign the VM's certificate, the
        handshake fails with certificate verify failed.
        """
        tls = VncTLS(VncTLSConfig(ca_file=self.other["ca-cert.pem"]))
        recorder = self.handshake(tls.for_host("127.0.0.1").creator)
        self.assertFalse(recorder.handshake)
        self.assertIn("certificate verify failed", describe_connection_lost(recorder.lost))

    def test_name_mismatch(self) -> None:
        """
        When the dialled name, or the configured server_name, is not in the
        certificate, the connection is refused.
        """
        tls = VncTLS(VncTLSConfig(ca_file=self.vm["ca-cert.pem"]))
        recorder = self.handshake(tls.for_host("127.0.0.2").creator)
        self.assertIn("VerificationError", describe_connection_lost(recorder.lost))
        named = VncTLS(VncTLSConfig(ca_file=self.vm["ca-cert.pem"], server_name="vm2.example.com"))
        recorder = self.handshake(named.for_host("127.0.0.1").creator)
        self.assertIn("VerificationError", describe_connection_lost(recorder.lost))

    def test_server_name_overrides_host(self) -> None:
        """
        When server_name is configured, it is checked instead of the dialled
        address.
        """
        named = VncTLS(VncTLSConfig(ca_file=self.vm["ca-cert.pem"], server_name="vm1.example.com"))
        self.assertConnected(self.handshake(named.for_host("10.9.9.9").creator))

    def test_verify_off(self) -> None:
        """
        When verify is false, a certificate from an unknown CA and name is
        accepted.
        """
        tls = VncTLS(VncTLSConfig(verify=False))
        creator = tls.for_host("anything").creator
        self.assertIsInstance(creator, CertificateOptions)
        self.assertConnected(self.handshake(creator))

    def test_client_certificate(self) -> None:
        """
        When cert_file and key_file are set, the proxy presents that
        certificate to a VM that asks for one.
        """
        client = write_x509_credentials(self.mktemp(), names=("proxy.example.com",), ca_name="client CA")
        with open(client["ca-cert.pem"], "rb") as f:
            client_ca = Certificate.loadPEM(f.read())
        with open(self.vm["server-cert.pem"], "rb") as c, open(self.vm["server-key.pem"], "rb") as k:
            # A VM that requires a client certificate from client_ca.
            self.server_options = PrivateCertificate.loadPEM(c.read() + k.read()).options(client_ca)
        tls = VncTLS(
            VncTLSConfig(
                ca_file=self.vm["ca-cert.pem"], cert_file=client["server-cert.pem"], key_file=client["server-key.pem"]
            )
        )
        self.assertConnected(self.handshake(tls.for_host("127.0.0.1").creator))
        # Without the client certificate the VM refuses (with TLS 1.3 by an
        # alert after the client's side of the handshake).
        bare = VncTLS(VncTLSConfig(ca_file=self.vm["ca-cert.pem"]))
        recorder = self.handshake(bare.for_host("127.0.0.1").creator)
        self.assertIn("certificate required", describe_connection_lost(recorder.lost))

    def test_creators_cached(self) -> None:
        """
        When the same host is asked for twice, the same creator is returned;
        anonymous is only set when allowed.
        """
        tls = VncTLS(VncTLSConfig(ca_file=self.vm["ca-cert.pem"]))
        self.assertIs(tls.for_host("127.0.0.1").creator, tls.for_host("127.0.0.1").creator)
        self.assertIsNot(tls.for_host("127.0.0.1").creator, tls.for_host("vm1.example.com").creator)
        self.assertIsNone(tls.for_host("127.0.0.1").anonymous)
        anon = VncTLS(VncTLSConfig(ca_file=self.vm["ca-cert.pem"], allow_anonymous=True))
        self.assertIsInstance(anon.for_host("127.0.0.1").anonymous, AnonymousTLSCreator)

    def test_bad_files(self) -> None:
        """
        When the CA file is not PEM, the key does not parse or does not
        match the certificate, a ConfigError names the key.
        """
        junk = self.mktemp()
        with open(junk, "w") as f:
            f.write("not a certificate\n")
        error = self.assertRaises(ConfigError, VncTLS, VncTLSConfig(ca_file=junk), "hypervisors[0].vnc_tls")
        self.assertIn("hypervisors[0].vnc_tls.ca_file", str(error))
        error = self.assertRaises(
            ConfigError, VncTLS, VncTLSConfig(cert_file=self.vm["server-cert.pem"], key_file=junk)
        )
        self.assertIn("vnc_tls.key_file", str(error))
        error = self.assertRaises(
            ConfigError,
            VncTLS,
            VncTLSConfig(cert_file=self.vm["server-cert.pem"], key_file=self.other["server-key.pem"]),
        )
        self.assertIn("is not the key of", str(error))

    def test_by_uri(self) -> None:
        """
        When hypervisors are configured, only those with vnc_tls get an
        entry, keyed by URI.
        """
        found = vnc_tls_by_uri(
            [
                HypervisorConfig("qemu:///system"),
                HypervisorConfig("qemu+tls://h2/system", vnc_tls=VncTLSConfig(ca_file=self.vm["ca-cert.pem"])),
            ]
        )
        self.assertEqual(list(found), ["qemu+tls://h2/system"])
        self.assertIsInstance(found["qemu+tls://h2/system"], VncTLS)
