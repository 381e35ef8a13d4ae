"""
View-only and shared VNC consoles through the whole product, proven by
what the VM reports: the interactive test VM (a busybox shell) under plain
QEMU writes a marker to its serial port when C{mark MARKER} is typed.

A view-only console's keystrokes never reach the VM, while a control
console's do, at the same time on the same VM (both are shared: neither
disconnects the other).
"""

from __future__ import annotations

import secrets
import struct
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests.integration.libvirt_fixtures import domain_xml, graphics_xml
from tests.integration.qemu_fixture import start_guest_qemu
from tests.integration.stack import Stack
from tests.integration.test_full_path import ALICE_KEY, OPS_KEY, VM_PATH, sha256

VNC_PASSWORD = "guest-secret"
VIEW_KEY = "viewer-key-" + "c" * 21
UUID = "6c0f5a1e-7e0b-4c61-9d0e-5d9b0a1c2101"
RETURN = 0xFF0D

CONFIG = """
server:
  listen: ["tcp:{port}:interface=127.0.0.1"]
auth:
  api_keys:
    - {{user: alice, sha256: "{alice}", vms: ["*"]}}
    - {{user: viewer, sha256: "{viewer}", vms: ["*"], access: view}}
    - {{user: ops, sha256: "{ops}", vms: ["*"], admin: true}}
hypervisors:
  - uri: "{uri}"
console:
  allowed_hosts: ["127.0.0.1"]
logging:
  level: error
"""


def key_events(text: str) -> bytes:
    """KeyEvents (down, up) typing C{text} (unshifted characters) then Return."""
    keysyms = [ord(c) for c in text] + [RETURN]
    return b"".join(struct.pack("!BBHI", 4, down, 0, k) for k in keysyms for down in (1, 0))


class ViewOnlyGuestTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.qemu = start_guest_qemu(self, vnc_password=VNC_PASSWORD)
        domain = domain_xml("guest", UUID, [graphics_xml("vnc", self.qemu.vnc_port, passwd=VNC_PASSWORD)])
        self.stack = Stack.on_domains(
            self, reactor, [domain],
            lambda port, uri: CONFIG.format(port=port, alice=sha256(ALICE_KEY), viewer=sha256(VIEW_KEY),
                                            ops=sha256(OPS_KEY), uri=uri),
        )  # fmt: skip

    async def console(self, key: str, mode: str = "") -> tuple:
        status, info = await self.stack.get_json(f"{VM_PATH}/guest/console{mode}", key=key)
        self.assertEqual(status, 200, info)
        ws = await self.stack.websocket(info["ws_path"], info["token"])
        client = ws.client
        await ws.until_length(12)
        client.send(b"RFB 003.008\n")
        await ws.until_length(14)
        client.send(b"\x01")
        await ws.until_length(18)
        client.send(b"\x00")  # ClientInit: exclusive, as a rude client asks; the proxy shares it anyway
        await ws.until(lambda got: len(got) >= 42 and len(got) >= 42 + struct.unpack("!I", got[38:42])[0])
        return info, ws

    async def sleep(self, seconds: float) -> None:
        await deferLater(reactor, seconds, lambda: None)

    async def assert_only_shown(self, control: Any, shown: str, hidden: str) -> None:
        """
        Type the marker C{shown} on C{control}; it must reach the VM's
        serial log within 30 s, and C{hidden} (typed before) must not.
        """
        control.client.send(key_events(f"mark {shown}"))
        deadline = time.monotonic() + 30
        while shown not in self.qemu.serial.lines() and time.monotonic() < deadline:
            await self.sleep(0.2)
        lines = self.qemu.serial.lines()
        self.assertIn(shown, lines)
        self.assertFalse([line for line in lines if hidden in line], lines)

    async def test_viewOnlyKeysNeverReachTheVM(self) -> None:
        """
        When a view-only console and a control console type markers into the same VM at the same time, only the control console's reach it and neither console is disconnected.
        """
        viewer_info, viewer = await self.console(VIEW_KEY)
        self.assertEqual(viewer_info["mode"], "view")
        control_info, control = await self.console(ALICE_KEY)
        self.assertEqual(control_info["mode"], "control")
        # A view credential cannot ask for control.
        status, refused = await self.stack.get_json(f"{VM_PATH}/guest/console?mode=control", key=VIEW_KEY)
        self.assertEqual((status, refused["code"]), (403, "UNAUTHORIZED"))

        hidden = "v" + secrets.token_hex(6)
        viewer.client.send(key_events(f"mark {hidden}"))
        await self.sleep(3)
        await self.assert_only_shown(control, "c" + secrets.token_hex(6), hidden)
        self.assertFalse(viewer.client.state == viewer.client.STATE_CLOSED)
        self.assertFalse(control.client.state == control.client.STATE_CLOSED)
        status, metrics = await self.stack.get_text("/metrics", key=OPS_KEY)
        self.assertEqual(status, 200, metrics)
        self.assertIn("vaporproxy_consoles_view_only_total 1.0", metrics)
        self.assertRegex(metrics, r'vaporproxy_policy_dropped_messages_total\{[^}]*kind="input"[^}]*\} [1-9]')

    async def test_viewModeAsked(self) -> None:
        """
        When a control key asks for ?mode=view, its console is view-only too: its keys do not reach the VM.
        """
        info, viewer = await self.console(ALICE_KEY, "?mode=view")
        self.assertEqual(info["mode"], "view")
        hidden = "w" + secrets.token_hex(6)
        viewer.client.send(key_events(f"mark {hidden}"))
        await self.sleep(3)
        _, control = await self.console(ALICE_KEY)
        await self.assert_only_shown(control, "d" + secrets.token_hex(6), hidden)
