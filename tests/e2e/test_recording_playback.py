"""
End to end: a console recorded by the proxy and played back in the browser
(issue 10).  A VNC, then a SPICE, console of the interactive test VM (a
busybox shell) is opened by the bundled page on a proxy that records; a
person types a marker into it (the VM reports it on its serial port, and
the screen changes).  The recording then plays in the playback page with
the real noVNC / spice-html5 (one fake socket per recorded channel), driven
through the page's own controls: speed 8x, to the end, where it must draw
the very screen the live console showed last; then a seek to the middle,
Play and Pause, with elapsed/total shown.
"""

from __future__ import annotations

import json
import os
import secrets
from typing import Any, Dict, Tuple

import treq
from PIL import Image, ImageChops
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.web.client import HTTPConnectionPool

from tests.e2e.drivers import run_browser_driver
from tests.e2e.fixture import GUEST_VM_NAME, run_driver, wait_for_serial
from tests.e2e.test_console import E2ETestCase

#: Seconds the console stays open after the typing: the recording must be
#: long enough for 1 s of playback at 8x to stay short of its end.
LINGER_MS = 9000


def clock(ms: float) -> str:
    """The page's m:ss."""
    seconds = int(ms // 1000)
    return f"{seconds // 60}:{seconds % 60:02d}"


def differing(a: str, b: str) -> Tuple[int, int]:
    """(pixels that differ, pixels in all) between two same-sized PNGs."""
    first, second = Image.open(a).convert("RGB"), Image.open(b).convert("RGB")
    if first.size != second.size:
        raise AssertionError(f"screens of different sizes: {first.size} and {second.size}")
    changed = ImageChops.difference(first, second).convert("L").point(lambda v: 255 if v else 0)
    return changed.histogram()[255], first.size[0] * first.size[1]


class RecordingPlaybackTests(E2ETestCase):
    timeout = 300

    def setUp(self) -> None:
        super().setUp()
        self.vm = self.env.guest_vm()
        self.recordings = os.path.join(self.env.workdir, "recordings-playback")
        self.proxy = self.env.proxy("recording", sections={"recording": {"enabled": True, "dir": self.recordings}})

    async def recordings_of(self, console_type: str) -> list:
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await treq.get(f"{self.proxy.base_url}/api/v1/console/recordings?vm={GUEST_VM_NAME}",
                                  headers={"Authorization": f"Bearer {self.env.key}"}, pool=pool)  # fmt: skip
        self.assertEqual(response.code, 200)
        return [x for x in json.loads(await response.content())["recordings"] if x["type"] == console_type]

    async def record(self, console_type: str, channels: int, work: str) -> Dict[str, Any]:
        """Type a marker into a live console of the shell VM; answer its finished recording."""
        before = {x["id"] for x in await self.recordings_of(console_type)}
        marker = secrets.token_hex(6)
        [r] = await run_driver(
            {
                "timeout_ms": 90000,
                "steps": [
                    {
                        "kind": "page",
                        "url": self.page_url(self.proxy.base_url, GUEST_VM_NAME, f"?type={console_type}"),
                        "until": "connected",
                        "paint": True,
                        "min_channels": channels,
                        "timeout_ms": 60000,
                        "canvas_png_before": os.path.join(work, "live-before.png"),
                        "actions": [{"wait_ms": 1500}, {"click": True}, {"type": f"mark {marker}"}, {"press": "Enter"},
                                    {"wait_ms": LINGER_MS}],  # fmt: skip
                        "canvas_png": os.path.join(work, "live-end.png"),
                    }
                ],
            }
        )
        why = self.explain("recording", r)
        self.assertTrue(r.get("reached"), why)
        self.assertEqual(r.get("acted"), 5, why)
        self.assertEqual(r["saved"], {"before": True, "end": True}, why)
        await wait_for_serial(self.vm.serial, marker)
        for _ in range(100):  # the console ends as the browser goes
            new = [x for x in await self.recordings_of(console_type) if x["id"] not in before]
            if new and new[-1]["outcome"] != "LIVE":
                return new[-1]
            await deferLater(reactor, 0.2, lambda: None)
        raise AssertionError(f"no finished {console_type} recording: {new}\n{self.env.proxy_log('recording')}")

    async def play(self, recording: Dict[str, Any], work: str) -> Dict[str, Any]:
        spec = {
            "url": f"{self.proxy.base_url}/console/recordings/{recording['id']}#key={self.env.key}",
            "end_png": os.path.join(work, "played-end.png"),
            "seek_png": os.path.join(work, "played-middle.png"),
            "speed": 8,
            "seek_middle": True,
            "play_pause": True,
            "timeout_ms": 60000,
        }
        return await run_browser_driver("playback_driver.mjs", spec)

    async def record_and_play(self, console_type: str, channels: int) -> None:
        work = os.path.join(self.env.workdir, f"played-{console_type}")
        os.makedirs(work, exist_ok=True)
        recording = await self.record(console_type, channels, work)
        self.assertGreater(recording["duration_s"], LINGER_MS / 1000)
        report = await self.play(recording, work)
        why = json.dumps(report)[:3000] + self.env.proxy_log("recording")
        self.assertNotIn("fatal", report, why)
        self.assertEqual(report["errors"], [], why)

        # At 8x, one second of real time is about eight of the recording.
        self.assertIn("speedCheck", report, why)
        speed = report["speedCheck"]
        self.assertEqual(speed["speed"], 8, why)
        self.assertGreater(speed["toMs"] - speed["fromMs"], 4 * speed["realMs"], why)

        # The end: every recorded channel played, and the live console's last screen drawn.
        end = report["atEnd"]
        self.assertEqual((end["state"], end["type"]), ("ended", console_type), why)
        self.assertEqual(end["linked"], end["channels"], why)
        self.assertGreaterEqual(end["channels"], channels, why)
        self.assertEqual(end["unplayed"], 0, why)
        self.assertEqual(end["shown"], f"{clock(end['durationMs'])} / {clock(end['durationMs'])}", why)
        self.assertTrue(report["endPng"], why)
        names = ("live-before.png", "live-end.png", "played-end.png")
        live_before, live_end, played_end = (os.path.join(work, name) for name in names)
        typed, pixels = differing(live_before, live_end)
        off, _ = differing(played_end, live_end)
        self.assertGreater(typed, 200, "typing did not change the live screen")
        # The same screen, but for what changed after the live picture (the blinking cursor).
        self.assertLess(off, max(pixels // 100, typed // 4), f"{off} of {pixels} pixels differ; typing changed {typed}")

        # The middle: drawn, paused there, its time shown.
        middle = report["afterSeek"]
        self.assertEqual(middle["state"], "paused", why)
        self.assertAlmostEqual(middle["positionMs"], report["seekTarget"], delta=1)
        self.assertEqual(middle["shown"], f"{clock(report['seekTarget'])} / {clock(end['durationMs'])}", why)
        self.assertGreater(middle["fed"], 0, why)
        self.assertTrue(report["seekPng"], why)
        shades = Image.open(os.path.join(work, "played-middle.png")).convert("L").getextrema()
        self.assertGreater(shades[1] - shades[0], 100, "the middle of the recording drew nothing")

        # Play moves on from there; Pause holds the position.
        pp = report["playPause"]
        self.assertEqual((pp["playing"]["state"], pp["playing"]["button"]), ("playing", "Pause"), why)
        self.assertGreater(pp["playing"]["positionMs"], middle["positionMs"] + 300, why)
        self.assertEqual((pp["paused"]["state"], pp["paused"]["button"]), ("paused", "Play"), why)
        self.assertEqual(pp["held"]["positionMs"], pp["paused"]["positionMs"], why)

    def test_vnc_recorded_and_played(self) -> Deferred:
        """
        When a VNC console with typing in it was recorded, the playback page plays it with noVNC at 8x to the end and draws the live console's last screen, seeks to the middle, plays and pauses.
        """
        return Deferred.fromCoroutine(self.record_and_play("vnc", 1))

    def test_spice_recorded_and_played(self) -> Deferred:
        """
        When a SPICE console (main, display, inputs, cursor channels) with typing in it was recorded, the playback page plays every channel with spice-html5 at 8x to the end and draws the live console's last screen, seeks to the middle, plays and pauses.
        """
        return Deferred.fromCoroutine(self.record_and_play("spice", 4))
