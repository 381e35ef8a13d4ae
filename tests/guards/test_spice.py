"""
Tests for L{vaporproxy.guards.spice}: SPICE channel admission and ticket injection.
"""

from __future__ import annotations

import gc
import struct
import weakref
from typing import List, Optional

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from twisted.trial.unittest import SynchronousTestCase

from tests.guards.playbook import (
    ClientData,
    Placeholder,
    Playbook,
    RecordingSink,
    ServerConnected,
    ServerData,
    Start,
    assert_plays,
)
from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.guards.kit import Admit, Established, Failed, SendToClient, SendToServer, SpiceSessionAssigned
from vaporproxy.guards.spice import (
    FULL_HEADER,
    LINK_HEADER,
    LINK_MESS,
    LINK_REPLY,
    MAX_BYTES_BEFORE_INIT,
    MAX_CLIENT_BUFFER,
    MAX_LINK_SIZE,
    MINI_HEADER,
    SPICE_MSG_MAIN_INIT,
    SpiceGuard,
    has_cap,
)

PASSWORD = "real-spice-pw"
BROWSER_PASSWORD = "what-the-browser-guessed"
SESSION_ID = 0x1234ABCD
OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)

MAIN, DISPLAY, INPUTS = 1, 2, 3
AUTH_SELECTION, AUTH_SPICE, MINI = 0, 1, 3
SPICE_MSG_PING = 4

_KEY: List[rsa.RSAPrivateKey] = []


def private_key() -> rsa.RSAPrivateKey:
    """
    A 1024-bit RSA key (what spice-server uses), made once per run.
    """
    if not _KEY:
        _KEY.append(rsa.generate_private_key(public_exponent=65537, key_size=1024))
    return _KEY[0]


def public_der() -> bytes:
    return private_key().public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def caps_word(*bits: int) -> int:
    word = 0
    for bit in bits:
        word |= 1 << bit
    return word


def link_message(
    channel_type: int = MAIN,
    connection_id: int = 0,
    common: int = caps_word(AUTH_SELECTION, AUTH_SPICE, MINI),
    magic: bytes = b"REDQ",
    major: int = 2,
) -> bytes:
    """
    A client link message with one common and one channel caps word.
    """
    body = LINK_MESS.pack(connection_id, channel_type, 0, 1, 1, LINK_MESS.size)
    body += struct.pack("<II", common, 0x5)
    return LINK_HEADER.pack(magic, major, 2, len(body)) + body


def link_reply(error: int = 0, common: int = caps_word(AUTH_SELECTION, AUTH_SPICE, MINI)) -> bytes:
    """
    A server link reply carrying the test key.
    """
    body = LINK_REPLY.pack(error, public_der(), 1, 1, LINK_REPLY.size) + struct.pack("<II", common, 0x9)
    return LINK_HEADER.pack(b"REDQ", 2, 2, len(body)) + body


def browser_ticket(auth_selection: bool = True) -> bytes:
    """
    What the browser sends after the reply: auth mechanism SPICE and its own
    encrypted ticket.
    """
    ticket = private_key().public_key().encrypt(BROWSER_PASSWORD.encode() + b"\0", OAEP)
    return (struct.pack("<I", AUTH_SPICE) if auth_selection else b"") + ticket


def mini(msg_type: int, body: bytes) -> bytes:
    return MINI_HEADER.pack(msg_type, len(body)) + body


def full(msg_type: int, body: bytes, serial: int = 1) -> bytes:
    return FULL_HEADER.pack(serial, msg_type, len(body), 0) + body


def main_init(session_id: int = SESSION_ID) -> bytes:
    return struct.pack("<8I", session_id, 1, 3, 2, 0, 10, 12345, 0)


class Channel:
    """
    A guard with its recording sink.
    """

    def __init__(self, password: Optional[str] = PASSWORD, expected: Optional[int] = None):
        self.sink = RecordingSink()
        self.guard = SpiceGuard(self.sink, password, expected)
        self.guard.start()

    def link(self, message: bytes) -> "Channel":
        self.guard.client_data(message)
        self.guard.server_connected()
        return self

    def server_sent_ticket(self) -> bytes:
        """
        The ticket bytes the VM got, decrypted with the test key.
        """
        after_link = self.sink.to_server[len(link_message()) :]
        mechanism, = struct.unpack_from("<I", after_link)
        assert mechanism == AUTH_SPICE
        return private_key().decrypt(after_link[4:132], OAEP)


class AdmissionTests(SynchronousTestCase):
    """
    Which link messages a SPICE channel is admitted with (DESIGN.md rule 7).
    """

    def assertRefused(self, channel: Channel, code: ErrorCode) -> None:
        self.assertEqual(channel.sink.names(), ["fail"])
        self.assertEqual(channel.sink.calls[-1][1], code)
        self.assertEqual(channel.sink.to_server, b"")

    def test_first_use_main(self) -> None:
        """
        When a token's first use opens the main channel with connection id
        0, the channel is admitted as main.
        """
        channel = Channel().link(link_message(MAIN, 0))
        self.assertEqual(channel.sink.names(), ["admit"])
        self.assertEqual(channel.sink.calls[0], ("admit", True))
        self.assertEqual(channel.sink.to_server, link_message(MAIN, 0))

    def test_first_use_not_main(self) -> None:
        """
        When a token's first use opens another channel, it is refused with
        TOKEN_ALREADY_USED.
        """
        self.assertRefused(Channel().link(link_message(DISPLAY, 0)), ErrorCode.TOKEN_ALREADY_USED)

    def test_first_use_main_with_session(self) -> None:
        """
        When a token's first use opens main but names a session, it is
        refused.
        """
        self.assertRefused(Channel().link(link_message(MAIN, 77)), ErrorCode.TOKEN_ALREADY_USED)

    def test_later_channel_right_session(self) -> None:
        """
        When a later channel names the main channel's session id, it is
        admitted as not main.
        """
        channel = Channel(expected=SESSION_ID).link(link_message(DISPLAY, SESSION_ID))
        self.assertEqual(channel.sink.calls[0], ("admit", False))
        self.assertEqual(channel.sink.to_server, link_message(DISPLAY, SESSION_ID))

    def test_later_channel_wrong_session(self) -> None:
        """
        When a later channel names another session id, it is refused.
        """
        channel = Channel(expected=SESSION_ID).link(link_message(INPUTS, SESSION_ID + 1))
        self.assertRefused(channel, ErrorCode.TOKEN_ALREADY_USED)

    def test_later_channel_missing_session(self) -> None:
        """
        When a later channel names no session (connection id 0), it is
        refused.
        """
        channel = Channel(expected=SESSION_ID).link(link_message(INPUTS, 0))
        self.assertRefused(channel, ErrorCode.TOKEN_ALREADY_USED)

    def test_main_again(self) -> None:
        """
        When a later use opens a second main channel, even naming the
        session, it is refused.
        """
        for connection_id in (0, SESSION_ID):
            channel = Channel(expected=SESSION_ID).link(link_message(MAIN, connection_id))
            self.assertRefused(channel, ErrorCode.TOKEN_ALREADY_USED)

    def test_malformed(self) -> None:
        """
        When the link message is not a well-formed SPICE 2 link message, it
        is refused with BAD_REQUEST.
        """
        good = link_message()
        bad_offset = bytearray(good)
        struct.pack_into("<I", bad_offset, LINK_HEADER.size + 14, 4000)
        too_many_caps = bytearray(good)
        struct.pack_into("<I", too_many_caps, LINK_HEADER.size + 6, 1000)
        for bad in [
            link_message(magic=b"GET "),
            link_message(major=1),
            LINK_HEADER.pack(b"REDQ", 2, 2, 4) + b"abcd",
            bytes(bad_offset),
            bytes(too_many_caps),
        ]:
            self.assertRefused(Channel().link(bad), ErrorCode.BAD_REQUEST)

    def test_huge_link_size(self) -> None:
        """
        When the link header announces more than the cap, it is refused at
        once, without waiting for the body.
        """
        channel = Channel()
        channel.guard.client_data(LINK_HEADER.pack(b"REDQ", 2, 2, MAX_LINK_SIZE + 1))
        self.assertRefused(channel, ErrorCode.BAD_REQUEST)

    def test_byte_at_a_time(self) -> None:
        """
        When the link message arrives one byte at a time, it is admitted
        only once it is complete.
        """
        channel = Channel()
        message = link_message()
        for i in range(len(message) - 1):
            channel.guard.client_data(message[i : i + 1])
        self.assertEqual(channel.sink.calls, [])
        channel.guard.client_data(message[-1:])
        self.assertEqual(channel.sink.calls, [("admit", True)])

    def test_nothing_sent_before_connected(self) -> None:
        """
        When the backend is not connected yet, the link message is held.
        """
        channel = Channel()
        channel.guard.client_data(link_message())
        self.assertEqual(channel.sink.to_server, b"")
        channel.guard.server_connected()
        self.assertEqual(channel.sink.to_server, link_message())


class ReentrantTests(SynchronousTestCase):
    """
    A sink that calls back into the guard synchronously.
    """

    def test_admit_connects_at_once(self) -> None:
        """
        When the sink calls server_connected() from inside admit(), the link
        message is still sent exactly once, after the admission.
        """

        class Bridge(RecordingSink):
            def admit(self, is_main: bool) -> None:
                super().admit(is_main)
                guard.server_connected()

        sink = Bridge()
        guard = SpiceGuard(sink, PASSWORD, None)
        guard.start()
        guard.client_data(link_message())
        self.assertEqual(sink.calls, [("admit", True), ("send_to_server", link_message())])


class TicketTests(SynchronousTestCase):
    """
    The browser's ticket is replaced by the real one.
    """

    def test_ticket_replaced(self) -> None:
        """
        When the browser sends its ticket, the VM gets the real password
        encrypted to its key and never the browser's ticket.
        """
        channel = Channel().link(link_message())
        channel.guard.server_data(link_reply())
        self.assertEqual(channel.sink.to_client, link_reply())
        theirs = browser_ticket()
        channel.guard.client_data(theirs)
        self.assertEqual(channel.server_sent_ticket(), PASSWORD.encode() + b"\0")
        self.assertNotIn(theirs[4:], channel.sink.to_server)
        self.assertEqual(len(channel.sink.to_server), len(link_message()) + 4 + 128)

    def test_no_password(self) -> None:
        """
        When no password is known, the VM gets an empty ticket.
        """
        channel = Channel(password=None).link(link_message())
        channel.guard.server_data(link_reply())
        channel.guard.client_data(browser_ticket())
        self.assertEqual(channel.server_sent_ticket(), b"\0")

    def test_without_auth_selection(self) -> None:
        """
        When the browser does not offer auth selection, no mechanism is read
        or sent: just the ticket.
        """
        channel = Channel().link(link_message(common=caps_word(AUTH_SPICE, MINI)))
        channel.guard.server_data(link_reply())
        channel.guard.client_data(browser_ticket(auth_selection=False))
        sent = channel.sink.to_server[len(link_message(common=0)) :]
        self.assertEqual(len(sent), 128)
        self.assertEqual(private_key().decrypt(sent, OAEP), PASSWORD.encode() + b"\0")

    def test_sasl_refused(self) -> None:
        """
        When the browser asks for SASL, the guard fails with BAD_REQUEST.
        """
        channel = Channel().link(link_message())
        channel.guard.server_data(link_reply())
        channel.guard.client_data(struct.pack("<I", 2))
        self.assertEqual(channel.sink.calls[-1][:2], ("fail", ErrorCode.BAD_REQUEST))

    def test_link_error(self) -> None:
        """
        When the VM's link reply carries an error, the guard fails with
        CONNECTION_FAILED and forwards nothing.
        """
        channel = Channel().link(link_message())
        channel.guard.server_data(link_reply(error=5))
        self.assertEqual(channel.sink.calls[-1][:2], ("fail", ErrorCode.CONNECTION_FAILED))
        self.assertEqual(channel.sink.to_client, b"")

    def test_lying_link_reply(self) -> None:
        """
        When the VM's link reply is malformed (magic, size, key), the guard
        fails with CONNECTION_FAILED.
        """
        bad_key = bytearray(link_reply())
        bad_key[LINK_HEADER.size + 4 : LINK_HEADER.size + 20] = b"\xff" * 16
        for bad in [
            b"HTTP/1.1 400 Bad" + b"\0" * 200,
            LINK_HEADER.pack(b"REDQ", 2, 2, 1 << 31),
            LINK_HEADER.pack(b"REDQ", 2, 2, 8) + b"\0" * 8,
            bytes(bad_key),
        ]:
            channel = Channel().link(link_message())
            channel.guard.server_data(bad)
            self.assertEqual(channel.sink.names(), ["admit", "fail"], bad[:20])
            self.assertEqual(channel.sink.calls[-1][1], ErrorCode.CONNECTION_FAILED)

    def test_auth_failed(self) -> None:
        """
        When the VM rejects the ticket, the guard fails with "console
        authentication failed" and does not forward the result.
        """
        channel = Channel().link(link_message())
        channel.guard.server_data(link_reply())
        channel.guard.client_data(browser_ticket())
        channel.guard.server_data(struct.pack("<I", 7))
        self.assertEqual(channel.sink.calls[-1][:2], ("fail", ErrorCode.CONNECTION_FAILED))
        self.assertIn("console authentication failed", channel.sink.calls[-1][2])
        self.assertEqual(channel.sink.to_client, link_reply())

    def test_early_result_waits_for_ticket(self) -> None:
        """
        When the VM sends its link result before the browser's ticket, the
        guard does not establish until the ticket was sent.
        """
        channel = Channel(expected=SESSION_ID).link(link_message(DISPLAY, SESSION_ID))
        channel.guard.server_data(link_reply() + struct.pack("<I", 0))
        self.assertEqual(channel.sink.names(), ["admit"])
        channel.guard.client_data(browser_ticket())
        self.assertEqual(channel.sink.names(), ["admit", "established"])

    def test_client_flood(self) -> None:
        """
        When the browser sends more than the cap before the reply came, the
        guard fails with BAD_REQUEST.
        """
        channel = Channel().link(link_message())
        channel.guard.client_data(b"x" * (MAX_CLIENT_BUFFER + 1))
        self.assertEqual(channel.sink.calls[-1][:2], ("fail", ErrorCode.BAD_REQUEST))


class EstablishTests(SynchronousTestCase):
    """
    When a channel is established, and the main channel's session id.
    """

    def linked(self, channel: Channel, common: int = caps_word(AUTH_SELECTION, AUTH_SPICE, MINI)) -> None:
        channel.guard.server_data(link_reply(common=common))
        channel.guard.client_data(browser_ticket())
        channel.guard.server_data(struct.pack("<I", 0))

    def test_other_channel_after_result(self) -> None:
        """
        When a non-main channel's link succeeds, the result is forwarded and
        the channel established with no session report.
        """
        channel = Channel(expected=SESSION_ID).link(link_message(DISPLAY, SESSION_ID))
        self.linked(channel)
        self.assertEqual(channel.sink.names(), ["admit", "established"])
        self.assertEqual(channel.sink.to_client, link_reply() + struct.pack("<I", 0))

    def test_main_init_mini_header(self) -> None:
        """
        When the main channel uses mini headers, the guard relays a PING and
        reports MAIN_INIT's session id, then is established with every
        server byte forwarded.
        """
        channel = Channel().link(link_message())
        self.linked(channel)
        self.assertEqual(channel.sink.names(), ["admit"])
        stream = mini(SPICE_MSG_PING, b"p" * 20) + mini(SPICE_MSG_MAIN_INIT, main_init()) + b"next"
        channel.guard.server_data(stream)
        self.assertEqual(channel.sink.names(), ["admit", "spice_session", "established"])
        self.assertIn(("spice_session", SESSION_ID), channel.sink.calls)
        self.assertEqual(channel.sink.to_client, link_reply() + struct.pack("<I", 0) + stream)
        self.assertEqual(channel.guard.session_id, SESSION_ID)

    def test_main_init_full_header(self) -> None:
        """
        When the browser did not offer mini headers, the guard reads full
        18-byte headers and still finds the session id.
        """
        channel = Channel().link(link_message(common=caps_word(AUTH_SELECTION, AUTH_SPICE)))
        self.linked(channel)
        stream = full(SPICE_MSG_PING, b"q" * 9) + full(SPICE_MSG_MAIN_INIT, main_init(), serial=2)
        channel.guard.server_data(stream)
        self.assertIn(("spice_session", SESSION_ID), channel.sink.calls)
        self.assertEqual(channel.sink.names()[-1], "established")

    def test_server_without_mini_header(self) -> None:
        """
        When the server does not offer mini headers, full headers are used
        even though the browser offered them.
        """
        channel = Channel().link(link_message())
        self.linked(channel, common=caps_word(AUTH_SELECTION, AUTH_SPICE))
        channel.guard.server_data(full(SPICE_MSG_MAIN_INIT, main_init(99)))
        self.assertIn(("spice_session", 99), channel.sink.calls)

    def test_byte_at_a_time(self) -> None:
        """
        When every byte of both sides arrives alone, the handshake, the
        ticket and the session id come out the same, and server bytes are
        forwarded as they arrive.
        """
        channel = Channel()
        for b in link_message():
            channel.guard.client_data(bytes([b]))
        channel.guard.server_connected()
        for b in link_reply():
            channel.guard.server_data(bytes([b]))
        for b in browser_ticket():
            channel.guard.client_data(bytes([b]))
        self.assertEqual(channel.server_sent_ticket(), PASSWORD.encode() + b"\0")
        for b in struct.pack("<I", 0) + mini(SPICE_MSG_PING, b"abc"):
            channel.guard.server_data(bytes([b]))
        # The PING's body went out as it came.
        self.assertTrue(channel.sink.to_client.endswith(b"abc"))
        init = mini(SPICE_MSG_MAIN_INIT, main_init())
        fed = 0
        while "established" not in channel.sink.names():
            channel.guard.server_data(init[fed : fed + 1])
            fed += 1
        # Established as soon as the session id is complete; the rest of
        # MAIN_INIT is the bridge's to relay.
        self.assertEqual(fed, MINI_HEADER.size + 4)
        self.assertIn(("spice_session", SESSION_ID), channel.sink.calls)
        self.assertTrue(channel.sink.to_client.endswith(init[:fed]))

    def test_client_data_after_ticket_relayed(self) -> None:
        """
        When the browser sends messages after its ticket, they reach the VM
        at once.
        """
        channel = Channel().link(link_message())
        channel.guard.server_data(link_reply())
        channel.guard.client_data(browser_ticket() + b"AB")
        self.assertTrue(channel.sink.to_server.endswith(b"AB"))
        channel.guard.client_data(b"CD")
        self.assertTrue(channel.sink.to_server.endswith(b"ABCD"))

    def test_no_init_too_long(self) -> None:
        """
        When the main channel announces more than the cap before MAIN_INIT,
        the guard fails with CONNECTION_FAILED.
        """
        channel = Channel().link(link_message())
        self.linked(channel)
        channel.guard.server_data(MINI_HEADER.pack(SPICE_MSG_PING, MAX_BYTES_BEFORE_INIT))
        self.assertEqual(channel.sink.calls[-1][:2], ("fail", ErrorCode.CONNECTION_FAILED))

    def test_short_main_init(self) -> None:
        """
        When MAIN_INIT is too short to hold a session id, the guard fails.
        """
        channel = Channel().link(link_message())
        self.linked(channel)
        channel.guard.server_data(mini(SPICE_MSG_MAIN_INIT, b"\0\0"))
        self.assertEqual(channel.sink.calls[-1][:2], ("fail", ErrorCode.CONNECTION_FAILED))


class CapsTests(SynchronousTestCase):
    """
    Capability bits.
    """

    def test_has_cap(self) -> None:
        """
        When a bit is set in the caps words it is found, in any word.
        """
        self.assertTrue(has_cap([0b1000], 3))
        self.assertFalse(has_cap([0b1000], 2))
        self.assertTrue(has_cap([0, 1], 32))
        self.assertFalse(has_cap([], 0))


class CloseTests(SynchronousTestCase):
    """
    L{SpiceGuard.close}: a guard the bridge is done with lets go of its
    waiting generators and is freed by reference counting.
    """

    def test_freedOnceClosed(self) -> None:
        """
        A channel waiting for the VM's link reply is freed as soon as its
        guard is closed and dropped.
        """
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        channel = Channel().link(link_message())
        self.assertEqual(channel.sink.names(), ["admit"])
        ref = weakref.ref(channel.guard)
        channel.guard.close()
        del channel
        self.assertIsNone(ref())


class SpicePlaybookTests(SynchronousTestCase):
    """
    The typed outputs of L{SpiceGuard} without a sink, each right after the
    input that allows it, in one piece and one byte at a time (relayed
    bytes compared joined, since they go out as they come).
    """

    def test_main_channel(self) -> None:
        """
        When the token's first use opens the main channel, the guard admits
        it, links it, swaps the ticket for the real one, relays the VM's
        messages and hands out the session id from MAIN_INIT, then
        Established.
        """
        ticket = Placeholder(SendToServer)
        init_start = MINI_HEADER.pack(SPICE_MSG_MAIN_INIT, 32) + main_init()[:4]
        book = Playbook(lambda: SpiceGuard(None, PASSWORD, None))
        book >> Start() >> ClientData(link_message()) << Admit(True)
        book >> ServerConnected() << SendToServer(link_message())
        book >> ServerData(link_reply()) << SendToClient(link_reply())
        book >> ClientData(browser_ticket()) << ticket
        book >> ServerData(struct.pack("<I", 0)) << SendToClient(struct.pack("<I", 0))
        book >> ServerData(mini(SPICE_MSG_PING, b"ping")) << SendToClient(mini(SPICE_MSG_PING, b"ping"))
        book >> ServerData(init_start) << SendToClient(init_start) << SpiceSessionAssigned(SESSION_ID) << Established()
        assert_plays(self, book, coalesce=True)
        mechanism = struct.unpack_from("<I", ticket.value.data)[0]
        self.assertEqual(mechanism, AUTH_SPICE)
        self.assertEqual(private_key().decrypt(ticket.value.data[4:], OAEP), PASSWORD.encode() + b"\0")

    def test_later_channel(self) -> None:
        """
        When a later channel names the main channel's session, it is
        admitted as not main, the browser's bytes after its ticket go to
        the VM at once, and the link result establishes it.
        """
        book = Playbook(lambda: SpiceGuard(None, PASSWORD, SESSION_ID))
        book >> ClientData(link_message(DISPLAY, SESSION_ID)) << Admit(False)
        book >> ServerConnected() << SendToServer(link_message(DISPLAY, SESSION_ID))
        book >> ServerData(link_reply()) << SendToClient(link_reply())
        book >> ClientData(browser_ticket()) << Placeholder(SendToServer)
        book >> ClientData(b"early") << SendToServer(b"early")
        book >> ServerData(struct.pack("<I", 0)) << SendToClient(struct.pack("<I", 0)) << Established()
        assert_plays(self, book, coalesce=True)

    def test_refused_channel(self) -> None:
        """
        When a second main channel comes with a token already used, its
        link message hands out Failed (TOKEN_ALREADY_USED) and no Admit.
        """
        book = Playbook(lambda: SpiceGuard(None, PASSWORD, SESSION_ID))
        book >> Start() >> ClientData(link_message()) << Failed(
            ConsoleError(ErrorCode.TOKEN_ALREADY_USED), "second main channel for one token"
        )
        book >> ServerConnected() >> ServerData(link_reply())
        assert_plays(self, book)

    def test_auth_failed(self) -> None:
        """
        When the VM refuses the real ticket, the link result hands out
        Failed (CONNECTION_FAILED) and nothing reaches the browser.
        """
        book = Playbook(lambda: SpiceGuard(None, PASSWORD, None))
        book >> ClientData(link_message()) << Admit(True)
        book >> ServerConnected() << SendToServer(link_message())
        book >> ServerData(link_reply()) << SendToClient(link_reply())
        book >> ClientData(browser_ticket()) << Placeholder(SendToServer)
        book >> ServerData(struct.pack("<I", 7)) << Failed(
            ConsoleError(ErrorCode.CONNECTION_FAILED), "console authentication failed: link result 7"
        )
        assert_plays(self, book)
