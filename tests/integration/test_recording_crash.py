"""
A recording survives C{kill -9} of its proxy (SPEC.md "Recording and
playback": flushed at least once a second, so a crash leaves a playable
prefix).  A real proxy subprocess records a VNC console of a real QEMU
(SeaBIOS's text screen); it is killed mid-console; the file it left reads
back, is byte for byte what the browser had received up to at least a
second before the kill, and holds the VM's screen.  A new proxy on the
same directory lists it as interrupted and incomplete, and, where Chromium
is installed, its playback page plays it to the end and draws the screen.
"""

from __future__ import annotations

import os
import shutil
import time

from PIL import Image
from twisted.trial.unittest import SkipTest, TestCase

from tests.e2e.drivers import run_browser_driver
from tests.integration.proxy_cluster import ADMIN_KEY, CHECKOUT, HTTP, new_directory, sleep
from tests.integration.qemu_fixture import start_qemu
from tests.integration.recording_proxy import RecordingProxy, RFBScreen, VNCConsole, metric, vm_node
from vaporproxy.recordings.format import KIND_TO_BROWSER, read_recording

VNC_PASSWORD = "crash-secret"


def recorded_stream(directory: str) -> tuple:
    """The one recording in C{directory}: its header, what the browser received, whether it was cut."""
    [name] = [n for n in os.listdir(directory) if n.endswith(".vprec")]
    with open(os.path.join(directory, name), "rb") as f:
        header, records, cut = read_recording(f.read())
    return header, b"".join(r.data for r in records if r.kind == KIND_TO_BROWSER), cut


class RecordingCrashTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.qemu = start_qemu(self, vnc_password=VNC_PASSWORD)
        self.directory = new_directory()
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.recordings = os.path.join(self.directory, "recordings")
        self.uri = vm_node(self.directory, self.qemu.vnc_port, VNC_PASSWORD)
        self.http = HTTP()

    def proxy(self, name: str) -> RecordingProxy:
        proxy = RecordingProxy(name, self.directory, self.uri, self.recordings)
        proxy.start()
        self.addCleanup(proxy.stop)
        return proxy

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

    async def played(self, proxy: RecordingProxy, recording_id: str) -> None:
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
        self.assertGreater(bright, 1000, "SeaBIOS's text, drawn by noVNC from the cut recording")
