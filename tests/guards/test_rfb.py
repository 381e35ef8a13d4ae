"""
Tests for L{vaporproxy.guards.rfb}: the VNC security handshake done by the proxy.
"""

from __future__ import annotations

import gc
import os
import struct
import weakref
from typing import List, Optional, Sequence

from OpenSSL import SSL
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.ssl import Certificate, CertificateOptions, PrivateCertificate
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from vncdotool.rfb import _vnc_des, des_encrypt
from zope.interface import implementer

from tests.integration.qemu_fixture import write_x509_credentials
from vaporproxy.config import ConfigError, HypervisorConfig, VncTLSConfig
from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.guards.rfb import (
    MAX_CLIENT_BUFFER,
    MAX_REASON_LENGTH,
    MAX_SERVER_BUFFER,
    SEC_VENCRYPT,
    VENCRYPT_TLS_NONE,
    VENCRYPT_TLS_VNC,
    VENCRYPT_X509_NONE,
    VENCRYPT_X509_VNC,
    AnonymousTLSCreator,
    RFBGuard,
    StepReader,
    VeNCryptTLS,
    VncTLS,
    describe_connection_lost,
    effective_version,
    parse_version,
    reverse_bits,
    subtype_name,
    vnc_auth_response,
    vnc_des_key,
    vnc_tls_by_uri,
)

PASSWORD = "s3cr3t-pw"
CHALLENGE = bytes(range(16))


class RecordingSink:
    """
    A guard sink that records every call.

    @ivar calls: every call as C{(method, *args)}, in order.
    """

    def __init__(self) -> None:
        self.calls: List[tuple] = []
        self.to_client = b""
        self.to_server = b""

    def send_to_client(self, data: bytes) -> None:
        self.calls.append(("send_to_client", data))
        self.to_client += data

    def send_to_server(self, data: bytes) -> None:
        self.calls.append(("send_to_server", data))
        self.to_server += data

    def admit(self, is_main: bool) -> None:
        self.calls.append(("admit", is_main))

    def spice_session(self, session_id: int) -> None:
        self.calls.append(("spice_session", session_id))

    def established(self) -> None:
        self.calls.append(("established",))

    def fail(self, error: ConsoleError, reason: str) -> None:
        self.calls.append(("fail", error.code, reason))

    def start_tls(self, creator: object) -> None:
        self.calls.append(("start_tls", creator))

    def names(self) -> List[str]:
        """
        The names of the calls that are not data.
        """
        return [c[0] for c in self.calls if not c[0].startswith("send_")]

    def failure(self) -> Optional[tuple]:
        fails = [c for c in self.calls if c[0] == "fail"]
        return fails[-1] if fails else None


def version(minor: int) -> bytes:
    return b"RFB 003.%03d\n" % (minor,)


def u32(n: int) -> bytes:
    return struct.pack("!I", n)


def server_script(minor: int, offered: Sequence[int], chosen: int, result: int = 0) -> bytes:
    """
    Everything an RFB server of version 3.C{minor} sends up to the end of
    security, when the client picks C{chosen}.
    """
    out = version(minor)
    if minor >= 7:
        out += bytes([len(offered)]) + bytes(offered)
    else:
        out += u32(offered[0])
    if chosen == 2:
        out += CHALLENGE
    if chosen == 2 or minor >= 8:
        out += u32(result)
    return out


def client_script(minor: int) -> bytes:
    """
    Everything an RFB client of version 3.C{minor} sends the proxy, through
    ClientInit.
    """
    out = version(minor)
    if minor >= 7:
        out += b"\x01"
    return out + b"\x01"


def expected_to_client(minor: int) -> bytes:
    if minor == 8:
        return version(8) + b"\x01\x01" + u32(0)
    if minor == 7:
        return version(8) + b"\x01\x01"
    return version(8) + u32(1)


def expected_to_server(server_minor: int, client_init: bytes = b"\x01") -> bytes:
    out = version(server_minor)
    if server_minor >= 7:
        out += b"\x02"
    return out + vnc_auth_response(PASSWORD, CHALLENGE) + client_init


class DESTests(SynchronousTestCase):
    """
    The VNC authentication response.
    """

    def test_matches_vncdotool(self) -> None:
        """
        When a challenge is answered, the response equals vncdotool's
        independent implementation for short, exact and long passwords.
        """
        for password in ["", "a", "password", "12345678", "longer-than-eight", "\x7f~"]:
            self.assertEqual(
                vnc_auth_response(password, CHALLENGE),
                des_encrypt(_vnc_des(password), CHALLENGE),
                password,
            )

    def test_key_is_bit_reversed_and_padded(self) -> None:
        """
        When a key is derived, each password byte is bit-reversed and the
        key is zero padded or cut to 8 bytes.
        """
        self.assertEqual(reverse_bits(b"\x01\x02\x80\xf0"), b"\x80\x40\x01\x0f")
        self.assertEqual(vnc_des_key("ab"), bytes([0x86, 0x46, 0, 0, 0, 0, 0, 0]))
        self.assertEqual(vnc_des_key("abcdefghij"), vnc_des_key("abcdefgh"))

    def test_changes_with_password_and_challenge(self) -> None:
        """
        When the password or challenge differ, so does the 16-byte
        response.
        """
        a = vnc_auth_response("one", CHALLENGE)
        self.assertEqual(len(a), 16)
        self.assertNotEqual(a, vnc_auth_response("two", CHALLENGE))
        self.assertNotEqual(a, vnc_auth_response("one", bytes(16)))

    def test_wrong_challenge_length(self) -> None:
        """
        When the challenge is not 16 bytes, a ValueError is raised.
        """
        self.assertRaises(ValueError, vnc_auth_response, "x", b"short")


class VersionTests(SynchronousTestCase):
    """
    Parsing of ProtocolVersion messages.
    """

    def test_parse(self) -> None:
        """
        When 12 bytes are a well-formed version they parse to (major, minor),
        anything else to None.
        """
        self.assertEqual(parse_version(b"RFB 003.008\n"), (3, 8))
        self.assertEqual(parse_version(b"RFB 003.889\n"), (3, 889))
        for bad in [b"RFB 003.008\r", b"RFB 03.0080\n", b"HTTP/1.1 200", b"RFB 00a.008\n", b""]:
            self.assertIsNone(parse_version(bad), bad)

    def test_effective(self) -> None:
        """
        When a version is mapped to a handshake, 3.7 and 3.8 are themselves,
        later ones 3.8, odd 3.x ones 3.3 and anything below 3 is refused.
        """
        self.assertEqual(effective_version(3, 8), 8)
        self.assertEqual(effective_version(3, 7), 7)
        self.assertEqual(effective_version(3, 3), 3)
        self.assertEqual(effective_version(3, 5), 3)
        self.assertEqual(effective_version(3, 889), 8)
        self.assertEqual(effective_version(4, 1), 8)
        self.assertIsNone(effective_version(2, 0))


class RFBGuardHandshakeTests(SynchronousTestCase):
    """
    Successful handshakes of L{RFBGuard}.
    """

    def drive(
        self,
        client_minor: int,
        server_minor: int,
        password: Optional[str] = PASSWORD,
        offered: Sequence[int] = (2,),
        chosen: int = 2,
        byte_at_a_time: bool = False,
        server_first: bool = False,
    ) -> RecordingSink:
        sink = RecordingSink()
        guard = RFBGuard(sink, password)
        guard.start()
        guard.server_connected()
        client = client_script(client_minor)
        server = server_script(server_minor, offered, chosen)
        sides = [(guard.client_data, client), (guard.server_data, server)]
        if server_first:
            sides.reverse()
        for feed, data in sides:
            if byte_at_a_time:
                for i in range(len(data)):
                    feed(data[i : i + 1])
            else:
                feed(data)
        return sink

    def test_every_version_combination(self) -> None:
        """
        When any of the client versions 3.3/3.7/3.8 meets any server version
        3.3/3.7/3.8, the browser gets security None, the VM gets VNC auth
        and min(server, 3.8), and the console is established.
        """
        for client_minor in (3, 7, 8):
            for server_minor in (3, 7, 8):
                sink = self.drive(client_minor, server_minor)
                label = "client 3.%d server 3.%d" % (client_minor, server_minor)
                self.assertEqual(sink.to_client, expected_to_client(client_minor), label)
                self.assertEqual(sink.to_server, expected_to_server(server_minor), label)
                self.assertEqual(sink.names(), ["established"], label)

    def test_newer_server_version(self) -> None:
        """
        When the VM announces a version above 3.8, the guard answers 3.8.
        """
        sink = RecordingSink()
        guard = RFBGuard(sink, PASSWORD)
        guard.start()
        guard.server_connected()
        guard.server_data(b"RFB 003.889\n\x01\x02" + CHALLENGE + u32(0))
        guard.client_data(client_script(8))
        self.assertEqual(sink.to_server, expected_to_server(8))
        self.assertEqual(sink.names(), ["established"])

    def test_byte_at_a_time(self) -> None:
        """
        When both sides arrive one byte at a time, in either order, the
        result is the same as in one piece.
        """
        for client_minor in (3, 7, 8):
            for server_minor in (3, 7, 8):
                for server_first in (False, True):
                    sink = self.drive(client_minor, server_minor, byte_at_a_time=True, server_first=server_first)
                    label = "client 3.%d server 3.%d" % (client_minor, server_minor)
                    self.assertEqual(sink.to_client, expected_to_client(client_minor), label)
                    self.assertEqual(sink.to_server, expected_to_server(server_minor), label)
                    self.assertEqual(sink.names(), ["established"], label)

    def test_no_password_chooses_none(self) -> None:
        """
        When no password is known and the VM offers None and VNC auth, the
        guard chooses None and sends no challenge response.
        """
        for minor in (7, 8):
            sink = self.drive(8, minor, password=None, offered=(2, 1), chosen=1)
            self.assertEqual(sink.to_server, version(minor) + b"\x01" + b"\x01")
            self.assertEqual(sink.names(), ["established"])
        sink = self.drive(8, 3, password=None, offered=(1,), chosen=1)
        self.assertEqual(sink.to_server, version(3) + b"\x01")
        self.assertEqual(sink.names(), ["established"])

    def test_password_prefers_vnc_auth(self) -> None:
        """
        When a password is known and the VM offers None and VNC auth, the
        guard authenticates with VNC auth.
        """
        sink = self.drive(8, 8, offered=(1, 2), chosen=2)
        self.assertEqual(sink.to_server, expected_to_server(8))

    def test_password_but_only_none(self) -> None:
        """
        When a password is known but the VM only offers None, None is used.
        """
        sink = self.drive(8, 8, offered=(1,), chosen=1)
        self.assertEqual(sink.to_server, version(8) + b"\x01\x01")
        self.assertEqual(sink.names(), ["established"])

    def test_client_init_held_until_server_done(self) -> None:
        """
        When the browser sends ClientInit and more before the VM side is
        authenticated, nothing of it reaches the VM until then, and it is
        forwarded before established() is called.
        """
        sink = RecordingSink()
        guard = RFBGuard(sink, PASSWORD)
        guard.start()
        guard.server_connected()
        extra = b"\x02\x00\x00\x01\x00\x00\x00\x00"  # SetEncodings(raw)
        guard.client_data(version(8) + b"\x01" + b"\x00" + extra)
        guard.server_data(version(8) + b"\x01\x02" + CHALLENGE)
        self.assertNotIn(b"\x00" + extra, sink.to_server)
        self.assertEqual(sink.names(), [])
        guard.server_data(u32(0))
        self.assertEqual(sink.calls[-2], ("send_to_server", b"\x00" + extra))
        self.assertEqual(sink.calls[-1], ("established",))

    def test_server_leftover_forwarded(self) -> None:
        """
        When the VM sends bytes beyond the security handshake, they reach
        the browser before established() is called.
        """
        sink = RecordingSink()
        guard = RFBGuard(sink, PASSWORD)
        guard.start()
        guard.server_connected()
        guard.server_data(server_script(8, (2,), 2) + b"SERVERINIT")
        guard.client_data(client_script(8))
        self.assertEqual(sink.calls[-2], ("send_to_client", b"SERVERINIT"))
        self.assertEqual(sink.calls[-1], ("established",))

    def test_no_client_version_before_start(self) -> None:
        """
        When start() has not been called, the guard sends the browser nothing.
        """
        sink = RecordingSink()
        guard = RFBGuard(sink, PASSWORD)
        guard.client_data(version(8))
        self.assertEqual(sink.calls, [])
        guard.start()
        self.assertEqual(sink.to_client, version(8) + b"\x01\x01")

    def test_reentrant_sink(self) -> None:
        """
        When the sink answers synchronously from inside send_to_client, the
        handshake still completes in order.
        """

        class Browser(RecordingSink):
            def send_to_client(self, data: bytes) -> None:
                super().send_to_client(data)
                if data == version(8):
                    guard.client_data(version(8))
                elif data == b"\x01\x01":
                    guard.client_data(b"\x01")
                elif data == u32(0):
                    guard.client_data(b"\x01")

        sink = Browser()
        guard = RFBGuard(sink, PASSWORD)
        guard.start()
        guard.server_connected()
        guard.server_data(server_script(8, (2,), 2))
        self.assertEqual(sink.to_server, expected_to_server(8))
        self.assertEqual(sink.names(), ["established"])


class RFBGuardFailureTests(SynchronousTestCase):
    """
    Handshakes L{RFBGuard} refuses.
    """

    def server(self, data: bytes, password: Optional[str] = PASSWORD) -> RecordingSink:
        sink = RecordingSink()
        guard = RFBGuard(sink, password)
        guard.start()
        guard.server_connected()
        guard.client_data(client_script(8))
        guard.server_data(data)
        return sink

    def assertFailed(self, sink: RecordingSink, code: ErrorCode, text: str = "") -> None:
        failure = sink.failure()
        self.assertIsNotNone(failure)
        assert failure is not None
        self.assertEqual(failure[1], code)
        self.assertIn(text, failure[2])
        self.assertNotIn("established", sink.names())
        self.assertEqual(sink.names().count("fail"), 1)

    def test_bad_server_version(self) -> None:
        """
        When the VM's first 12 bytes are not an RFB 3.x version, the guard
        fails with CONNECTION_FAILED.
        """
        for bad in [b"HTTP/1.1 400", b"RFB 003.00x\n", b"RFB 002.000\n", b"\x00" * 12]:
            sink = self.server(bad)
            self.assertFailed(sink, ErrorCode.CONNECTION_FAILED)
            self.assertNotIn(b"RFB", sink.to_server, bad)

    def test_zero_security_types(self) -> None:
        """
        When the VM offers no security type, the guard reads its reason and
        fails with CONNECTION_FAILED naming it.
        """
        reason = b"too many connections"
        sink = self.server(version(8) + b"\x00" + u32(len(reason)) + reason)
        self.assertFailed(sink, ErrorCode.CONNECTION_FAILED, "too many connections")

    def test_invalid_security_rfb33(self) -> None:
        """
        When an RFB 3.3 VM answers security type 0, the guard fails with its
        reason.
        """
        sink = self.server(version(3) + u32(0) + u32(4) + b"nope")
        self.assertFailed(sink, ErrorCode.CONNECTION_FAILED, "nope")

    def test_huge_reason_length(self) -> None:
        """
        When the VM announces a reason longer than the cap, the guard fails
        at once instead of waiting to buffer it.
        """
        sink = self.server(version(8) + b"\x00" + u32(MAX_REASON_LENGTH + 1))
        self.assertFailed(sink, ErrorCode.CONNECTION_FAILED, "reason string")
        sink = self.server(version(8) + b"\x00" + u32(0xFFFFFFFF))
        self.assertFailed(sink, ErrorCode.CONNECTION_FAILED)

    def test_auth_failure_rfb38(self) -> None:
        """
        When an RFB 3.8 VM rejects the password, the guard fails with
        "console authentication failed" and the VM's reason.
        """
        reason = b"Authentication failed"
        sink = self.server(version(8) + b"\x01\x02" + CHALLENGE + u32(1) + u32(len(reason)) + reason)
        self.assertFailed(sink, ErrorCode.CONNECTION_FAILED, "console authentication failed")
        self.assertIn("Authentication failed", sink.failure()[2])

    def test_auth_failure_rfb37_and_33(self) -> None:
        """
        When an RFB 3.7 or 3.3 VM rejects the password (no reason string),
        the guard fails with "console authentication failed".
        """
        for minor in (7, 3):
            sink = self.server(server_script(minor, (2,), 2, result=1))
            self.assertFailed(sink, ErrorCode.CONNECTION_FAILED, "console authentication failed")

    def test_auth_failure_huge_reason(self) -> None:
        """
        When the auth failure reason is longer than the cap, the guard fails
        without buffering it.
        """
        sink = self.server(version(8) + b"\x01\x02" + CHALLENGE + u32(1) + u32(1 << 30))
        self.assertFailed(sink, ErrorCode.CONNECTION_FAILED)

    def test_vnc_auth_without_password(self) -> None:
        """
        When the VM only offers VNC auth and no password is known, the guard
        fails with CONNECTION_FAILED.
        """
        sink = self.server(version(8) + b"\x01\x02", password=None)
        self.assertFailed(sink, ErrorCode.CONNECTION_FAILED, "no password")
        sink = self.server(version(3) + u32(2), password=None)
        self.assertFailed(sink, ErrorCode.CONNECTION_FAILED, "no password")

    def test_vencrypt_without_tls_settings(self) -> None:
        """
        When the VM only offers VeNCrypt and the guard has no TLS settings,
        the guard fails saying that vnc_tls is not configured.
        """
        sink = self.server(version(8) + b"\x01\x13")
        self.assertFailed(sink, ErrorCode.CONNECTION_FAILED, "no vnc_tls is configured")
        self.assertEqual(sink.to_server, version(8))

    def test_unknown_security_types(self) -> None:
        """
        When the VM offers only unknown security types, the guard fails.
        """
        sink = self.server(version(8) + b"\x02\x10\x12")
        self.assertFailed(sink, ErrorCode.CONNECTION_FAILED, "no supported security type")

    def test_server_flood(self) -> None:
        """
        When the VM sends more than the buffer cap before ClientInit, the
        guard fails instead of buffering it.
        """
        sink = RecordingSink()
        guard = RFBGuard(sink, PASSWORD)
        guard.start()
        guard.server_connected()
        guard.server_data(server_script(8, (2,), 2))
        guard.server_data(b"x" * (MAX_SERVER_BUFFER + 1))
        self.assertFailed(sink, ErrorCode.CONNECTION_FAILED, "too much")

    def test_bad_client_version(self) -> None:
        """
        When the browser's version is malformed, the guard fails with
        BAD_REQUEST.
        """
        sink = RecordingSink()
        guard = RFBGuard(sink, PASSWORD)
        guard.start()
        guard.client_data(b"GET / HTTP/1.1\r\n")
        self.assertFailed(sink, ErrorCode.BAD_REQUEST)

    def test_client_picks_other_type(self) -> None:
        """
        When the browser picks a security type other than None, the guard
        fails with BAD_REQUEST.
        """
        sink = RecordingSink()
        guard = RFBGuard(sink, PASSWORD)
        guard.start()
        guard.client_data(version(8) + b"\x02")
        self.assertFailed(sink, ErrorCode.BAD_REQUEST, "security type 2")

    def test_client_flood(self) -> None:
        """
        When the browser sends more than the buffer cap while the VM side is
        not done, the guard fails with BAD_REQUEST.
        """
        sink = RecordingSink()
        guard = RFBGuard(sink, PASSWORD)
        guard.start()
        guard.client_data(client_script(8))
        guard.client_data(b"k" * (MAX_CLIENT_BUFFER + 1))
        self.assertFailed(sink, ErrorCode.BAD_REQUEST)

    def test_silent_after_failure(self) -> None:
        """
        When the guard has failed, later data from either side produces no
        more calls.
        """
        sink = RecordingSink()
        guard = RFBGuard(sink, PASSWORD)
        guard.start()
        guard.server_connected()
        guard.server_data(b"HTTP/1.1 400")
        before = list(sink.calls)
        self.assertEqual(before[-1][0], "fail")
        guard.server_data(b"\x01\x02" + CHALLENGE + u32(0))
        guard.client_data(client_script(8))
        self.assertEqual(sink.calls, before)


# ---------------------------------------------------------------------------
# VeNCrypt
# ---------------------------------------------------------------------------

#: Stand-ins for the TLS connection creators the guard hands to start_tls.
X509_CREATOR = object()
ANON_CREATOR = object()


def vencrypt_tls(anonymous: bool = False) -> VeNCryptTLS:
    return VeNCryptTLS(creator=X509_CREATOR, anonymous=ANON_CREATOR if anonymous else None)


def vencrypt_before_tls(subtypes: Sequence[int], minor: int = 8, vencrypt: bytes = b"\x00\x02") -> bytes:
    """
    What a VeNCrypt VM sends in the clear: RFB version, security types
    (only 19), VeNCrypt version, version ack, sub-types, sub-type ack.
    """
    count = len(subtypes)
    return (
        version(minor)
        + b"\x01\x13"
        + vencrypt
        + b"\x00"
        + bytes([count])
        + struct.pack("!%dI" % (count,), *subtypes)
        + b"\x01"
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


class CloseTests(SynchronousTestCase):
    """
    L{StepReader.close} and L{RFBGuard.close}: a guard the bridge is done
    with lets go of its suspended generators, and is freed by reference
    counting (not left in a cycle for the garbage collector).
    """

    def setUp(self) -> None:
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)

    def test_readerClose(self) -> None:
        """
        A closed reader's generator is closed where it waited, what was
        buffered is dropped and nothing more is parsed.
        """
        seen: List[bytes] = []
        closed: List[bool] = []

        def steps():
            try:
                while True:
                    seen.append((yield 2))
            finally:
                closed.append(True)

        reader = StepReader(steps(), 100, lambda: AssertionError("overflow"))
        reader.feed(b"abc")
        self.assertEqual((seen, closed), ([b"ab"], []))
        reader.close()
        self.assertEqual(closed, [True])
        self.assertTrue(reader.done)
        self.assertEqual(reader.take_rest(), b"", "what was buffered is dropped")
        reader.feed(b"de")
        self.assertEqual(seen, [b"ab"], "nothing more is parsed")

    def test_guardFreedOnceClosed(self) -> None:
        """
        A guard in the middle of its handshake (both parsers waiting) is
        freed as soon as it is closed and dropped.
        """
        sink = RecordingSink()
        guard = RFBGuard(sink, PASSWORD)
        guard.start()
        guard.server_connected()
        self.assertEqual(sink.to_client, version(8), "greeted; both sides wait")
        ref = weakref.ref(guard)
        guard.close()
        del guard
        self.assertIsNone(ref())

    def test_guardWithoutCloseIsACycle(self) -> None:
        """
        Without C{close}, a guard whose parsers wait is kept alive by its
        own generators: what C{close} is for.
        """
        guard = RFBGuard(RecordingSink(), PASSWORD)
        guard.start()
        ref = weakref.ref(guard)
        del guard
        self.assertIsNotNone(ref())
        gc.collect()
        self.assertIsNone(ref())

    def test_finishedHandshakeLeavesNoCycle(self) -> None:
        """
        After a whole handshake the guard is freed when dropped, even
        without C{close}: the last wait condition (a closure over the
        guard) is not kept.
        """
        sink = RecordingSink()
        guard = RFBGuard(sink, None)
        guard.start()
        guard.server_connected()
        guard.server_data(server_script(8, [1], 1))
        guard.client_data(client_script(8))
        self.assertEqual(sink.names()[-1], "established")
        ref = weakref.ref(guard)
        del guard
        self.assertIsNone(ref())
