"""
Tests for L{vaporproxy.recordings.recorder} and L{vaporproxy.recordings.store}:
recording a console, its metadata, listing, retention.
"""

import errno
import json
import os

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from vaporproxy import filewriter
from vaporproxy.filewriter import DiskWriter
from vaporproxy.recordings.format import KIND_CHANNEL_OPEN, KIND_FROM_BROWSER, KIND_TO_BROWSER, read_recording
from vaporproxy.recordings.recorder import BATCH, FLUSH_AFTER, recording_path
from vaporproxy.recordings.store import RecordingStore, cleanup_directory

VM = "6f1b2a3c-1111-4222-8333-944455556666"


def inline(f, *args):
    """Run a 'thread pool' function at once (the store's C{run})."""
    return succeed(f(*args))


class RecordingTests(SynchronousTestCase):
    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.clock = Clock()
        self.clock.advance(1000)
        self.dropped = []
        self.writer = DiskWriter(self.clock, threaded=False)
        self.store = self.make_store()

    def make_store(self, **kwargs):
        return RecordingStore(self.dir, self.writer, self.clock, inline, on_dropped=self.dropped.append, **kwargs)

    def record_one(self, store, data=b"frame", user="alice"):
        recorder = store.start(vm_id=VM, vm_name="web-1", console_type="vnc", user=user)
        channel = recorder.open_channel({"channel_type": None})
        self.clock.advance(1.5)
        recorder.to_browser(channel, data)
        recorder.from_browser(channel, b"keys")
        return recorder

    def test_recordAndReadBack(self):
        """
        When a console is recorded and ends, its file holds the screen bytes with times and its metadata says how it ended.
        """
        recorder = self.record_one(self.store)
        meta = self.store.finish(recorder, bytes_sent=5, outcome=None)
        with open(recording_path(self.dir, recorder.id), "rb") as f:
            header, records, cut = read_recording(f.read())
        self.assertEqual(header["vm_id"], VM)
        self.assertFalse(cut)
        self.assertEqual([(r.kind, r.t_ms, r.data) for r in records[1:]], [(KIND_TO_BROWSER, 1500, b"frame")])
        self.assertEqual(records[0].kind, KIND_CHANNEL_OPEN)
        self.assertEqual(meta["outcome"], "ok")
        self.assertEqual(meta["duration_s"], 1.5)
        with open(os.path.join(self.dir, recorder.id + ".json")) as f:
            self.assertEqual(json.load(f)["size"], meta["size"])

    def test_inputOnlyWhenAsked(self):
        """
        When include_input is on, the browser's bytes are recorded too; by default they are not.
        """
        store = self.make_store(include_input=True)
        recorder = self.record_one(store)
        store.finish(recorder, bytes_sent=5, outcome=None)
        with open(recording_path(self.dir, recorder.id), "rb") as f:
            _, records, _ = read_recording(f.read())
        self.assertIn((KIND_FROM_BROWSER, b"keys"), [(r.kind, r.data) for r in records])

    def test_listLiveFinishedInterrupted(self):
        """
        When one recording ended, one is live and one has no metadata from an earlier process, the list tells them apart.
        """
        finished = self.record_one(self.store)
        self.store.finish(finished, bytes_sent=5, outcome="IDLE_TIMEOUT")
        live = self.record_one(self.store)
        crashed = self.record_one(self.make_store())
        listed = {m["id"]: m for m in self.successResultOf(self.store.list())}
        self.assertEqual(listed[finished.id]["outcome"], "IDLE_TIMEOUT")
        self.assertEqual(listed[live.id]["outcome"], "LIVE")
        self.assertEqual(listed[crashed.id]["outcome"], "INTERRUPTED")
        self.assertEqual(listed[crashed.id]["user"], "alice")
        self.assertEqual(
            [listed[r.id]["complete"] for r in (finished, live, crashed)], [True, None, False]
        )

    def test_endedBeforeItsMetadataIsWritten(self):
        """
        When a console has ended but the disk thread has not yet written its metadata, the list shows the final outcome, not LIVE.
        """
        queued = []
        self.writer.replace = lambda path, data: queued.append(path)
        recorder = self.record_one(self.store)
        self.store.finish(recorder, bytes_sent=5, outcome="SESSION_TERMINATED")
        self.assertEqual(len(queued), 1)
        [listed] = self.successResultOf(self.store.list())
        self.assertEqual((listed["id"], listed["outcome"], listed["bytes"]), (recorder.id, "SESSION_TERMINATED", 5))
        self.assertEqual(listed["size"], os.path.getsize(recording_path(self.dir, recorder.id)))

    def recorder_past_high_water(self, holds):
        """
        A recorder whose one channel reports its holds into C{holds}, with
        400 bytes queued for a held disk: past the writer's high-water mark.
        """
        self.writer.high_water, self.writer.low_water = 400, 100  # the file header is ~250 bytes
        self.writer.hold()
        recorder = self.store.start(vm_id=VM, vm_name="web-1", console_type="vnc", user="alice")
        recorder.attach(holds.append)
        recorder.to_browser(0, b"a" * 400)
        return recorder

    def test_slowDiskHoldsTheConsole(self):
        """
        When the disk falls behind, the console's channels stop reading from the VM until it caught up, and the recording loses nothing.
        """
        holds = []
        recorder = self.recorder_past_high_water(holds)
        self.assertEqual(holds, [True])
        late = []
        recorder.attach(late.append)  # a channel opened while the disk is behind
        self.assertEqual(late, [True])
        self.writer.step()
        self.assertEqual((holds, late), ([True, False], [True, False]))
        meta = self.store.finish(recorder, bytes_sent=400, outcome=None)
        self.writer.step()
        with open(recording_path(self.dir, recorder.id), "rb") as f:
            _, records, cut = read_recording(f.read())
        self.assertEqual(([r.data for r in records], cut), ([b"a" * 400], False))
        self.assertTrue(meta["complete"])
        self.assertEqual(self.dropped, [])

    def test_stalledDiskDropsRecordingOnly(self):
        """
        When the disk writes nothing of a held console's recording for the stall timeout, the recording is dropped and reported, the console's reads let go, and later recording calls are ignored.
        """
        holds = []
        recorder = self.recorder_past_high_water(holds)
        self.clock.advance(self.writer.stall_timeout + 1)
        self.assertEqual(holds, [True, False])
        self.assertFalse(recorder.active)
        self.assertEqual(len(self.dropped), 1)
        self.assertIn("wrote none", self.dropped[0])
        recorder.to_browser(0, b"more")
        recorder.detach(holds.append)
        self.assertEqual(len(self.dropped), 1)

    def test_metadataSaysWhatTheDiskFinallyWrote(self):
        """
        When a console ends while its records still wait for the disk, its metadata file gives the size and completeness once they are written.
        """
        self.writer.hold()
        recorder = self.store.start(vm_id=VM, vm_name="web-1", console_type="vnc", user="alice")
        recorder.to_browser(0, b"a" * 1000)
        meta = self.store.finish(recorder, bytes_sent=1000, outcome=None)
        self.assertEqual(meta["size"], 0)  # nothing written yet
        self.writer.step()
        with open(os.path.join(self.dir, recorder.id + ".json")) as f:
            written = json.load(f)
        self.assertEqual(written["size"], os.path.getsize(recording_path(self.dir, recorder.id)))
        self.assertTrue(written["complete"])

    def test_metadataSaysIncompleteWhenTheLastWritesFail(self):
        """
        When the records still waiting at the console's end fail to be written, its metadata file says incomplete.
        """
        self.writer.hold()
        recorder = self.store.start(vm_id=VM, vm_name="web-1", console_type="vnc", user="alice")
        recorder.to_browser(0, b"a" * 1000)
        self.assertTrue(self.store.finish(recorder, bytes_sent=1000, outcome=None)["complete"])

        def full(fd, parts, size):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        self.writer.step(1)  # the open
        self.patch(filewriter, "_writev_all", full)
        self.writer.step()
        with open(os.path.join(self.dir, recorder.id + ".json")) as f:
            self.assertFalse(json.load(f)["complete"])
        self.assertEqual(len(self.dropped), 1)

    def test_failedDiskDropsRecordingOnly(self):
        """
        When a write fails (the disk is full), the recording is given up and reported once; recording calls go on without error.
        """
        def full(fd, parts, size):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        self.patch(filewriter, "_writev_all", full)
        recorder = self.record_one(self.store, data=b"x" * 100)
        recorder.to_browser(0, b"more")
        self.assertFalse(recorder.active)
        self.assertEqual(len(self.dropped), 1)
        self.assertIn("No space left on device", self.dropped[0])
        self.assertFalse(self.store.finish(recorder, bytes_sent=104, outcome=None)["complete"])

    def test_droppedListedTruthfully(self):
        """
        When a recording was dropped, the list says it is not complete and why, while its console is live and after it ended.
        """
        def full(fd, parts, size):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        real = filewriter._writev_all
        self.patch(filewriter, "_writev_all", full)
        recorder = self.record_one(self.store, data=b"x" * 100)
        [live] = self.successResultOf(self.store.list())
        self.assertEqual((live["outcome"], live["complete"]), ("LIVE", False))
        self.assertIn("No space left on device", live["dropped"])
        self.patch(filewriter, "_writev_all", real)  # the disk has room again for the metadata
        meta = self.store.finish(recorder, bytes_sent=100, outcome=None)
        self.assertEqual((meta["outcome"], meta["complete"]), ("ok", False))
        self.assertEqual(meta["dropped"], live["dropped"])
        [ended] = self.successResultOf(self.store.list())
        self.assertEqual((ended["complete"], ended["dropped"]), (False, live["dropped"]))
        with open(os.path.join(self.dir, recorder.id + ".json")) as f:
            self.assertEqual(json.load(f)["complete"], False)

    def test_writtenWhileLive(self):
        """
        When consoles are being recorded, the store tells how many bytes their files hold so far (a record within FLUSH_AFTER); ended ones no longer count.
        """
        first = self.record_one(self.store, data=b"x" * 100)
        second = self.record_one(self.store, data=b"y" * 50)
        before = self.store.written()
        self.assertEqual(before, first.size + second.size)
        first.to_browser(0, b"z" * 1000)
        self.assertEqual(self.store.written(), before)  # in its batch, for now
        self.clock.advance(FLUSH_AFTER)
        self.assertGreaterEqual(self.store.written(), before + 1000)
        self.store.finish(first, bytes_sent=1100, outcome=None)
        self.assertEqual(self.store.written(), second.size)

    def test_recordsReachTheWriterInBatches(self):
        """
        When records come in, the writer gets them as one write once a batch is full or FLUSH_AFTER after it began, and the console's end hands over the rest and leaves no timer.
        """
        self.writer.hold()
        recorder = self.store.start(vm_id=VM, vm_name="web-1", console_type="vnc", user="alice")
        queued = self.writer.pending  # the file header
        for _ in range(3):
            recorder.to_browser(0, b"s" * 100)
        self.assertEqual(self.writer.pending, queued)
        self.clock.advance(FLUSH_AFTER)
        self.assertEqual(self.writer.pending, queued + 3 * 111)
        recorder.to_browser(0, b"b" * BATCH)  # a full batch goes at once
        recorder.to_browser(0, b"t" * 10)
        self.assertEqual(self.writer.pending, queued + 3 * 111 + 11 + BATCH)
        self.store.finish(recorder, bytes_sent=BATCH + 310, outcome=None)
        recorder.close_channel(0)  # after the end: not recorded, no timer
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.writer.step()
        with open(recording_path(self.dir, recorder.id), "rb") as f:
            _, records, cut = read_recording(f.read())
        self.assertEqual([r.data for r in records], [b"s" * 100] * 3 + [b"b" * BATCH, b"t" * 10])
        self.assertFalse(cut)

    def test_batchOfManySmallRecords(self):
        """
        When a batch holds more buffers than one writev takes (IOV_MAX, 1024), every record is still written, in order.
        """
        recorder = self.store.start(vm_id=VM, vm_name="web-1", console_type="vnc", user="alice")
        keys = [bytes([i % 256]) for i in range(3000)]
        for key in keys:
            recorder.to_browser(0, key)
        self.store.finish(recorder, bytes_sent=len(keys), outcome=None)
        with open(recording_path(self.dir, recorder.id), "rb") as f:
            _, records, cut = read_recording(f.read())
        self.assertEqual(([r.data for r in records], cut, self.dropped), (keys, False, []))

    def test_batchIsAQuarterOfTheHighWaterMarkAtMost(self):
        """
        When the writer's high-water mark is small, a batch goes to the writer at a quarter of it, so backpressure still holds the console in time.
        """
        self.writer.high_water, self.writer.low_water = 4000, 1000
        self.writer.hold()
        recorder = self.store.start(vm_id=VM, vm_name="web-1", console_type="vnc", user="alice")
        queued = self.writer.pending
        recorder.to_browser(0, b"q" * 1000)
        self.assertEqual(self.writer.pending, queued + 1011)

    def test_droppedRecordingKeepsNoBatch(self):
        """
        When a recording was dropped, later records are not kept in memory for it.
        """
        def full(fd, parts, size):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        self.patch(filewriter, "_writev_all", full)
        recorder = self.record_one(self.store)
        recorder.to_browser(0, b"x" * 1000)
        self.assertEqual((recorder.active, recorder._batch), (False, []))

    def test_retentionByAge(self):
        """
        When the cleanup runs, recordings older than the retention are deleted and newer ones kept.
        """
        old = self.record_one(self.store)
        self.store.finish(old, bytes_sent=5, outcome=None)
        self.clock.advance(3600)
        new = self.record_one(self.store)
        self.store.finish(new, bytes_sent=5, outcome=None)
        store = self.make_store(retention_s=1800)
        self.assertEqual(self.successResultOf(store.cleanup()), [old.id])
        self.assertEqual([m["id"] for m in self.successResultOf(store.list())], [new.id])

    def test_retentionBySizeOldestFirst(self):
        """
        When the total size is over max_total_size, the oldest recordings go first until it fits; live ones stay.
        """
        ids = []
        for i in range(3):
            recorder = self.record_one(self.store, data=b"x" * 1000)
            self.store.finish(recorder, bytes_sent=1000, outcome=None)
            ids.append(recorder.id)
            self.clock.advance(10)
        live = self.record_one(self.store, data=b"y" * 1000)
        self.clock.advance(FLUSH_AFTER)  # its records reach the file
        size = os.path.getsize(recording_path(self.dir, ids[0]))
        deleted = cleanup_directory(self.dir, self.clock.seconds(), 10**9, 2 * size + 1200, [live.id])
        self.assertEqual(deleted, ids[:2])

    def test_deleteRefusesLiveAndBadIds(self):
        """
        When a delete names a live recording or a malformed id, nothing is deleted.
        """
        live = self.record_one(self.store)
        self.assertFalse(self.successResultOf(self.store.delete(live.id)))
        self.assertFalse(self.successResultOf(self.store.delete("../etc/passwd")))
        self.assertTrue(os.path.exists(recording_path(self.dir, live.id)))
