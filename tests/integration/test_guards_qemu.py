"""
The VNC and SPICE guards against a real QEMU on loopback.

Each test starts its own C{qemu-system-x86_64} (see L{qemu_fixture}) with a
VNC and a SPICE password set over QMP, dials it on the real reactor with a
tiny TCP client that feeds the guard, and plays the browser side in memory
(what noVNC and spice-html5 send).
"""

from __future__ import annotations

import struct
from typing import Any, Callable, List, Optional

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import TestCase

from tests.integration.qemu_fixture import start_qemu
from vaporproxy.errors import ErrorCode
from vaporproxy.guards.rfb import RFBGuard
from vaporproxy.guards.spice import LINK_HEADER, LINK_MESS, MINI_HEADER, SPICE_MSG_MAIN_INIT, SpiceGuard

VNC_PASSWORD = "vnc-pw-1"
SPICE_PASSWORD = "spice-pw-1"


class BackendClient(Protocol):
    """
    The VM side of a bridge: feeds the guard until it is established, then
    hands bytes straight to the sink's browser.
    """

    def __init__(self, sink: "LoopSink"):
        self.sink = sink

    def connectionMade(self) -> None:
        self.sink.transport = self.transport
        self.sink.guard.server_connected()

    def dataReceived(self, data: bytes) -> None:
        if self.sink.is_established:
            self.sink.relayed += data
            self.sink.check_relayed()
        else:
            self.sink.guard.server_data(data)

    def connectionLost(self, reason: Any = None) -> None:
        if not self.sink.is_established and hasattr(self.sink.guard, "server_lost"):
            self.sink.guard.server_lost(reason)
        self.sink.finish("backend closed")
        self.sink.closed.callback(None)


class LoopSink:
    """
    A guard sink on the real reactor: server bytes go to the QEMU
    connection, client bytes to a scripted browser; C{start_tls} starts TLS
    on the QEMU connection, as the bridge does.

    @ivar done: fires with C{"established"} or the failure's L{ErrorCode}
        once the handshake ends, or with C{"relayed"} once
        C{relayed_wanted} bytes were relayed after it.
    """

    def __init__(self, port: int, browser: Callable[["LoopSink", bytes], None]):
        self.port = port
        self.browser = browser
        self.guard: Any = None
        self.transport: Any = None
        self.to_client = b""
        self.relayed = b""
        self.relayed_wanted = 0
        self.events: List[tuple] = []
        self.is_established = False
        self.done: Deferred = Deferred()
        self.closed: Deferred = Deferred()

    def dial(self) -> None:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, timeout=10)
        connectProtocol(endpoint, BackendClient(self)).addErrback(
            lambda f: self.finish("dial failed: %s" % (f.getErrorMessage(),))
        )

    def finish(self, result: Any) -> None:
        if not self.done.called:
            self.done.callback(result)

    def close(self) -> Optional[Deferred]:
        """
        Close the backend connection; the result fires once it is closed.
        """
        if self.transport is None:
            return None
        self.transport.loseConnection()
        return self.closed

    # sink methods
    def send_to_client(self, data: bytes) -> None:
        self.to_client += data
        self.browser(self, data)

    def send_to_server(self, data: bytes) -> None:
        self.transport.write(data)

    def start_tls(self, creator: Any) -> None:
        self.events.append(("start_tls",))
        self.transport.startTLS(creator)

    def admit(self, is_main: bool) -> None:
        self.events.append(("admit", is_main))
        self.dial()

    def spice_session(self, session_id: int) -> None:
        self.events.append(("spice_session", session_id))

    def established(self, client_rest: bytes = b"") -> None:
        self.events.append(("established",))
        if client_rest:
            self.send_to_server(client_rest)
        self.is_established = True
        if not self.relayed_wanted:
            self.finish("established")

    def check_relayed(self) -> None:
        if self.relayed_wanted and len(self.relayed) >= self.relayed_wanted:
            self.finish("relayed")

    def fail(self, error: Any, reason: str) -> None:
        self.events.append(("fail", error.code, reason))
        self.finish(error.code)


def novnc_browser() -> Callable[[LoopSink, bytes], None]:
    """
    The RFB 3.8 client side noVNC plays against the proxy.
    """
    state = {"step": 0}

    def browser(sink: LoopSink, data: bytes) -> None:
        got = sink.to_client
        if state["step"] == 0 and len(got) >= 12:
            state["step"] = 1
            sink.guard.client_data(b"RFB 003.008\n")
        elif state["step"] == 1 and len(got) >= 14:
            state["step"] = 2
            sink.guard.client_data(b"\x01")
        elif state["step"] == 2 and len(got) >= 18:
            state["step"] = 3
            sink.guard.client_data(b"\x01")  # ClientInit, shared

    return browser


def spice_link(channel_type: int, connection_id: int) -> bytes:
    """
    A link message as spice-html5 sends it (auth selection and mini header).
    """
    caps = struct.pack("<I", (1 << 0) | (1 << 3))
    body = LINK_MESS.pack(connection_id, channel_type, 0, 1, 0, LINK_MESS.size) + caps
    return LINK_HEADER.pack(b"REDQ", 2, 2, len(body)) + body


def spice_browser(browser_password: str) -> Callable[[LoopSink, bytes], None]:
    """
    The spice-html5 side: once the link reply is in, send auth mechanism
    SPICE and a ticket encrypted (with C{browser_password}) to the key it
    carries.
    """
    state = {"sent": False}

    def browser(sink: LoopSink, data: bytes) -> None:
        got = sink.to_client
        if state["sent"] or len(got) < LINK_HEADER.size + 4 + 162:
            return
        state["sent"] = True
        key = serialization.load_der_public_key(got[LINK_HEADER.size + 4 : LINK_HEADER.size + 4 + 162])
        ticket = key.encrypt(
            browser_password.encode() + b"\0",
            padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None),
        )
        sink.guard.client_data(struct.pack("<I", 1) + ticket)

    return browser


class RFBGuardQemuTests(TestCase):
    """
    The RFB guard against QEMU's VNC server with C{password=on}.
    """

    timeout = 30

    def setUp(self) -> None:
        self.qemu = start_qemu(self, vnc_password=VNC_PASSWORD, spice_password=SPICE_PASSWORD)

    def _console(self, password: Optional[str]) -> LoopSink:
        sink = LoopSink(self.qemu.vnc_port, novnc_browser())
        sink.guard = RFBGuard(sink, password)
        self.addCleanup(sink.close)
        sink.guard.start()
        sink.dial()
        return sink

    async def _right_password(self) -> None:
        sink = self._console(VNC_PASSWORD)
        # ServerInit: u16 width, u16 height, 16-byte pixel format, u32 name length.
        sink.relayed_wanted = 24
        result = await sink.done
        self.assertEqual(result, "relayed")
        self.assertEqual(sink.guard.security_type, 2)
        self.assertEqual(sink.to_client[:18], b"RFB 003.008\n\x01\x01\x00\x00\x00\x00")
        width, height = struct.unpack("!HH", sink.relayed[:4])
        self.assertGreater(width, 0)
        self.assertGreater(height, 0)
        self.assertEqual(sink.events, [("established",)])

    def test_vnc_auth_right_password(self) -> Deferred:
        """
        When the guard knows the VM's VNC password, VNC authentication
        succeeds and ServerInit arrives after the browser's ClientInit.
        """
        return Deferred.fromCoroutine(self._right_password())

    async def _wrong_password(self) -> None:
        sink = self._console("not-it")
        result = await sink.done
        self.assertEqual(result, ErrorCode.CONNECTION_FAILED)
        self.assertIn("console authentication failed", sink.events[-1][2])
        self.assertNotIn(("established",), sink.events)

    def test_vnc_auth_wrong_password(self) -> Deferred:
        """
        When the guard's password is wrong, the VM refuses it and the guard
        fails with CONNECTION_FAILED.
        """
        return Deferred.fromCoroutine(self._wrong_password())


class SpiceGuardQemuTests(TestCase):
    """
    The SPICE guard against QEMU's SPICE server with a ticket set.
    """

    timeout = 30

    def setUp(self) -> None:
        self.qemu = start_qemu(self, vnc_password=VNC_PASSWORD, spice_password=SPICE_PASSWORD)

    def _channel(
        self, password: str, expected: Optional[int], channel_type: int, connection_id: int
    ) -> LoopSink:
        sink = LoopSink(self.qemu.spice_port, spice_browser("what-the-browser-typed"))
        sink.guard = SpiceGuard(sink, password, expected)
        self.addCleanup(sink.close)
        sink.guard.start()
        sink.guard.client_data(spice_link(channel_type, connection_id))
        return sink

    async def _main_and_display(self) -> None:
        main = self._channel(SPICE_PASSWORD, None, 1, 0)
        self.assertEqual(await main.done, "established")
        self.assertEqual(main.events[0], ("admit", True))
        self.assertEqual(main.events[1][0], "spice_session")
        session_id = main.events[1][1]
        self.assertNotEqual(session_id, 0)
        # The browser got the link result OK, then a mini header for MAIN_INIT.
        init_at = main.to_client.index(struct.pack("<I", 0) + struct.pack("<H", SPICE_MSG_MAIN_INIT))
        msg_type, _size = MINI_HEADER.unpack_from(main.to_client, init_at + 4)
        self.assertEqual(msg_type, SPICE_MSG_MAIN_INIT)
        self.assertEqual(
            struct.unpack_from("<I", main.to_client, init_at + 4 + MINI_HEADER.size)[0], session_id
        )

        display = self._channel(SPICE_PASSWORD, session_id, 2, session_id)
        self.assertEqual(await display.done, "established")
        self.assertEqual(display.events, [("admit", False), ("established",)])
        self.assertTrue(display.to_client.endswith(struct.pack("<I", 0)))

    def test_main_then_display_channel(self) -> Deferred:
        """
        When the main channel links with the injected ticket, QEMU accepts it
        and the guard reports the session id; a display channel naming that
        session is then accepted too.
        """
        return Deferred.fromCoroutine(self._main_and_display())

    async def _wrong_password(self) -> None:
        main = self._channel("not-it", None, 1, 0)
        self.assertEqual(await main.done, ErrorCode.CONNECTION_FAILED)
        self.assertIn("console authentication failed", main.events[-1][2])

    def test_wrong_ticket_refused(self) -> Deferred:
        """
        When the guard's password is wrong, QEMU refuses the link and the
        guard fails with CONNECTION_FAILED.
        """
        return Deferred.fromCoroutine(self._wrong_password())
