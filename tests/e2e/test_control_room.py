"""
End to end: the control room (issue 10) with a real VM, a real proxy that
records consoles, and Chromium: a console opened by the bundled page is
listed with its recording; its Watch link opens a view-only console; its
Terminate button closes it (4010) and the
recording is finished with that outcome.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SkipTest, TestCase

from tests.e2e.drivers import run_browser_driver
from tests.e2e.fixture import VM_NAME, environment, skip_reason


def control_room_spec(env: Any, proxy: Any, screenshot: str = "") -> Dict[str, Any]:
    base = proxy.base_url
    return {
        "console_url": f"{base}/console/{VM_NAME}?type=vnc#key={env.key}",
        "admin_url": f"{base}/admin#key={env.key}",
        "screenshot": screenshot,
        "timeout_ms": 30000,
    }


class ControlRoomTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        reason = skip_reason()
        if reason:
            raise SkipTest(reason)
        self.env = environment()
        self.recordings = os.path.join(self.env.workdir, "recordings")

    def test_listsRecordsTerminates(self) -> Deferred:
        """
        When a console is open, the control room lists it and its recording; Watch opens a view console of its VM; Terminate closes it with 4010.
        """
        proxy = self.env.proxy("recorded", sections={"recording": {"enabled": True, "dir": self.recordings}})

        async def go() -> None:
            r = await run_browser_driver("admin_driver.mjs", control_room_spec(self.env, proxy))
            why = json.dumps(r)[:3000] + self.env.proxy_log("recorded")
            self.assertNotIn("fatal", r, why)
            self.assertEqual(r["errors"], [], why)
            self.assertTrue(r["connected"], why)
            self.assertTrue(r["listed"], why)
            self.assertNotIn("key=", r["adminUrl"])
            [live] = r["admin"]["consoles"]
            self.assertEqual((live["type"], live["user"]), ("vnc", "e2e"))
            self.assertGreater(live["bytes_sent"], 0)
            self.assertEqual(r["rows"], 1)
            [recording] = r["admin"]["recordings"]
            self.assertEqual(recording["outcome"], "LIVE")
            self.assertEqual(r["playLinks"], [f"/console/recordings/{recording['id']}#key={self.env.key}"])
            self.assertEqual(r["watchLinks"], [f"/console/{live['vm_id']}?mode=view#key={self.env.key}"])
            self.assertTrue(r["watched"], why)
            self.assertEqual(r["watcher"]["mode"], "view", why)
            self.assertTrue(r["terminated"], why)
            self.assertEqual(r["console"]["state"], "failed", why)
            self.assertTrue(r["afterTerminate"], why)
            [ended] = [x for x in r["adminAfter"]["recordings"] if x["id"] == recording["id"]]
            self.assertEqual(ended["outcome"], "SESSION_TERMINATED")
            self.assertGreater(ended["size"], 1000)
            await self.played_back(proxy, recording["id"])

        return Deferred.fromCoroutine(go())

    async def played_back(self, proxy: Any, recording_id: str) -> None:
        """The recording plays in the playback page to its end and draws the VM's text screen."""
        from PIL import Image

        work = os.path.join(self.env.workdir, "playback-" + recording_id)
        os.makedirs(work, exist_ok=True)
        spec = {
            "url": f"{proxy.base_url}/console/recordings/{recording_id}#key={self.env.key}",
            "end_png": os.path.join(work, "end.png"),
            "seek_png": os.path.join(work, "seek.png"),
            "seek_ms": 500,
            "timeout_ms": 30000,
        }
        report = await run_browser_driver("playback_driver.mjs", spec)
        self.assertNotIn("fatal", report, report)
        self.assertEqual(report["atEnd"]["state"], "ended", report)
        self.assertGreater(report["atEnd"]["fed"], 3, report)
        self.assertTrue(report["endPng"], report)
        bright = sum(1 for value in Image.open(spec["end_png"]).convert("L").getdata() if value > 128)
        self.assertGreater(bright, 1000)  # SeaBIOS's text, drawn by noVNC from the recording
