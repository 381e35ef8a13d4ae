"""
Clipboard policy through the whole product against a real QEMU (issue 9),
proven by QEMU's own clipboard: a VNC client connected straight to QEMU
(with the extended clipboard) is told when QEMU's clipboard changes.

- to_vm off: a console's ClientCutText never sets QEMU's clipboard (the
  watcher hears nothing), while with to_vm on it does;
- from_vm off: when the watcher sets QEMU's clipboard, a console offering
  the extended clipboard hears nothing of it, while with from_vm on it
  gets QEMU's notify.
"""

from __future__ import annotations

import socket
import struct

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.integration.libvirt_fixtures import domain_xml, graphics_xml
from tests.integration.stack import Stack
from tests.integration.test_full_path import ALICE_KEY, VM_PATH, sha256
from tests.integration.test_rfbserver_qemu import PF_32, drain, handshake, set_encodings, start_plain_qemu
from vaporproxy.relay.rfbserver import EXTENDED_CLIPBOARD

UUID = "6c0f5a1e-7e0b-4c61-9d0e-5d9b0a1c2301"
CONFIG = """
server:
  listen: ["tcp:{port}:interface=127.0.0.1"]
auth:
  api_keys:
    - {{user: alice, sha256: "{alice}", vms: ["*"]}}
hypervisors:
  - uri: "{uri}"
console:
  allowed_hosts: ["127.0.0.1"]
  clipboard: {{to_vm: {to_vm}, from_vm: {from_vm}}}
logging:
  level: error
"""
#: A ServerCutText of the extended clipboard (QEMU's caps, notify, provide).
EXTENDED_CUT = b"\x03\x00\x00\x00\xff\xff\xff"


class ClipboardQemuTests(TestCase):
    timeout = 90

    def setUp(self) -> None:
        self.qemu = start_plain_qemu(self)

    def stack(self, to_vm: bool, from_vm: bool) -> Stack:
        return Stack.on_domains(
            self, reactor, [domain_xml("clip", UUID, [graphics_xml("vnc", self.qemu.vnc_port)])],
            lambda port, uri: CONFIG.format(port=port, alice=sha256(ALICE_KEY), uri=uri,
                                            to_vm=str(to_vm).lower(), from_vm=str(from_vm).lower()),
        )  # fmt: skip

    async def console(self, stack: Stack, extended: bool) -> object:
        status, info = await stack.get_json(f"{VM_PATH}/clip/console", key=ALICE_KEY)
        self.assertEqual(status, 200, info)
        ws = await stack.websocket(info["ws_path"], info["token"])
        client = ws.client
        await ws.until_length(12)
        client.send(b"RFB 003.008\n")
        await ws.until_length(14)
        client.send(b"\x01")
        await ws.until_length(18)
        client.send(b"\x01")
        await ws.until(lambda g: len(g) >= 42 and len(g) >= 42 + struct.unpack("!I", g[38:42])[0])
        encodings = [16, 0] + ([EXTENDED_CLIPBOARD] if extended else [])
        client.send(struct.pack("!Bxxx", 0) + PF_32 + set_encodings(encodings))
        client.send(struct.pack("!BBHHHH", 3, 0, 0, 0, 640, 480))
        await deferLater(reactor, 1.0, lambda: None)
        return ws

    def watcher(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.qemu.vnc_port), timeout=10)
        handshake(sock)
        sock.sendall(struct.pack("!Bxxx", 0) + PF_32 + set_encodings([16, 0, EXTENDED_CLIPBOARD]))
        drain(sock)  # QEMU's clipboard capabilities
        return sock

    async def console_sets_clipboard(self, to_vm: bool) -> bytes:
        stack = self.stack(to_vm=to_vm, from_vm=True)
        watcher = await deferToThread(self.watcher)
        try:
            ws = await self.console(stack, extended=False)
            text = b"copied in the browser"
            ws.client.send(struct.pack("!BxxxI", 6, len(text)) + text)
            return await deferToThread(drain, watcher)
        finally:
            watcher.close()
            await stack.stop()

    async def test_toVmOff(self) -> None:
        """
        When to_vm is off, a console's ClientCutText never reaches QEMU's clipboard; with it on, QEMU tells the watcher.
        """
        self.assertIn(EXTENDED_CUT, await self.console_sets_clipboard(to_vm=True))
        self.assertNotIn(EXTENDED_CUT, await self.console_sets_clipboard(to_vm=False))

    async def vm_clipboard_seen(self, from_vm: bool) -> bytes:
        stack = self.stack(to_vm=True, from_vm=from_vm)
        try:
            ws = await self.console(stack, extended=True)
            before = len(ws.received)

            def set_clipboard() -> None:
                with socket.create_connection(("127.0.0.1", self.qemu.vnc_port), timeout=10) as other:
                    handshake(other)
                    text = b"copied in the VM"
                    other.sendall(struct.pack("!BxxxI", 6, len(text)) + text)
                    drain(other)

            await deferToThread(set_clipboard)
            await deferLater(reactor, 1.0, lambda: None)
            return bytes(ws.received[before:])
        finally:
            await stack.stop()

    async def test_fromVmOff(self) -> None:
        """
        When from_vm is off, a console hears nothing of QEMU's clipboard; with it on, QEMU's notify reaches it.
        """
        self.assertIn(EXTENDED_CUT, await self.vm_clipboard_seen(from_vm=True))
        self.assertNotIn(EXTENDED_CUT, await self.vm_clipboard_seen(from_vm=False))
