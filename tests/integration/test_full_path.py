"""
The whole product path on the real reactor over loopback: the service that
C{twistd vaporproxy} runs (built by L{vaporproxy.tap.makeService} from a
config file), libvirt's test driver with a node file written here, and a
VNC server (a fake RFB 3.8 server, or a real QEMU for SPICE) behind it.

HTTP (Bearer key) -> console info and token -> WebSocket with the token ->
the proxy's RFB/SPICE handshake with the VM (password injected) -> bytes
both ways; stats, replay, DELETE sessions, and the error paths.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import socket
import struct
import weakref
from typing import Any, Dict, List, Optional, Tuple

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from vaporproxy.guards.spice import LINK_HEADER, LINK_MESS, MINI_HEADER, SPICE_MSG_MAIN_INIT

from .fake_vnc import SERVER_INIT, FakeVNCServer, expected_response
from .libvirt_fixtures import domain_xml, graphics_xml
from .qemu_fixture import start_qemu
from .stack import ConsoleClientFactory, Stack

try:
    import libvirt
except ImportError:  # pragma: no cover
    libvirt = None

VM_PATH = "/api/v1/virtualization/virtualmachines"
STATS_PATH = "/api/v1/console/stats"

ALICE_KEY = "alice-key-" + "a" * 22
OPS_KEY = "ops-key-" + "b" * 24
VNC_PASSWORD = "vm-secret"
SPICE_PASSWORD = "spice-secret"

UUID_VNC = "6c0f5a1e-7e0b-4c61-9d0e-5d9b0a1c2001"
UUID_OFF = "6c0f5a1e-7e0b-4c61-9d0e-5d9b0a1c2002"
UUID_REFUSE = "6c0f5a1e-7e0b-4c61-9d0e-5d9b0a1c2003"
UUID_FAR = "6c0f5a1e-7e0b-4c61-9d0e-5d9b0a1c2004"
UUID_SPICE = "6c0f5a1e-7e0b-4c61-9d0e-5d9b0a1c2005"

CONFIG = """
server:
  listen: ["{listen}"]
auth:
  api_keys:
    - {{user: alice, sha256: "{alice}", vms: ["*"], admin: false}}
    - {{user: ops, sha256: "{ops}", vms: ["*"], admin: true}}
hypervisors:
  - uri: "{uri}"
console:
  allowed_hosts: ["127.0.0.1"]
  connection_timeout: 5s
  idle_timeout: {idle}
  max_connections_per_vm: {per_vm}
  enable_tls: {tls}
logging:
  level: error
"""


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def config_text(uri: str, listen: str, tls: bool = False, idle: str = "10m", per_vm: int = 5) -> str:
    """
    The config of the stack under test: two API keys (alice, ops as admin),
    one test-driver hypervisor, loopback only.
    """
    return CONFIG.format(
        listen=listen, alice=sha256(ALICE_KEY), ops=sha256(OPS_KEY), uri=uri, tls="true" if tls else "false",
        idle=idle,
        per_vm=per_vm,
    )


def start_stack(
    testcase: TestCase,
    domains: List[str],
    tls_files: Optional[Tuple[str, str, bytes]] = None,
    idle: str = "10m",
    per_vm: int = 5,
) -> Stack:
    """
    Write a node file holding C{domains} and start the stack on it (TLS
    with C{(key, cert, cert_pem)} when given).
    """
    if tls_files is None:
        return Stack.on_domains(
            testcase, reactor, domains,
            lambda port, uri: config_text(uri, f"tcp:{port}:interface=127.0.0.1", idle=idle, per_vm=per_vm),
        )
    key, cert, pem = tls_files
    return Stack.on_domains(
        testcase, reactor, domains,
        lambda port, uri: config_text(uri, f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}", tls=True),
        ca_pem=pem,
    )


async def rfb_to_client_init(testcase: TestCase, ws: ConsoleClientFactory, when: str = "") -> Any:
    """
    The browser's (noVNC's) side of RFB 3.8 against the proxy: version,
    security None (the only type offered), SecurityResult OK, then a
    shared ClientInit; answer the client protocol.  C{when} ends the
    failure messages.
    """
    client = ws.client
    got = await ws.until_length(12)
    testcase.assertEqual(got, b"RFB 003.008\n")
    client.send(b"RFB 003.008\n")
    got = await ws.until_length(14)
    testcase.assertEqual(got[12:14], b"\x01\x01", "the proxy offers exactly security type None" + when)
    client.send(b"\x01")
    got = await ws.until_length(18)
    testcase.assertEqual(got[14:18], b"\0\0\0\0", "SecurityResult OK" + when)
    client.send(b"\x01")  # ClientInit, shared
    return client


async def rfb_client_handshake(testcase: TestCase, ws: ConsoleClientFactory) -> Any:
    """
    L{rfb_to_client_init}, then the VM's ServerInit; answer the client protocol.
    """
    client = await rfb_to_client_init(testcase, ws)
    got = await ws.until_length(18 + len(SERVER_INIT))
    testcase.assertEqual(got[18 : 18 + len(SERVER_INIT)], SERVER_INIT)
    return client


async def echo(ws: ConsoleClientFactory, client: Any, payload: bytes) -> bytes:
    """
    Send C{payload} and answer what comes back after what was there.
    """
    before = len(ws.received)
    client.send(payload)
    got = await ws.until_length(before + len(payload))
    return got[before:]


def error_of(ws: ConsoleClientFactory) -> Dict[str, Any]:
    """
    The one JSON error text message the proxy sent before closing.
    """
    [text] = ws.texts
    return json.loads(text)


class VNCStackMixin:
    """
    Set-up of a stack whose VMs are a fake RFB server demanding VNC
    authentication (vm-vnc), a shut-off VM, a VM whose console port refuses
    connections and one whose console host is not allowed.
    """

    timeout = 20
    if libvirt is None:
        skip = "libvirt-python is not installed"

    #: console.idle_timeout and max_connections_per_vm of the stack under test.
    idle = "10m"
    per_vm = 5

    async def _start(self) -> None:
        self.vnc = await FakeVNCServer.listen(self, reactor, password=VNC_PASSWORD)
        closed = await FakeVNCServer.listen(self, reactor)
        refused_port = closed.port
        await closed.stop()
        domains = [
            domain_xml("vm-vnc", UUID_VNC, [graphics_xml("vnc", self.vnc.port, passwd=VNC_PASSWORD)]),
            domain_xml("vm-off", UUID_OFF, [graphics_xml("vnc", autoport=True)], running=False),
            domain_xml("vm-refuse", UUID_REFUSE, [graphics_xml("vnc", refused_port)]),
            domain_xml("vm-far", UUID_FAR, [graphics_xml("vnc", self.vnc.port, listen="127.0.0.2")]),
        ]
        self.stack = start_stack(self, domains, idle=self.idle, per_vm=self.per_vm)

    def setUp(self) -> Deferred:
        return Deferred.fromCoroutine(self._start())

    async def _live_console(self) -> Tuple[Dict[str, Any], ConsoleClientFactory, Any]:
        status, info = await self.stack.get_json(f"{VM_PATH}/vm-vnc/console", key=ALICE_KEY)
        self.assertEqual(status, 200, info)
        ws = await self.stack.websocket(info["ws_path"], info["token"])
        client = await rfb_client_handshake(self, ws)
        return info, ws, client


class FullPathVNCTests(VNCStackMixin, TestCase):
    """
    A VNC console through the whole stack.
    """

    async def _full_path(self) -> None:
        info, ws, client = await self._live_console()
        self.assertEqual(
            {k: info[k] for k in ("type", "host", "port", "ws_path", "tls_enabled", "password")},
            {
                "type": "vnc",
                "host": "127.0.0.1",
                "port": self.vnc.port,
                "ws_path": f"{VM_PATH}/vm-vnc/console/ws",
                "tls_enabled": False,
                "password": "********",
            },
        )
        self.assertRegex(info["token"], r"\A[0-9a-f]{64}\Z")
        self.assertIsNone(ws.client.websocket_protocol_in_use, "noVNC offers no subprotocol")
        self.assertRegex(info["expires_at"], r"\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")

        [session] = self.vnc.sessions
        self.assertEqual(session.security_type, 2)
        self.assertTrue(session.auth_ok)
        self.assertEqual(session.response, expected_response(VNC_PASSWORD, session.challenge))
        self.assertEqual(session.shared, 1)

        self.assertEqual(await echo(ws, client, b"keys and pointer"), b"keys and pointer")
        self.assertEqual(session.echoed, b"keys and pointer")
        big = os.urandom(200_000)
        self.assertEqual(await echo(ws, client, big), big)

        status, stats = await self.stack.get_json(STATS_PATH, key=OPS_KEY)
        self.assertEqual(status, 200, stats)
        self.assertEqual((stats["total_connections"], stats["connections_per_vm"]), (1, {UUID_VNC: 1}))
        [live] = stats["connections"]
        to_browser = 12 + 2 + 4 + len(SERVER_INIT) + 16 + len(big)
        from_browser = 12 + 1 + 1 + 16 + len(big)
        self.assertEqual(
            (live["vm_id"], live["type"], live["user"], live["bytes_sent"], live["bytes_received"]),
            (UUID_VNC, "vnc", "alice", to_browser, from_browser),
        )
        self.assertEqual(len(ws.received), to_browser)

        replay = await self.stack.websocket(info["ws_path"], info["token"])
        self.assertEqual(await replay.closed, (4003, "TOKEN_ALREADY_USED"))
        self.assertEqual(error_of(replay)["code"], "TOKEN_ALREADY_USED")
        self.assertEqual(len(self.vnc.sessions), 1, "a replay never reaches the VM")

        status, answer = await self.stack.request("DELETE", f"{VM_PATH}/{UUID_VNC}/console/sessions", key=OPS_KEY)
        self.assertEqual((status, answer), (200, {"terminated": 1}))
        self.assertEqual(await ws.closed, (4010, "SESSION_TERMINATED"))
        self.assertEqual(error_of(ws), {"type": "error", "code": "SESSION_TERMINATED",
                                        "error": "Console ended by an administrator"})  # fmt: skip
        await session.closed
        status, stats = await self.stack.get_json(STATS_PATH, key=OPS_KEY)
        self.assertEqual((stats["total_connections"], stats["connections"]), (0, []))
        status, metrics = await self.stack.get_text("/metrics", key=OPS_KEY)
        self.assertEqual(status, 200)
        self.assertIn('vaporproxy_console_outcomes_total{code="SESSION_TERMINATED"} 1.0', metrics)
        self.assertIn('vaporproxy_console_outcomes_total{code="TOKEN_ALREADY_USED"} 1.0', metrics)
        self.assertIn(f"vaporproxy_console_bytes_sent_total {float(to_browser)}", metrics)
        self.assertIn('vaporproxy_consoles_opened_total{type="vnc"} 1.0', metrics)

    def test_vncConsole(self) -> Deferred:
        """
        When a user asks for a console with a Bearer key and opens the
        WebSocket with the token, the proxy authenticates to the VM with the
        VM's password, bytes flow both ways and stats count them; a replay
        is refused with 4003 and DELETE sessions ends the console with 4010.
        """
        return Deferred.fromCoroutine(self._full_path())

    async def _other_vm(self) -> None:
        status, info = await self.stack.get_json(f"{VM_PATH}/vm-vnc/console", key=ALICE_KEY)
        self.assertEqual(status, 200, info)
        ws = await self.stack.websocket(f"{VM_PATH}/vm-refuse/console/ws", info["token"])
        self.assertEqual(await ws.closed, (4001, "INVALID_TOKEN"))
        self.assertEqual(error_of(ws)["code"], "INVALID_TOKEN")
        self.assertEqual(self.vnc.sessions, [])

    def test_tokenForAnotherVM(self) -> Deferred:
        """
        When a token issued for one VM is presented on another VM's
        WebSocket path, it closes with 4001 INVALID_TOKEN and no VM is dialled.
        """
        return Deferred.fromCoroutine(self._other_vm())

    async def _shutdown(self) -> None:
        _, ws, client = await self._live_console()
        await self.stack.root.stopService()
        self.assertEqual((await ws.closed)[0], 1001)
        await self.vnc.sessions[0].closed

    def test_shutdownClosesConsoles(self) -> Deferred:
        """
        When the service stops, a live console is closed with 1001 (going
        away) and its VM connection is closed.
        """
        return Deferred.fromCoroutine(self._shutdown())

    async def _shut_off(self) -> None:
        status, answer = await self.stack.get_json(f"{VM_PATH}/vm-off/console", key=ALICE_KEY)
        self.assertEqual((status, answer["type"], answer["code"]), (409, "error", "NO_CONSOLE_AVAILABLE"))

    def test_shutOffVM(self) -> Deferred:
        """
        When the VM is shut off, console info answers 409 NO_CONSOLE_AVAILABLE.
        """
        return Deferred.fromCoroutine(self._shut_off())

    async def _refused(self) -> None:
        status, info = await self.stack.get_json(f"{VM_PATH}/vm-refuse/console", key=ALICE_KEY)
        self.assertEqual(status, 200, info)
        ws = await self.stack.websocket(info["ws_path"], info["token"])
        self.assertEqual(await ws.closed, (4006, "CONNECTION_FAILED"))
        self.assertEqual(error_of(ws)["code"], "CONNECTION_FAILED")
        status, stats = await self.stack.get_json(STATS_PATH, key=OPS_KEY)
        self.assertEqual(stats["total_connections"], 0)

    def test_backendRefuses(self) -> Deferred:
        """
        When the VM's console port refuses connections, the WebSocket gets
        the JSON error and close 4006 CONNECTION_FAILED, and no slot is held.
        """
        return Deferred.fromCoroutine(self._refused())

    async def _far(self) -> None:
        status, answer = await self.stack.get_json(f"{VM_PATH}/vm-far/console", key=ALICE_KEY)
        self.assertEqual((status, answer["code"]), (403, "UNAUTHORIZED"))
        self.assertNotIn("127.0.0.2", str(answer))
        self.assertEqual(self.vnc.sessions, [])

    def test_consoleHostNotAllowed(self) -> Deferred:
        """
        When the console listens on a host outside allowed_hosts, console
        info answers 403 and no token is issued.
        """
        return Deferred.fromCoroutine(self._far())


class FreedWithoutCollectorTests(VNCStackMixin, TestCase):
    """
    When a console ends, its objects (both protocols and transports, the
    guard) are freed by reference counting as soon as both connections
    are gone: none is left in a reference cycle for the cyclic garbage
    collector, whose passes over every console's leftovers were a visible
    share of a console's set-up cost (issue #3).  The collector is off
    while these tests run.
    """

    def setUp(self) -> Deferred:
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        return super().setUp()

    async def _alive_after(self, ws: ConsoleClientFactory, refs: Dict[str, Any]) -> List[str]:
        """
        The browser goes away without a closing handshake (a closed tab);
        answer which of C{refs} are still alive once the proxy has closed
        the VM connection too.
        """
        [session] = self.vnc.sessions
        ws.client.dropConnection(abort=False)
        await ws.closed
        await session.closed
        for _ in range(20):
            if all(ref() is None for ref in refs.values()):
                break
            await deferLater(reactor, 0.01, lambda: None)
        return sorted(name for name, ref in refs.items() if ref() is not None)

    @staticmethod
    def _refs(owner: Any) -> Dict[str, Any]:
        refs = {"websocket": owner, "websocket transport": owner.transport, "guard": owner._guard}
        if owner._backend is not None:
            refs.update(backend=owner._backend, backend_transport=owner._backend.transport)
        return {name: weakref.ref(obj) for name, obj in refs.items() if obj is not None}

    async def _relaying(self) -> None:
        info, ws, client = await self._live_console()
        [record] = self.stack.pieces["registry"].consoles()
        refs = self._refs(record.owner)
        self.assertEqual(sorted(refs), ["backend", "backend_transport", "websocket", "websocket transport"])
        del record, client
        self.assertEqual(await self._alive_after(ws, refs), [])

    def test_relayingConsole(self) -> Deferred:
        """
        A console that was relaying: freed once both sides are closed.
        """
        return Deferred.fromCoroutine(self._relaying())

    async def _mid_handshake(self) -> None:
        status, info = await self.stack.get_json(f"{VM_PATH}/vm-vnc/console", key=ALICE_KEY)
        self.assertEqual(status, 200, info)
        ws = await self.stack.websocket(info["ws_path"], info["token"])
        await ws.until_length(12)
        [record] = self.stack.pieces["registry"].consoles()
        for _ in range(100):
            if record.owner._backend is not None:
                break
            await deferLater(reactor, 0.01, lambda: None)
        refs = self._refs(record.owner)
        self.assertEqual(
            sorted(refs), ["backend", "backend_transport", "guard", "websocket", "websocket transport"],
            "the VM is connected and the guard's handshake is under way",
        )
        del record
        self.assertEqual(await self._alive_after(ws, refs), [])

    def test_consoleEndedMidHandshake(self) -> Deferred:
        """
        A console whose browser left in the middle of the RFB handshake:
        the guard, whose parsers were waiting, is freed with the rest.
        """
        return Deferred.fromCoroutine(self._mid_handshake())


class SilentVMTests(TestCase):
    """
    A VM whose console port takes the TCP connection and never speaks (a
    listening socket nobody accepts on): the browser's half of the RFB
    handshake goes on meanwhile, and what it sends beyond it is bounded.
    """

    timeout = 20
    if libvirt is None:
        skip = "libvirt-python is not installed"

    def setUp(self) -> None:
        self.silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(self.silent.close)
        self.silent.bind(("127.0.0.1", 0))
        self.silent.listen(8)
        port = self.silent.getsockname()[1]
        self.stack = start_stack(self, [domain_xml("vm-silent", UUID_VNC, [graphics_xml("vnc", port)])])

    async def _flood(self) -> None:
        status, info = await self.stack.get_json(f"{VM_PATH}/vm-silent/console", key=ALICE_KEY)
        self.assertEqual(status, 200, info)
        ws = await self.stack.websocket(info["ws_path"], info["token"])
        # Its ClientInit is held until the VM side is done.
        client = await rfb_to_client_init(self, ws, when=" while the VM is silent")
        for _ in range(8):
            client.send(b"k" * 16384)  # 128 KiB the guard may not hold
        self.assertEqual(await ws.closed, (4012, "BAD_REQUEST"))
        self.assertEqual(error_of(ws)["code"], "BAD_REQUEST")
        status, stats = await self.stack.get_json(STATS_PATH, key=OPS_KEY)
        self.assertEqual(stats["total_connections"], 0)

    def test_browserFloodWhileVMSilent(self) -> Deferred:
        """
        While the VM has not spoken, the proxy answers the browser's
        version and security choice; a browser that then sends more than
        the guard holds is refused with 4012 BAD_REQUEST and frees its slot.
        """
        return Deferred.fromCoroutine(self._flood())


class LimitTests(VNCStackMixin, TestCase):
    """
    A stack with one console per VM.
    """

    per_vm = 1

    async def _limit(self) -> None:
        _, first, client = await self._live_console()
        # Console info issues a token; the limit is enforced when it is used.
        status, info = await self.stack.get_json(f"{VM_PATH}/vm-vnc/console", key=ALICE_KEY)
        self.assertEqual(status, 200, info)
        second = await self.stack.websocket(info["ws_path"], info["token"])
        self.assertEqual(await second.closed, (4007, "MAX_CONNECTIONS_REACHED"))
        self.assertEqual(error_of(second)["code"], "MAX_CONNECTIONS_REACHED")
        self.assertEqual(len(self.vnc.sessions), 1, "the refused console never reaches the VM")
        self.assertEqual(await echo(first, client, b"first still works"), b"first still works")
        client.sendClose(1000)
        await first.closed
        await self.vnc.sessions[0].closed
        _, again, client = await self._live_console()
        self.assertEqual(await echo(again, client, b"slot given back"), b"slot given back")

    def test_perVMLimit(self) -> Deferred:
        """
        When a VM already has max_connections_per_vm consoles, another one
        is refused with MAX_CONNECTIONS_REACHED before reaching the VM, and
        the slot is usable again once the first console closes.
        """
        return Deferred.fromCoroutine(self._limit())


class IdleTimeoutTests(VNCStackMixin, TestCase):
    """
    A stack with a short idle timeout.
    """

    idle = "300ms"

    async def _idle(self) -> None:
        _, ws, client = await self._live_console()
        self.assertEqual(await echo(ws, client, b"still here"), b"still here")
        self.assertEqual(await ws.closed, (4011, "IDLE_TIMEOUT"))
        self.assertEqual(error_of(ws)["code"], "IDLE_TIMEOUT")
        await self.vnc.sessions[0].closed

    def test_idleTimeout(self) -> Deferred:
        """
        When a console carries no bytes for idle_timeout, it is closed with
        4011 IDLE_TIMEOUT and its VM connection is closed.
        """
        return Deferred.fromCoroutine(self._idle())


def spice_link(channel_type: int, connection_id: int) -> bytes:
    """
    A SPICE link message as spice-html5 sends it (auth selection, mini header).
    """
    caps = struct.pack("<I", (1 << 0) | (1 << 3))
    body = LINK_MESS.pack(connection_id, channel_type, 0, 1, 0, LINK_MESS.size) + caps
    return LINK_HEADER.pack(b"REDQ", 2, 2, len(body)) + body


async def spice_link_channel(ws: ConsoleClientFactory, channel_type: int, connection_id: int) -> int:
    """
    Link one SPICE channel as spice-html5 does (with a ticket encrypted with
    a password the browser does not know); answer the link result.
    """
    client = ws.client
    client.send(spice_link(channel_type, connection_id))
    got = await ws.until_length(LINK_HEADER.size)
    magic, _, _, size = LINK_HEADER.unpack_from(got)
    assert magic == b"REDQ", got
    reply_end = LINK_HEADER.size + size
    got = await ws.until_length(reply_end)
    (error,) = struct.unpack_from("<I", got, LINK_HEADER.size)
    assert error == 0, error
    key = serialization.load_der_public_key(got[LINK_HEADER.size + 4 : LINK_HEADER.size + 4 + 162])
    ticket = key.encrypt(
        b"what-the-browser-typed\0",
        padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None),
    )
    client.send(struct.pack("<I", 1) + ticket)
    got = await ws.until_length(reply_end + 4)
    return struct.unpack_from("<I", got, reply_end)[0]


def main_init_session(got: bytes, start: int) -> Optional[int]:
    """
    The session id of the MAIN_INIT message (mini header) that starts at
    C{got[start:]}, or C{None} while it is incomplete.
    """
    if len(got) < start + MINI_HEADER.size + 4:
        return None
    msg_type, _size = MINI_HEADER.unpack_from(got, start)
    assert msg_type == SPICE_MSG_MAIN_INIT, msg_type
    return struct.unpack_from("<I", got, start + MINI_HEADER.size)[0]


class FullPathSpiceTests(TestCase):
    """
    A SPICE console through the whole stack against a real QEMU whose SPICE
    server has a ticket set.
    """

    timeout = 30
    if libvirt is None:
        skip = "libvirt-python is not installed"

    def setUp(self) -> None:
        self.qemu = start_qemu(self, spice_password=SPICE_PASSWORD)
        domains = [
            domain_xml(
                "vm-spice", UUID_SPICE, [graphics_xml("spice", self.qemu.spice_port, passwd=SPICE_PASSWORD)]
            )
        ]
        self.stack = start_stack(self, domains)

    async def _channels(self) -> None:
        status, info = await self.stack.get_json(f"{VM_PATH}/vm-spice/console", key=ALICE_KEY)
        self.assertEqual(status, 200, info)
        self.assertEqual((info["type"], info["port"], info["password"]), ("spice", self.qemu.spice_port, "********"))

        main = await self.stack.websocket(info["ws_path"], info["token"], protocols=["binary"])
        self.assertEqual(main.client.websocket_protocol_in_use, "binary")
        self.assertEqual(await spice_link_channel(main, 1, 0), 0, "QEMU accepted the injected ticket")
        main.received_before_init = main.received
        got = await main.until(lambda got: main_init_session(got, len(main.received_before_init)) is not None)
        session_id = main_init_session(got, len(main.received_before_init))
        self.assertNotEqual(session_id, 0)

        display = await self.stack.websocket(info["ws_path"], info["token"], protocols=["binary"])
        self.assertEqual(await spice_link_channel(display, 2, session_id), 0)

        wrong = await self.stack.websocket(info["ws_path"], info["token"], protocols=["binary"])
        wrong.client.send(spice_link(2, session_id ^ 0x5A5A))
        self.assertEqual(await wrong.closed, (4003, "TOKEN_ALREADY_USED"))

        status, stats = await self.stack.get_json(STATS_PATH, key=OPS_KEY)
        [live] = stats["connections"]
        self.assertEqual((live["vm_id"], live["type"], live["channels"]), (UUID_SPICE, "spice", 2))
        self.assertEqual(stats["total_connections"], 1)

        # The session ends with its main channel: its other channels close,
        # and the session id no longer admits anyone.
        main.client.sendClose(1000)
        self.assertEqual((await main.closed)[0], 1000)
        self.assertEqual((await display.closed)[0], 1000)
        late = await self.stack.websocket(info["ws_path"], info["token"], protocols=["binary"])
        late.client.send(spice_link(2, session_id))
        self.assertEqual(await late.closed, (4003, "TOKEN_ALREADY_USED"))
        self.assertEqual(error_of(late)["code"], "TOKEN_ALREADY_USED")
        status, stats = await self.stack.get_json(STATS_PATH, key=OPS_KEY)
        self.assertEqual((stats["total_connections"], stats["connections"]), (0, []))

    def test_mainAndDisplayChannels(self) -> Deferred:
        """
        When the main channel links through the proxy (which injects the
        ticket), QEMU accepts it; a display channel with the same token and
        the session id from MAIN_INIT is admitted, one with another session
        id is refused with 4003; once the main channel closes, the other
        channels close and the session id admits no one.
        """
        return Deferred.fromCoroutine(self._channels())


class ShareLinkTests(VNCStackMixin, TestCase):
    """
    A share link through the whole stack (issue 9).
    """

    async def _shared(self) -> None:
        status, share = await self.stack.request(
            "POST", f"{VM_PATH}/vm-vnc/console/shares", key=ALICE_KEY, body=b'{"mode": "view", "max_uses": 2}'
        )
        self.assertEqual(status, 201, share)
        secret = share["url"].split("#share=")[1]
        status, info = await self.stack.request(
            "GET", f"{VM_PATH}/vm-vnc/console", authorization=f"Share {secret}"
        )
        self.assertEqual((status, info["mode"]), (200, "view"), info)
        ws = await self.stack.websocket(info["ws_path"], info["token"])
        await rfb_client_handshake(self, ws)
        status, stats = await self.stack.get_json(STATS_PATH, key=OPS_KEY)
        [live] = stats["connections"]
        self.assertEqual((live["share_id"], live["mode"]), (share["share_id"], "view"), live)
        status, answer = await self.stack.request(
            "DELETE", f"{VM_PATH}/vm-vnc/console/shares/{share['share_id']}", key=ALICE_KEY
        )
        self.assertEqual((status, answer["consoles_closed"]), (200, 1), answer)
        code, reason = await ws.closed
        self.assertEqual(code, 4010)
        self.assertEqual(error_of(ws)["error"], "Share link revoked")
        status, info = await self.stack.request("GET", f"{VM_PATH}/vm-vnc/console", authorization=f"Share {secret}")
        self.assertEqual((status, info["code"]), (401, "INVALID_TOKEN"))

    def test_shareOpensAndRevokeCloses(self) -> Deferred:
        """
        When a share link opens a console, stats name its share; when its creator revokes it, that console closes with 4010 saying the link was revoked, and the link stops working.
        """
        return Deferred.fromCoroutine(self._shared())
