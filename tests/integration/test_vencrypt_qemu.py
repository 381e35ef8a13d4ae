"""
The RFB guard's VeNCrypt (X.509) against a real QEMU on loopback.

Each test writes a fresh CA and server certificate (CN and SAN 127.0.0.1),
starts C{qemu-system-x86_64} with C{tls-creds-x509} on its VNC server and a
VNC password, and drives the guard through the TCP harness of
L{tests.integration.test_guards_qemu}, whose sink implements C{start_tls}
with C{transport.startTLS}.
"""

from __future__ import annotations

import os
import struct
from typing import Optional

from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from tests.integration.qemu_fixture import start_qemu, write_dh_params, write_x509_credentials
from tests.integration.test_guards_qemu import LoopSink, VNC_PASSWORD, novnc_browser
from vaporproxy.config import VncTLSConfig
from vaporproxy.errors import ErrorCode
from vaporproxy.guards.rfb import SEC_VENCRYPT, RFBGuard
from vaporproxy.guards.vencrypt import VENCRYPT_TLS_VNC, VENCRYPT_X509_VNC, VncTLS


class VeNCryptQemuTests(TestCase):
    """
    VeNCrypt X509Vnc between the guard and QEMU's VNC server.
    """

    timeout = 30

    def setUp(self) -> None:
        base = self.mktemp()
        self.server_dir = os.path.join(base, "qemu")
        self.files = write_x509_credentials(self.server_dir)
        self.qemu = start_qemu(self, vnc_password=VNC_PASSWORD, vnc_tls_dir=self.server_dir)
        # Another CA, not the one that signed QEMU's certificate.
        self.other = write_x509_credentials(os.path.join(base, "other"), ca_name="some other CA")

    def _console(self, password: Optional[str], config: VncTLSConfig, host: str = "127.0.0.1") -> LoopSink:
        sink = LoopSink(self.qemu.vnc_port, novnc_browser())
        sink.guard = RFBGuard(sink, password, tls=VncTLS(config).for_host(host))
        self.addCleanup(sink.close)
        sink.guard.start()
        sink.dial()
        return sink

    async def _right_password(self) -> None:
        sink = self._console(VNC_PASSWORD, VncTLSConfig(ca_file=self.files["ca-cert.pem"]))
        # ServerInit: u16 width, u16 height, 16-byte pixel format, u32 name length.
        sink.relayed_wanted = 24
        self.assertEqual(await sink.done, "relayed")
        self.assertEqual(sink.guard.security_type, SEC_VENCRYPT)
        self.assertEqual(sink.guard.vencrypt_subtype, VENCRYPT_X509_VNC)
        self.assertEqual(sink.events, [("start_tls",), ("established",)])
        self.assertEqual(sink.to_client[:18], b"RFB 003.008\n\x01\x01\x00\x00\x00\x00")
        width, height = struct.unpack("!HH", sink.relayed[:4])
        self.assertGreater(width, 0)
        self.assertGreater(height, 0)
        # The relay really runs over TLS: the transport has a TLS session.
        self.assertIsNotNone(sink.transport.getPeerCertificate())

    def test_x509_vnc_right_password(self) -> Deferred:
        """
        When the guard trusts QEMU's CA and knows the password, X509Vnc
        succeeds and ServerInit arrives over TLS after the browser's
        ClientInit.
        """
        return Deferred.fromCoroutine(self._right_password())

    async def _fails(self, sink: LoopSink, text: str) -> None:
        self.assertEqual(await sink.done, ErrorCode.CONNECTION_FAILED)
        self.assertNotIn(("established",), sink.events)
        fails = [e for e in sink.events if e[0] == "fail"]
        self.assertEqual(len(fails), 1)
        self.assertIn(text, fails[0][2])

    def test_wrong_ca(self) -> Deferred:
        """
        When QEMU's certificate is not signed by the configured CA, the TLS
        handshake fails and the guard fails with CONNECTION_FAILED, logging
        OpenSSL's reason.
        """
        sink = self._console(VNC_PASSWORD, VncTLSConfig(ca_file=self.other["ca-cert.pem"]))
        return Deferred.fromCoroutine(self._fails(sink, "TLS handshake with the VM failed: certificate verify failed"))

    def test_wrong_name(self) -> Deferred:
        """
        When the certificate does not carry the expected server name, the
        guard fails with CONNECTION_FAILED naming the mismatch.
        """
        config = VncTLSConfig(ca_file=self.files["ca-cert.pem"], server_name="vm.example.com")
        sink = self._console(VNC_PASSWORD, config)
        return Deferred.fromCoroutine(self._fails(sink, "TLS handshake with the VM failed: VerificationError"))

    def test_wrong_password(self) -> Deferred:
        """
        When TLS succeeds but the password is wrong, QEMU refuses the VNC
        authentication inside TLS and the guard fails with CONNECTION_FAILED.
        """
        sink = self._console("not-it", VncTLSConfig(ca_file=self.files["ca-cert.pem"]))
        return Deferred.fromCoroutine(self._fails(sink, "console authentication failed"))

    def test_unverified(self) -> Deferred:
        """
        When verification is turned off explicitly, a certificate from an
        unknown CA is accepted and the console is established.
        """
        sink = self._console(VNC_PASSWORD, VncTLSConfig(verify=False))

        async def check() -> None:
            self.assertEqual(await sink.done, "established")
            self.assertEqual(sink.guard.vencrypt_subtype, VENCRYPT_X509_VNC)

        return Deferred.fromCoroutine(check())

    def test_no_tls_configured(self) -> Deferred:
        """
        When the guard has no TLS settings, QEMU's VeNCrypt-only server is
        refused with a reason naming vnc_tls.
        """
        sink = LoopSink(self.qemu.vnc_port, novnc_browser())
        sink.guard = RFBGuard(sink, VNC_PASSWORD)
        self.addCleanup(sink.close)
        sink.guard.start()
        sink.dial()
        return Deferred.fromCoroutine(self._fails(sink, "vnc_tls"))


class AnonymousTLSQemuTests(TestCase):
    """
    VeNCrypt TLSVnc (anonymous TLS, C{tls-creds-anon}) between the guard
    and QEMU: refused unless C{allow_anonymous} is set.
    """

    timeout = 30

    def setUp(self) -> None:
        directory = self.mktemp()
        write_dh_params(directory)
        self.qemu = start_qemu(self, vnc_password=VNC_PASSWORD, vnc_tls_dir=directory, vnc_tls_anonymous=True)

    def _console(self, config: VncTLSConfig) -> LoopSink:
        sink = LoopSink(self.qemu.vnc_port, novnc_browser())
        sink.guard = RFBGuard(sink, VNC_PASSWORD, tls=VncTLS(config).for_host("127.0.0.1"))
        self.addCleanup(sink.close)
        sink.guard.start()
        sink.dial()
        return sink

    async def _allowed(self) -> None:
        sink = self._console(VncTLSConfig(verify=False, allow_anonymous=True))
        sink.relayed_wanted = 24
        self.assertEqual(await sink.done, "relayed")
        self.assertEqual(sink.guard.vencrypt_subtype, VENCRYPT_TLS_VNC)
        self.assertEqual(sink.events, [("start_tls",), ("established",)])
        # Encrypted, with no certificate from QEMU.
        self.assertTrue(sink.transport.TLS)
        self.assertIsNone(sink.transport.getPeerCertificate())

    def test_allowed(self) -> None:
        """
        When allow_anonymous is set, the guard runs TLSVnc with QEMU and
        ServerInit arrives.
        """
        return Deferred.fromCoroutine(self._allowed())

    async def _refused(self) -> None:
        sink = self._console(VncTLSConfig(verify=False))
        self.assertEqual(await sink.done, ErrorCode.CONNECTION_FAILED)
        self.assertIn("anonymous TLS", sink.events[-1][2])
        self.assertNotIn(("start_tls",), sink.events)

    def test_refused_by_default(self) -> None:
        """
        When allow_anonymous is off, a VM offering only TLSVnc is refused
        before any TLS is started.
        """
        return Deferred.fromCoroutine(self._refused())
