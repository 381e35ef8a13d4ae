"""
End to end: a console recorded by the proxy and played back in the browser
(issue 10).  A VNC, then a SPICE, console of the interactive test VM (a
busybox shell) is opened by the bundled page on a proxy that records; a
person types a marker into it (the VM reports it on its serial port, and
the screen changes).  The recording then plays in the playback page with
the real noVNC / spice-html5 (one fake socket per recorded channel), driven
through the page's own controls: speed 8x, to the end, where it must draw
the very screen the live console showed last; then a seek to the middle,
Play and Pause, with elapsed/total shown.  The page shows the length before
it plays, and noVNC logs no "Disconnection timed out." after a seek.

A console still open (its recording LIVE) plays up to what was written, then
says "recording in progress — played up to now" (never "ended"); Load newer
plays what the console recorded since.
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
#: How long the live console stays open while its recording is played.
LIVE_MS = 40000
#: What the VM prints once a second while the live recording is played.
TICKING = "while true; do date; sleep 1; done"


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

    async def play(self, recording: Dict[str, Any], work: str, **options: Any) -> Dict[str, Any]:
        spec = {
            "url": f"{self.proxy.base_url}/console/recordings/{recording['id']}#key={self.env.key}",
            "end_png": os.path.join(work, "played-end.png"),
            "seek_png": os.path.join(work, "played-middle.png"),
            "speed": 8,
            "seek_middle": True,
            "play_pause": True,
            "settle_ms": 3500,  # past noVNC's 3 s disconnection timeout of the client the seek replaced
            "timeout_ms": 60000,
            **options,
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

        # The length was shown before the first play; no seek left a client waiting for its close.
        self.assertLengthShownAtOnce(report, end["durationMs"])
        self.assertNotIn("Disconnection timed out.", report["consoleErrors"], why)

        # Play moves on from there; Pause holds the position.
        pp = report["playPause"]
        self.assertEqual((pp["playing"]["state"], pp["playing"]["button"]), ("playing", "Pause"), why)
        self.assertGreater(pp["playing"]["positionMs"], middle["positionMs"] + 300, why)
        self.assertEqual((pp["paused"]["state"], pp["paused"]["button"]), ("paused", "Play"), why)
        self.assertEqual(pp["held"]["positionMs"], pp["paused"]["positionMs"], why)

    def assertLengthShownAtOnce(self, report: Dict[str, Any], duration_ms: float) -> None:
        """The first time the page showed with a known length was 0:00 of the whole length, before playing."""
        known = [e for e in report["timeLog"] if not e["shown"].startswith("-:--")]
        self.assertTrue(known, report["timeLog"])
        self.assertEqual(known[0]["shown"], f"0:00 / {clock(duration_ms)}", report["timeLog"])
        self.assertIn(known[0]["state"], ("loading", "ready"), report["timeLog"])
        self.assertNotIn("0:00 / 0:00", [e["shown"] for e in report["timeLog"]])

    async def live_recording(self, console_type: str, before: set) -> Dict[str, Any]:
        """The new LIVE recording of C{console_type}, once a few seconds of it are on disk."""
        for _ in range(300):
            new = [x for x in await self.recordings_of(console_type) if x["id"] not in before]
            if new and new[-1]["outcome"] == "LIVE" and new[-1]["size"] > 0:
                await deferLater(reactor, 5, lambda: None)  # the VM's clock ticks on the screen
                return new[-1]
            await deferLater(reactor, 0.2, lambda: None)
        raise AssertionError(f"no live {console_type} recording\n{self.env.proxy_log('recording')}")

    async def play_live(self, console_type: str, channels: int) -> None:
        work = os.path.join(self.env.workdir, f"played-live-{console_type}")
        os.makedirs(work, exist_ok=True)
        before = {x["id"] for x in await self.recordings_of(console_type)}
        marker = secrets.token_hex(6)  # typed once Ctrl+C stopped the ticking: the shell is free again
        console = Deferred.fromCoroutine(run_driver({"timeout_ms": 120000, "steps": [{
            "kind": "page", "url": self.page_url(self.proxy.base_url, GUEST_VM_NAME, f"?type={console_type}"),
            "until": "connected", "paint": True, "min_channels": channels, "timeout_ms": 60000,
            "actions": [{"wait_ms": 1500}, {"click": True}, {"type": TICKING}, {"press": "Enter"},
                        {"wait_ms": LIVE_MS}, {"press": "Control+c"}, {"wait_ms": 500}, {"type": f"mark {marker}"},
                        {"press": "Enter"}, {"wait_ms": 500}],
        }]}))  # fmt: skip
        recording = await self.live_recording(console_type, before)
        report = await self.play(recording, work, seek_middle=False, play_pause=False, load_newer_after_ms=1500)
        [r] = await console
        why = json.dumps(report)[:3000] + self.env.proxy_log("recording")
        self.assertTrue(r.get("reached"), self.explain("recording", r))
        await wait_for_serial(self.vm.serial, marker)
        self.assertNotIn("fatal", report, why)
        self.assertEqual(report["errors"], [], why)

        # Played up to what was written: in progress, not ended; the length "so far".
        end = report["atEnd"]
        self.assertEqual((end["state"], end["live"], end["outcome"]), ("live", True, "LIVE"), why)
        self.assertTrue(end["status"].startswith("recording in progress — played up to now"), why)
        self.assertTrue(end["moreShown"], why)
        self.assertEqual(end["shown"], f"{clock(end['durationMs'])} / {clock(end['durationMs'])} so far", why)
        self.assertEqual((end["linked"], end["unplayed"]), (end["channels"], 0), why)
        self.assertLengthShownAtOnce({"timeLog": [dict(e, shown=e["shown"].removesuffix(" so far"))
                                                  for e in report["timeLog"]]}, end["durationMs"])  # fmt: skip

        # Load newer: what the ticking console recorded since, played on to the new "now".
        newer = report["afterNewer"]
        self.assertTrue(report["loadedNewer"], why)
        self.assertEqual((newer["state"], newer["loads"]), ("live", 2), why)
        self.assertGreater(newer["durationMs"], end["durationMs"] + 1000, why)
        self.assertEqual(newer["positionMs"], newer["durationMs"], why)
        self.assertGreater(newer["fed"], end["fed"], why)
        self.assertEqual(newer["unplayed"], 0, why)

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

    def test_vnc_live_recording_played(self) -> Deferred:
        """
        When a VNC console is still open (the VM prints the time every second), its recording plays up to what was written and says "recording in progress — played up to now" instead of "ended"; Load newer plays on through what was recorded since.
        """
        return Deferred.fromCoroutine(self.play_live("vnc", 1))

    def test_spice_live_recording_played(self) -> Deferred:
        """
        When a SPICE console is still open (the VM prints the time every second), its recording plays every channel up to what was written and says "recording in progress — played up to now"; Load newer plays on through what was recorded since.
        """
        return Deferred.fromCoroutine(self.play_live("spice", 4))
