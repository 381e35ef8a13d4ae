"""
A recording survives C{kill -9} of its proxy (SPEC.md "Recording and
playback": flushed at least once a second, so a crash leaves a playable
prefix).  A real proxy subprocess records a VNC console of a real QEMU
(SeaBIOS's text screen); it is killed mid-console; the file it left reads
back, is byte for byte what the browser had received up to at least a
second before the kill, and holds the VM's screen.  A new proxy on the
same directory lists it as interrupted and incomplete, and, where Chromium
is installed, its playback page plays it to the end and draws the screen.

The same for a SPICE console (main, display, inputs, cursor, linked the
spice-html5 way): every channel is in the file in the order it was linked,
each holds exactly the bytes its WebSocket received up to at least a
second before the kill, and spice-html5 in the new proxy's page plays
every channel and draws the screen.
"""

from __future__ import annotations

import json
import os
import shutil
import time

from PIL import Image
from twisted.trial.unittest import SkipTest, TestCase

from tests.e2e.drivers import run_browser_driver
from tests.integration.proxy_cluster import ADMIN_KEY, CHECKOUT, HTTP, new_directory, sleep
from tests.integration.qemu_fixture import start_qemu
from tests.integration.recording_proxy import RecordingProxy, RFBScreen, VNCConsole, metric, vm_node
from tests.integration.libvirt_fixtures import domain_xml, graphics_xml, node_uri, write_node_file
from tests.integration.spice_console import CURSOR, DISPLAY, INPUTS, MAIN, SpiceConsole
from vaporproxy.recordings.format import KIND_CHANNEL_OPEN, KIND_TO_BROWSER, read_recording

VNC_PASSWORD = "crash-secret"
SPICE_PASSWORD = "crash-spice-secret"
SPICE_VM = "recorded-spice"
SPICE_UUID = "6c0f5a1e-7e0b-4c61-9d0e-5d9b0a1c2302"


def recorded(directory: str) -> tuple:
    """The one recording in C{directory}: its header, its records, whether it was cut."""
    [name] = [n for n in os.listdir(directory) if n.endswith(".vprec")]
    with open(os.path.join(directory, name), "rb") as f:
        return read_recording(f.read())


def recorded_stream(directory: str) -> tuple:
    """The one recording in C{directory}: its header, what the browser received, whether it was cut."""
    header, records, cut = recorded(directory)
    return header, b"".join(r.data for r in records if r.kind == KIND_TO_BROWSER), cut


class CrashTests(TestCase):
    """What the VNC and SPICE crash tests share: the proxies, and playing what a crash left."""

    timeout = 120

    def proxy(self, name: str) -> RecordingProxy:
        proxy = RecordingProxy(name, self.directory, self.uri, self.recordings)
        proxy.start()
        self.addCleanup(proxy.stop)
        return proxy

    async def played(self, proxy: RecordingProxy, recording_id: str) -> dict:
        """The playback page of a new proxy plays the cut recording to its end and draws the text."""
        if not (shutil.which("node") and os.path.exists("/usr/bin/chromium")
                and os.path.isdir(os.path.join(CHECKOUT, "node_modules", "playwright-core"))):  # fmt: skip
            raise SkipTest("playing it back needs node, Chromium and node_modules (npm ci); the file was checked")
        png = os.path.join(self.directory, "played.png")
        spec = {"url": f"{proxy.base}/console/recordings/{recording_id}#key={ADMIN_KEY}", "end_png": png,
                "timeout_ms": 30000}  # fmt: skip
        report = await run_browser_driver("playback_driver.mjs", spec)
        self.assertEqual(report["atEnd"]["state"], "ended", report)
        self.assertTrue(report["endPng"], report)
        bright = sum(1 for v in Image.open(png).convert("L").getdata() if v > 128)
        self.assertGreater(bright, 1000, "SeaBIOS's text, drawn by the client from the cut recording")
        return report


class RecordingCrashTests(CrashTests):
    def setUp(self) -> None:
        self.qemu = start_qemu(self, vnc_password=VNC_PASSWORD)
        self.directory = new_directory()
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.recordings = os.path.join(self.directory, "recordings")
        self.uri = vm_node(self.directory, self.qemu.vnc_port, VNC_PASSWORD)
        self.http = HTTP()

    async def test_killLeavesPlayablePrefix(self) -> None:
        """
        When the proxy is killed with SIGKILL mid-console, its recording reads back up to its last flush (at most a second before the kill) and holds the VM's screen; a new proxy lists it as interrupted and plays it.
        """
        proxy = self.proxy("A")
        await self.http.wait_ready(proxy)
        console = await VNCConsole.open(self.http, proxy)
        await console.update(incremental=False)
        for _ in range(12):  # the blinking cursor keeps bytes coming
            await sleep(0.25)
            await console.update(incremental=True)
        written = await metric(self.http, proxy, "vaporproxy_recording_bytes_written_total")
        self.assertGreater(written, console.width * console.height * 4, "counted while the console streams")
        killed_at = time.monotonic()
        proxy.kill()
        received = console.client.received

        header, stream, cut = recorded_stream(self.recordings)
        self.assertEqual((header["type"], header["vm_name"], header["user"]), ("vnc", "recorded", "root"))
        self.assertTrue(received.startswith(stream), "the file holds exactly what the browser received")
        flushed_by = console.received_by(killed_at - 1.2)
        self.assertGreaterEqual(len(stream), flushed_by, f"cut={cut}; received {len(received)}")
        screen = RFBScreen(stream)
        self.assertGreaterEqual(screen.updates, 1)
        self.assertGreater(screen.bright(), 1000, "SeaBIOS's text is in the recording")
        self.assertEqual(screen.pixels, RFBScreen(received[: len(stream)]).pixels)

        after = self.proxy("B")
        await self.http.wait_ready(after)
        code, body = await self.http.request("GET", after.base + "/api/v1/console/recordings", ADMIN_KEY)
        self.assertEqual(code, 200, body)
        [listed] = body["recordings"]
        self.assertEqual((listed["outcome"], listed["complete"]), ("INTERRUPTED", False))
        self.assertEqual(listed["id"], header["id"])
        await self.played(after, listed["id"])

class SpiceRecordingCrashTests(CrashTests):
    """A recorded SPICE console, its proxy killed."""

    def setUp(self) -> None:
        self.qemu = start_qemu(self, spice_password=SPICE_PASSWORD)
        self.directory = new_directory()
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.recordings = os.path.join(self.directory, "recordings")
        domain = domain_xml(SPICE_VM, SPICE_UUID, [graphics_xml("spice", self.qemu.spice_port, passwd=SPICE_PASSWORD)])
        self.uri = node_uri(write_node_file(self.directory, [domain]))
        self.http = HTTP()

    async def test_spiceKillLeavesPlayablePrefix(self) -> None:
        """
        When the proxy is killed with SIGKILL mid-SPICE-console, the file holds every channel in the order it was linked, each read back up to its last flush (at most a second before the kill) byte for byte as its WebSocket received it; a new proxy lists it as interrupted and spice-html5 plays every channel and draws the screen.
        """
        proxy = self.proxy("A")
        await self.http.wait_ready(proxy)
        console = await SpiceConsole.open(self.http, proxy, SPICE_VM)
        for _ in range(16):  # acks and pings answered: the display keeps streaming
            await sleep(0.25)
            console.serve()
        killed_at = time.monotonic()
        proxy.kill()

        header, records, cut = recorded(self.recordings)
        self.assertEqual((header["type"], header["vm_name"], header["user"]), ("spice", SPICE_VM, "root"))
        opens = [(r.channel, json.loads(r.data)) for r in records if r.kind == KIND_CHANNEL_OPEN]
        self.assertEqual([info["channel_type"] for _, info in opens], [MAIN, DISPLAY, INPUTS, CURSOR])
        self.assertEqual([channel for channel, _ in opens], [0, 1, 2, 3])
        times = [r.t_ms for r in records]
        self.assertEqual(times, sorted(times), "records in the order they happened")
        for (number, info), linked in zip(opens, console.channels):
            stream = b"".join(r.data for r in records if r.kind == KIND_TO_BROWSER and r.channel == number)
            received = linked.client.received
            what = f"channel {info['channel_type']}: {len(stream)} recorded of {len(received)}; cut={cut}"
            self.assertTrue(received.startswith(stream), what)
            self.assertGreaterEqual(len(stream), linked.received_by(killed_at - 1.2), what)
        display = console.channels[1]
        self.assertGreater(display.messages, 3, "the display drew (surface, image)")
        flushed_by = display.received_by(killed_at - 1.2)
        self.assertGreater(flushed_by, 5000, "the display's first image, before the last flush")
        self.assertGreater(display.samples[-1][1], flushed_by, "the display still streamed (blinking cursor)")

        after = self.proxy("B")
        await self.http.wait_ready(after)
        code, body = await self.http.request("GET", after.base + "/api/v1/console/recordings", ADMIN_KEY)
        self.assertEqual(code, 200, body)
        [listed] = body["recordings"]
        self.assertEqual((listed["id"], listed["outcome"], listed["complete"]), (header["id"], "INTERRUPTED", False))
        report = await self.played(after, listed["id"])
        end = report["atEnd"]
        self.assertEqual((end["type"], end["channels"], end["linked"], end["unplayed"]), ("spice", 4, 4, 0), end)
        self.assertEqual((report["errors"], end["clientErrors"]), ([], []), report)
