"""
C{console.min_update_interval} against a real QEMU through the whole
product (issue 9): a browser that asks for an incremental update as soon as
it has one (as noVNC does) on an idle screen (SeaBIOS's, with its blinking
cursor) receives at least half fewer bytes when the proxy holds its update
requests to one per interval.
"""

from __future__ import annotations

import struct
import time

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, TestCase

from tests.integration.libvirt_fixtures import domain_xml, graphics_xml
from tests.integration.stack import Stack
from tests.integration.test_full_path import ALICE_KEY, VM_PATH, sha256
from tests.integration.qemu_fixture import qemu_available, start_bios_qemu

UUID = "6c0f5a1e-7e0b-4c61-9d0e-5d9b0a1c2201"
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
  min_update_interval: {interval}
logging:
  level: error
"""
PIXEL_FORMAT = struct.pack("!BBBBHHHBBBxxx", 32, 24, 0, 1, 255, 255, 255, 0, 8, 16)


class UpdatePacingTests(TestCase):
    timeout = 90

    def setUp(self) -> None:
        binary = qemu_available()
        if binary is None:
            raise SkipTest("qemu-system-x86_64 is not installed")
        self.vnc_port = start_bios_qemu(self, binary)
        time.sleep(2)  # SeaBIOS has drawn its screen; only the cursor blinks

    def stack(self, interval: str) -> Stack:
        return Stack.on_domains(
            self, reactor, [domain_xml("bios", UUID, [graphics_xml("vnc", self.vnc_port)])],
            lambda port, uri: CONFIG.format(port=port, alice=sha256(ALICE_KEY), uri=uri, interval=interval),
        )

    async def polled_bytes(self, interval: str, seconds: float = 4.0) -> int:
        """Bytes an eager poller receives for C{seconds} after the first full update."""
        stack = self.stack(interval)
        status, info = await stack.get_json(f"{VM_PATH}/bios/console", key=ALICE_KEY)
        self.assertEqual(status, 200, info)
        ws = await stack.websocket(info["ws_path"], info["token"])
        client = ws.client
        await ws.until_length(12)
        client.send(b"RFB 003.008\n")
        await ws.until_length(14)
        client.send(b"\x01")
        await ws.until_length(18)
        client.send(b"\x01")
        got = await ws.until(lambda g: len(g) >= 42 and len(g) >= 42 + struct.unpack("!I", g[38:42])[0])
        width, height = struct.unpack("!HH", got[18:22])
        client.send(b"\x00\x00\x00\x00" + PIXEL_FORMAT + struct.pack("!BxHi", 2, 1, 0))
        request = struct.pack("!BBHHHH", 3, 1, 0, 0, width, height)
        client.send(struct.pack("!BBHHHH", 3, 0, 0, 0, width, height))
        await deferLater(reactor, 1.0, lambda: None)
        start = len(ws.received)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            client.send(request)  # noVNC asks again as soon as it drew an update
            await deferLater(reactor, 0.02, lambda: None)
        received = len(ws.received) - start
        await stack.stop()
        return received

    async def test_pacingHalvesIdleTraffic(self) -> None:
        """
        When min_update_interval is 1s, an eager poller of an idle screen receives at most half the bytes it does without.
        """
        free = await self.polled_bytes("0s")
        paced = await self.polled_bytes("1s")
        print(f"\n  idle screen, eager poller: {free} bytes unpaced, {paced} bytes with min_update_interval 1s")
        self.assertGreater(free, 0)
        self.assertLessEqual(paced, free / 2)
