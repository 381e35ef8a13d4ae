"""
Tests for L{vaporproxy.guards.rfb}: the VNC security handshake done by the proxy.
"""

from __future__ import annotations

import gc
import weakref
from typing import Optional, Sequence

from twisted.trial.unittest import SynchronousTestCase
from vncdotool.rfb import _vnc_des, des_encrypt

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
    CHALLENGE,
    PASSWORD,
    client_script,
    expected_to_client,
    expected_to_server,
    server_script,
    u32,
    version,
)
from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.guards.kit import Established, Failed, SendToClient, SendToServer, deliver
from vaporproxy.guards.rfb import (
    MAX_CLIENT_BUFFER,
    MAX_REASON_LENGTH,
    MAX_SERVER_BUFFER,
    RFBGuard,
    effective_version,
    parse_version,
    reverse_bits,
    vnc_auth_response,
    vnc_des_key,
)

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


class RFBPlaybookTests(SynchronousTestCase):
    """
    The typed outputs of L{RFBGuard} without a sink, each right after the
    input that allows it, in one piece and one byte at a time.
    """

    def test_vnc_auth(self) -> None:
        """
        When an RFB 3.8 browser meets a 3.8 VM asking for VNC
        authentication, the browser gets the greeting, the None offer and
        an OK; the VM gets its version, the choice, the DES answer and,
        once its SecurityResult is in, the held ClientInit; then
        Established.
        """
        book = Playbook(lambda: RFBGuard(None, PASSWORD))
        book >> Start() << SendToClient(version(8))
        book >> ServerConnected()
        book >> ServerData(version(8)) << SendToServer(version(8))
        book >> ClientData(version(8)) << SendToClient(b"\x01\x01")
        book >> ServerData(b"\x01\x02") << SendToServer(b"\x02")
        book >> ServerData(CHALLENGE) << SendToServer(vnc_auth_response(PASSWORD, CHALLENGE))
        book >> ClientData(b"\x01") << SendToClient(u32(0))
        book >> ClientData(b"\x01")
        book >> ServerData(u32(0)) << SendToServer(b"\x01") << Established()
        book >> ClientData(b"after") >> ServerData(b"after")
        assert_plays(self, book)

    def test_rfb33_both_sides(self) -> None:
        """
        When both sides speak RFB 3.3, the browser is told None in a u32,
        the VM gets no choice byte, and no SecurityResult is awaited after
        None.
        """
        book = Playbook(lambda: RFBGuard(None, None))
        book >> ServerConnected() >> ServerData(version(3) + u32(1)) << SendToServer(version(3))
        book >> Start() << SendToClient(version(8))
        book >> ClientData(version(3)) << SendToClient(u32(1))
        book >> ClientData(b"\x01") << SendToServer(b"\x01") << Established()
        assert_plays(self, book)

    def test_server_failure(self) -> None:
        """
        When the VM's version is malformed, its input hands out one Failed
        (CONNECTION_FAILED) and later inputs nothing.
        """
        book = Playbook(lambda: RFBGuard(None, PASSWORD))
        book >> Start() << SendToClient(version(8)) >> ServerConnected()
        book >> ServerData(b"HTTP/1.1 400") << Failed(
            ConsoleError(ErrorCode.CONNECTION_FAILED), "server sent a malformed protocol version"
        )
        book >> ClientData(client_script(8)) >> ServerLost(None)
        assert_plays(self, book)

    def test_client_failure(self) -> None:
        """
        When the browser picks VNC authentication, its input hands out one
        Failed (BAD_REQUEST).
        """
        book = Playbook(lambda: RFBGuard(None, PASSWORD))
        book >> Start() << SendToClient(version(8))
        book >> ClientData(version(8) + b"\x02") << SendToClient(b"\x01\x01") << Failed(
            ConsoleError(ErrorCode.BAD_REQUEST), "client chose security type 2"
        )
        assert_plays(self, book)

    def test_server_lost(self) -> None:
        """
        When the VM connection closes during the handshake, server_lost
        hands out Failed naming why.
        """
        book = Playbook(lambda: RFBGuard(None, PASSWORD))
        book >> ServerConnected() >> ServerLost(ValueError("reset")) << Failed(
            ConsoleError(ErrorCode.CONNECTION_FAILED),
            "VM closed the connection during the handshake: ValueError: reset",
        )
        assert_plays(self, book)

    def test_sink_gets_what_is_returned(self) -> None:
        """
        When the guard has a sink, every version combination delivers to it
        exactly the outputs the inputs return, as the legacy sink calls.
        """
        for client_minor in (3, 7, 8):
            for server_minor in (3, 7, 8):
                sink = RecordingSink()
                guard = RFBGuard(sink, PASSWORD)
                returned = guard.start() + guard.server_connected()
                returned += guard.server_data(server_script(server_minor, (2,), 2))
                returned += guard.client_data(client_script(client_minor))
                replay = RecordingSink()
                for output in returned:
                    deliver(replay, output)
                self.assertEqual(sink.calls, replay.calls)
                self.assertEqual(returned[-1], Established())
                self.assertEqual(sink.to_server, expected_to_server(server_minor))


class CloseTests(SynchronousTestCase):
    """
    L{RFBGuard.close}: a guard the bridge is done with lets go of its
    suspended generators, and is freed by reference
    counting (not left in a cycle for the garbage collector).
    """

    def setUp(self) -> None:
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)

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

