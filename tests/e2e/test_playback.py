"""
End to end: a recording of a real QEMU VNC screen, played back in headless
Chromium by the bundled playback page with the real noVNC.

The recording is made the way the proxy records a console: everything a
browser received over a security-None RFB 3.8 session, with times.  The
page must draw the same screen the VM showed (compared pixel by pixel with
a live capture), reach the end, and seek back to the middle, showing the
length before it plays and with no "Disconnection timed out." from the
client the seek replaced.  A recording still being made plays to what was
written and says so; Load newer plays what was recorded since.
"""

import os
import shutil
import socket
import struct
import subprocess
import time

from twisted.internet import reactor
from twisted.internet.defer import succeed
from twisted.internet.task import LoopingCall
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.server import Site

from vaporproxy.filewriter import DiskWriter
from vaporproxy.recordings.store import RecordingStore
from tests.e2e.drivers import run_browser_driver
from tests.http.test_api import ADMIN_KEY, Harness
from tests.integration.qemu_fixture import start_bios_qemu
from tests.support import recv_exactly

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOVNC = os.path.join(REPO, "node_modules", "@novnc", "novnc")
VM = "6f1b2a3c-1111-4222-8333-944455556666"

#: The pixel format noVNC asks for: 32 bpp, depth 24, little endian, true colour, RGB at shifts 0/8/16.
NOVNC_PIXEL_FORMAT = struct.pack("!BBBBHHHBBBxxx", 32, 24, 0, 1, 255, 255, 255, 0, 8, 16)


def skip_reason():
    for binary in ("qemu-system-x86_64", "node", "/usr/bin/chromium"):
        if shutil.which(binary) is None:
            return f"{binary} is not installed"
    if not os.path.isdir(NOVNC):
        return "node_modules/@novnc/novnc is missing (npm ci)"
    return None


def recv_exact(sock, size):
    return recv_exactly(sock, size, closed=lambda: AssertionError("VNC server closed"))


def record_vnc(port, recorder, seconds):
    """
    Be a browser on a security-None session for C{seconds}, recording what
    it receives; answer the framebuffer size.
    """
    channel = recorder.open_channel({"channel_type": None})
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    with sock:
        version = recv_exact(sock, 12)
        recorder.to_browser(channel, version)
        sock.sendall(b"RFB 003.008\n")
        count = recv_exact(sock, 1)
        types = recv_exact(sock, count[0])
        recorder.to_browser(channel, count + types)
        assert 1 in types, types
        sock.sendall(b"\x01")
        result = recv_exact(sock, 4)
        recorder.to_browser(channel, result)
        sock.sendall(b"\x01")  # ClientInit: shared
        head = recv_exact(sock, 24)
        name = recv_exact(sock, struct.unpack("!I", head[20:24])[0])
        recorder.to_browser(channel, head + name)
        width, height = struct.unpack("!HH", head[:4])
        sock.sendall(b"\x00\x00\x00\x00" + NOVNC_PIXEL_FORMAT)
        sock.sendall(struct.pack("!BxHi", 2, 1, 0))  # SetEncodings: Raw
        sock.sendall(struct.pack("!BBHHHH", 3, 0, 0, 0, width, height))
        sock.settimeout(0.1)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                data = sock.recv(65536)
            except socket.timeout:
                sock.sendall(struct.pack("!BBHHHH", 3, 1, 0, 0, width, height))
                continue
            if not data:
                break
            recorder.to_browser(channel, data)
    return width, height


def capture_live(port, path):
    """A PNG of the VM's screen now, taken by vncdotool."""
    subprocess.run(["vncdotool", "-s", f"127.0.0.1::{port}", "capture", path], check=True, timeout=30)


def text_overlap(played_png, live_png):
    """
    Of the live screen's bright (text) pixels, the fraction that are bright
    in the played one too, and how many bright pixels the live one has (a
    blank or shifted canvas scores near 0, not near 1).
    """
    from PIL import Image

    played = Image.open(played_png).convert("L")
    live = Image.open(live_png).convert("L")
    if played.size != live.size:
        return 0.0, 0
    bright = [i for i, value in enumerate(live.getdata()) if value > 128]
    played_data = list(played.getdata())
    hits = sum(1 for i in bright if played_data[i] > 128)
    return hits / max(1, len(bright)), len(bright)


class PlaybackTests(TestCase):
    timeout = 180

    def setUp(self):
        reason = skip_reason()
        if reason:
            raise SkipTest(reason)
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)
        self.port = start_bios_qemu(self, shutil.which("qemu-system-x86_64"))

    def serve(self, store):
        """The console API (pages, scripts, noVNC, recordings API) on loopback."""
        api = Harness(static_dirs={"novnc": NOVNC}, recordings=store).api
        port = reactor.listenTCP(0, Site(api.resource()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}"

    async def test_playsTheRecordedScreen(self):
        """
        When a recorded VNC console is opened in the playback page, noVNC draws the VM's screen, reaches the end and seeks back.
        """
        time.sleep(3)  # SeaBIOS draws its "No bootable device" screen
        writer = DiskWriter(reactor)
        self.addCleanup(writer.stopService)
        store = RecordingStore(self.work, writer, reactor, lambda f, *a: succeed(f(*a)))
        recorder = store.start(vm_id=VM, vm_name="bios-vm", console_type="vnc", user="alice")
        width, height = record_vnc(self.port, recorder, 2.5)
        live_png = os.path.join(self.work, "live.png")
        capture_live(self.port, live_png)
        store.finish(recorder, bytes_sent=recorder.size, outcome=None)
        writer.stopService()
        base = self.serve(store)
        spec = {
            "url": f"{base}/console/recordings/{recorder.id}#key={ADMIN_KEY}",
            "end_png": os.path.join(self.work, "end.png"),
            "seek_png": os.path.join(self.work, "seek.png"),
            "seek_ms": 1200,
            "settle_ms": 3500,  # past noVNC's 3 s disconnection timeout
            "timeout_ms": 30000,
        }
        report = await run_browser_driver("playback_driver.mjs", spec)
        self.assertNotIn("fatal", report, report.get("fatal"))
        self.assertEqual(report["errors"], [])
        self.assertTrue(report["ended"], report)
        self.assertEqual(report["atEnd"]["state"], "ended")
        self.assertEqual(report["atEnd"]["type"], "vnc")
        self.assertNotIn("key=", report["urlAfterLoad"])
        self.assertTrue(report["endPng"])
        overlap, bright = text_overlap(spec["end_png"], live_png)
        self.assertGreater(bright, 1000)  # the live screen has text to compare
        self.assertGreater(overlap, 0.98)
        self.assertEqual(report["afterSeek"]["seeks"], 1)
        self.assertEqual(report["afterSeek"]["state"], "paused")
        self.assertGreater(report["afterSeek"]["positionMs"], 1000)
        self.assertTrue(report["seekPng"])
        self.assertGreater(text_overlap(spec["seek_png"], live_png)[0], 0.98)
        # The length (the metadata's duration) before the first play; the seek's old client closed cleanly.
        total = clock(round(store_meta(store, recorder.id)["duration_s"] * 1000))
        known = [e for e in report["timeLog"] if not e["shown"].startswith("-:--")]
        self.assertEqual(known[0]["shown"], f"0:00 / {total}", report["timeLog"])
        self.assertIn(known[0]["state"], ("loading", "ready"), report["timeLog"])
        self.assertEqual(report["atEnd"]["shown"], f"{total} / {total}")
        self.assertEqual(report["consoleErrors"], [])
        self.assertFalse(report["atEnd"]["moreShown"])

    async def test_liveRecording(self):
        """
        When a recording is still being made, the page plays what was written, then says "recording in progress — played up to now" (not "ended") with the length "so far"; Load newer fetches what was written since and plays on.
        """
        time.sleep(3)
        writer = DiskWriter(reactor)
        self.addCleanup(writer.stopService)
        store = RecordingStore(self.work, writer, reactor, lambda f, *a: succeed(f(*a)))
        recorder = store.start(vm_id=VM, vm_name="bios-vm", console_type="vnc", user="alice")
        self.addCleanup(store.finish, recorder, bytes_sent=0, outcome=None)
        record_vnc(self.port, recorder, 1.5)
        # The console goes on: a Bell every 200 ms (drawn by nothing, but played in order).
        bells = LoopingCall(recorder.to_browser, 0, b"\x02")
        bells.start(0.2)
        self.addCleanup(bells.stop)
        base = self.serve(store)
        report = await run_browser_driver("playback_driver.mjs", {
            "url": f"{base}/console/recordings/{recorder.id}#key={ADMIN_KEY}",
            "load_newer_after_ms": 1500, "timeout_ms": 30000,
        })  # fmt: skip
        self.assertNotIn("fatal", report, report.get("fatal"))
        self.assertEqual(report["errors"], [])
        end = report["atEnd"]
        self.assertEqual((end["state"], end["live"], end["outcome"]), ("live", True, "LIVE"), report)
        self.assertEqual(end["status"], "recording in progress — played up to now; Load newer plays what was recorded since")
        self.assertTrue(end["moreShown"])
        self.assertEqual(end["shown"], f"{clock(end['durationMs'])} / {clock(end['durationMs'])} so far")
        self.assertTrue(report["loadedNewer"], report)
        newer = report["afterNewer"]
        self.assertEqual((newer["state"], newer["loads"], newer["unplayed"]), ("live", 2, 0), report)
        self.assertGreater(newer["durationMs"], end["durationMs"] + 1000)
        self.assertEqual(newer["positionMs"], newer["durationMs"])
        self.assertGreater(newer["fed"], end["fed"] + 5)  # the bells written since


def clock(ms):
    """The page's m:ss."""
    seconds = int(ms // 1000)
    return f"{seconds // 60}:{seconds % 60:02d}"


def store_meta(store, recording_id):
    """A recording's metadata as the API lists it."""
    [meta] = [m for m in store.list().result if m["id"] == recording_id]
    return meta
