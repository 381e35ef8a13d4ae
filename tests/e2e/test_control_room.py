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

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import HTTPConnectionPool

from tests.e2e.drivers import run_browser_driver
from tests.e2e.fixture import API_PREFIX, VM_NAME, environment, skip_reason


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
            self.assertEqual((live["share_id"], r["users"]), (None, ["e2e"]))
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

    def test_shareWatcherNamed(self) -> Deferred:
        """
        When a console is opened through a share link, the control room shows it as its creator "via share <id>", and Terminate tells its page an administrator ended it.
        """
        proxy = self.env.proxy("recorded", sections={"recording": {"enabled": True, "dir": self.recordings}})

        async def go() -> None:
            created = await treq.post(
                f"{proxy.base_url}{API_PREFIX}{VM_NAME}/console/shares",
                data=json.dumps({"mode": "view"}).encode(),
                headers={"Authorization": f"Bearer {self.env.key}"},
                pool=HTTPConnectionPool(reactor, persistent=False),
            )
            share = json.loads(await created.content())
            self.assertEqual(created.code, 201, share)
            page, fragment = share["url"].split("#", 1)
            spec = control_room_spec(self.env, proxy)
            spec["console_url"] = f"{proxy.base_url}{page}?type=vnc#{fragment}"
            r = await run_browser_driver("admin_driver.mjs", spec)
            why = json.dumps(r)[:3000] + self.env.proxy_log("recorded")
            self.assertNotIn("fatal", r, why)
            self.assertTrue(r["listed"], why)
            [live] = r["admin"]["consoles"]
            self.assertEqual((live["user"], live["share_id"], live["mode"]), ("e2e", share["share_id"], "view"), why)
            self.assertEqual(r["users"], [f"e2e via share {share['share_id']}"], why)
            self.assertTrue(r["terminated"], why)
            self.assertEqual(r["console"]["errorText"], "Console ended by an administrator", why)

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
