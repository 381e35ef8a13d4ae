"""
Tests for L{vaporproxy.http.recordings}: the recordings admin API.
"""

import json
import os

from treq.testing import StubTreq
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from vaporproxy.errors import ConsoleError
from vaporproxy.filewriter import DiskWriter
from vaporproxy.http.recordings import filter_recordings
from tests.http.test_api import ADMIN_KEY, USER_KEY, Harness
from vaporproxy.recordings.store import RecordingStore

VM = "6f1b2a3c-1111-4222-8333-944455556666"
BASE = "http://proxy.test/api/v1/console/recordings"


def inline(f, *args):
    """Run a 'thread pool' function at once (the store's C{run})."""
    return succeed(f(*args))


class RecordingsAPITests(SynchronousTestCase):
    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.clock = Clock()
        self.clock.advance(1_764_000_000)
        self.store = RecordingStore(self.dir, DiskWriter(self.clock, threaded=False), self.clock, inline)
        self.ids = []
        for user, name in (("alice", "web-1"), ("bob", "db-1")):
            recorder = self.store.start(vm_id=VM, vm_name=name, console_type="vnc", user=user)
            recorder.to_browser(recorder.open_channel(), b"screen bytes")
            self.clock.advance(60)
            self.store.finish(recorder, bytes_sent=12, outcome=None)
            self.ids.append(recorder.id)
        # twisted.web's pull producer runs on the global reactor's
        # cooperator; drive it with the test's clock instead.
        from twisted.internet import _producer_helpers
        from twisted.internet.task import Cooperator

        cooperator = Cooperator(scheduler=lambda step: self.clock.callLater(0, step))
        self.patch(_producer_helpers, "cooperate", cooperator.cooperate)
        self.treq = StubTreq(Harness(recordings=self.store).api.resource())

    def get(self, url, method="GET", admin=True):
        headers = {"Authorization": f"Bearer {ADMIN_KEY if admin else USER_KEY}"}
        d = self.treq.request(method, url, headers=headers)
        for _ in range(10):
            self.treq.flush()
            self.clock.advance(0)
        response = self.successResultOf(d)
        return response, self.successResultOf(response.content())

    def test_list(self):
        """
        When an admin lists recordings, each has the SPEC's fields.
        """
        response, body = self.get(BASE)
        self.assertEqual(response.code, 200)
        found = json.loads(body)["recordings"]
        self.assertEqual([r["id"] for r in found], self.ids)
        self.assertEqual(
            set(found[0]),
            {"id", "vm_id", "vm_name", "type", "user", "started_at", "ended_at", "duration_s", "bytes", "outcome", "size",
             "complete", "dropped"},
        )  # fmt: skip
        self.assertEqual(found[0]["duration_s"], 60.0)
        self.assertEqual((found[0]["complete"], found[0]["dropped"]), (True, None))

    def test_filters(self):
        """
        When vm, user or since are given, only matching recordings are listed; a bad since is 400.
        """
        self.assertEqual(len(json.loads(self.get(BASE + "?user=bob")[1])["recordings"]), 1)
        self.assertEqual(len(json.loads(self.get(BASE + "?vm=web-1")[1])["recordings"]), 1)
        self.assertEqual(len(json.loads(self.get(BASE + "?vm=" + VM)[1])["recordings"]), 2)
        self.assertEqual(len(json.loads(self.get(BASE + "?since=2025-11-24T16:01:00Z")[1])["recordings"]), 1)
        response, body = self.get(BASE + "?since=yesterday")
        self.assertEqual((response.code, json.loads(body)["code"]), (400, "BAD_REQUEST"))

    def test_oneAndData(self):
        """
        When an admin asks for one recording and its data, the metadata and the file's bytes come back.
        """
        response, body = self.get(f"{BASE}/{self.ids[0]}")
        self.assertEqual(json.loads(body)["user"], "alice")
        response, body = self.get(f"{BASE}/{self.ids[0]}/data")
        self.assertEqual(response.code, 200)
        self.assertTrue(body.startswith(b"VPREC\x01"))
        self.assertIn(b"screen bytes", body)

    def test_notAdmin(self):
        """
        When the caller is not an admin, every route answers 403 and no recording.
        """
        for url in (BASE, f"{BASE}/{self.ids[0]}", f"{BASE}/{self.ids[0]}/data"):
            response, body = self.get(url, admin=False)
            self.assertEqual(response.code, 403)
            self.assertNotIn(b"screen bytes", body)

    def test_delete(self):
        """
        When an admin deletes a recording, it is gone; deleting it again, or an unknown id, is 404.
        """
        response, _ = self.get(f"{BASE}/{self.ids[0]}", method="DELETE")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.get(f"{BASE}/{self.ids[0]}")[0].code, 404)
        self.assertEqual(self.get(f"{BASE}/{self.ids[0]}", method="DELETE")[0].code, 404)
        self.assertEqual(self.get(f"{BASE}/..%2f..%2fetc", method="DELETE")[0].code, 404)

    def test_deleteLive(self):
        """
        When the recording's console is still open, deleting it is refused.
        """
        live = self.store.start(vm_id=VM, vm_name="web-1", console_type="vnc", user="alice")
        response, body = self.get(f"{BASE}/{live.id}", method="DELETE")
        self.assertEqual(response.code, 400)


class FilterTests(SynchronousTestCase):
    def test_missingTimeZone(self):
        """
        When since has no time zone, it is refused rather than read as local time.
        """
        self.assertRaises(ConsoleError, filter_recordings, [], None, None, "2025-01-01T00:00:00")


class RecordingsOffTests(SynchronousTestCase):
    def test_notEnabled(self):
        """
        When recording is not configured, the recordings routes answer a JSON 404 and the pages still load.
        """
        h = Harness()
        d = h.treq.get(BASE, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        h.treq.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 404)
        self.assertEqual(json.loads(self.successResultOf(response.content()))["code"], "NOT_FOUND")
        for page in ("http://proxy.test/admin", "http://proxy.test/console/recordings/" + "0" * 32):
            d = h.treq.get(page)
            h.treq.flush()
            response = self.successResultOf(d)
            self.assertEqual(response.code, 200)
            self.assertIn("script-src 'self'", response.headers.getRawHeaders("content-security-policy")[0])
