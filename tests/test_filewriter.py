"""
Tests for L{vaporproxy.filewriter}: appending off the reactor, bounded:
backpressure for recordings, a bound for the rest.
"""

import errno
import os
import queue
import threading
import time

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from vaporproxy import filewriter
from vaporproxy.filewriter import DiskWriter


class ThreadReactor(Clock):
    """A clock whose C{callFromThread} runs the call at once (the list is thread-safe)."""

    def __init__(self):
        super().__init__()
        self.from_thread = []

    def callFromThread(self, f, *args):
        self.from_thread.append((f, args))
        f(*args)


class QueuedReactor(Clock):
    """A clock whose C{callFromThread} queues the call for this thread (as the reactor does)."""

    def __init__(self):
        super().__init__()
        self._from_thread = queue.SimpleQueue()

    def callFromThread(self, f, *args):
        self._from_thread.put((f, args))

    def run_calls(self):
        """Run what the thread queued; answer False (for wait_for's predicate)."""
        while not self._from_thread.empty():
            f, args = self._from_thread.get()
            f(*args)
        return False


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


class DiskWriterTests(SynchronousTestCase):
    def setUp(self):
        self.path = self.mktemp()

    def test_threadedWritesInOrder(self):
        """
        When many writes are queued on the thread, the file holds them all, in order, after stopService.
        """
        writer = DiskWriter(ThreadReactor())
        handle = writer.open(self.path)
        chunks = [b"%06d\n" % i for i in range(2000)]
        for chunk in chunks:
            self.assertTrue(handle.write(chunk))
        handle.close()
        writer.stopService()
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"".join(chunks))
        self.assertEqual(writer.pending, 0)

    def test_flushEachVisibleAtOnce(self):
        """
        When a handle flushes each write, a line is in the file while the handle is still open.
        """
        writer = DiskWriter(ThreadReactor())
        self.addCleanup(writer.stopService)
        handle = writer.open(self.path, flush_each=True)
        handle.write(b"one event\n")
        self.assertTrue(wait_for(lambda: os.path.exists(self.path) and open(self.path, "rb").read() == b"one event\n"))

    def test_writtenWithoutFlush(self):
        """
        When a handle is not flushed at all, its bytes still reach the file (no user-space buffer holds them).
        """
        writer = DiskWriter(ThreadReactor())
        self.addCleanup(writer.stopService)
        handle = writer.open(self.path)
        handle.write(b"x" * 100)
        self.assertTrue(wait_for(lambda: os.path.exists(self.path) and os.path.getsize(self.path) == 100))
        self.assertEqual(handle.written, 100)

    def test_fullDiskGivesUpTheFile(self):
        """
        When the disk is full (/dev/full), the handle is given up and its owner told why; later writes are refused.
        """
        errors = []
        writer = DiskWriter(ThreadReactor(), threaded=False)
        handle = writer.open("/dev/full", flush_each=True, on_error=errors.append)
        handle.write(b"a line\n")
        self.assertTrue(handle.failed)
        self.assertEqual(len(errors), 1)
        self.assertIn("No space left on device", errors[0])
        self.assertFalse(handle.write(b"more\n"))
        self.assertEqual(len(errors), 1)

    def test_fullDiskReportedOnTheReactor(self):
        """
        When the thread meets a failed write, the owner is told through callFromThread.
        """
        errors = []
        reactor = ThreadReactor()
        writer = DiskWriter(reactor)
        handle = writer.open("/dev/full", flush_each=True, on_error=errors.append)
        handle.write(b"a line\n")
        self.assertTrue(wait_for(lambda: errors))
        writer.stopService()
        self.assertEqual(len(reactor.from_thread), 1)
        self.assertIn("No space left on device", errors[0])

    def test_pendingBound(self):
        """
        When a write would put more than max_pending bytes in the queue, it is refused and the file given up.
        """
        errors = []
        writer = DiskWriter(ThreadReactor(), max_pending=10, threaded=False)
        handle = writer.open(self.path, on_error=errors.append)
        self.assertTrue(handle.write(b"0123456789"))
        self.assertFalse(handle.write(b"0123456789a"))
        self.assertTrue(handle.failed)
        self.assertEqual(errors, ["more than 10 bytes waiting for the disk"])
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"0123456789")

    def test_unopenableFile(self):
        """
        When the file cannot be opened, the handle is given up with the reason and the path.
        """
        errors = []
        writer = DiskWriter(ThreadReactor(), threaded=False)
        path = os.path.join(self.mktemp(), "missing-dir", "f")
        handle = writer.open(path, on_error=errors.append)
        self.assertTrue(handle.failed)
        self.assertEqual(len(errors), 1)
        self.assertIn("No such file or directory", errors[0])
        self.assertIn(path, errors[0])


class BackpressureTests(SynchronousTestCase):
    """
    A handle with on_backlog: its owner pauses over the high-water mark and
    resumes at the low-water mark; the file is given up only when the disk
    fails or makes no progress.
    """

    def setUp(self):
        self.path = self.mktemp()
        self.clock = Clock()
        self.events = []
        self.errors = []
        self.writer = DiskWriter(self.clock, threaded=False, high_water=100, low_water=40, stall_timeout=5.0)
        self.writer.hold()  # the disk writes when the test says

    def open(self, path=None):
        return self.writer.open(path or self.path, on_error=self.errors.append, on_backlog=self.events.append)

    def test_pausesOverHighResumesAtLow(self):
        """
        When more than the high-water mark waits, the owner is paused; it is resumed only once the disk is down to the low-water mark, and every byte is written.
        """
        handle = self.open()
        self.writer.step()  # the open
        self.assertTrue(handle.writev((b"a" * 10, b"b" * 50)))
        self.assertEqual(self.events, [])
        self.assertTrue(handle.write(b"c" * 60))
        self.assertEqual((self.events, handle.paused, handle.pending), ([True], True, 120))
        self.writer.step(1)
        self.assertEqual((self.events, handle.pending), ([True], 60))  # over low: still paused
        self.writer.step(1)
        self.assertEqual((self.events, handle.paused, handle.pending), ([True, False], False, 0))
        handle.close()
        self.writer.step()
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"a" * 10 + b"b" * 50 + b"c" * 60)
        self.assertEqual((self.errors, handle.failed, handle.written), ([], False, 120))

    def test_slowDiskKeepsTheFile(self):
        """
        When a paused file's disk writes a little every second for longer than the stall timeout, the file is kept and resumes.
        """
        handle = self.open()
        self.writer.step()
        for _ in range(12):
            handle.write(b"x" * 10)
        self.assertEqual(self.events, [True])
        for _ in range(8):
            self.clock.advance(1.0)
            self.writer.step(1)
        self.assertEqual((self.events, self.errors, handle.failed), ([True, False], [], False))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stalledDiskGivesUpAndLetsGo(self):
        """
        When a paused file's disk writes nothing for the stall timeout, the file is given up: the owner is resumed, then told why.
        """
        handle = self.open()
        self.writer.step()
        handle.write(b"x" * 150)
        self.clock.advance(4.5)
        self.assertEqual((self.events, self.errors), ([True], []))
        self.clock.advance(1.0)
        self.assertEqual(self.events, [True, False])
        self.assertEqual(self.errors, ["the disk wrote none of its 150 waiting bytes for 5 s"])
        self.assertTrue(handle.failed)
        self.assertFalse(handle.write(b"more"))
        self.writer.step()  # the disk wakes up: nothing more is written, the counts settle
        self.assertEqual((self.writer.pending, handle.written), (0, 0))

    def test_failedWriteWhilePausedLetsGo(self):
        """
        When a paused file's write fails (ENOSPC), the owner is resumed and told the error, once.
        """
        handle = self.open("/dev/full")
        self.writer.step()
        handle.write(b"x" * 150)
        self.writer.step()
        self.assertEqual(self.events, [True, False])
        self.assertEqual(len(self.errors), 1)
        self.assertIn("No space left on device", self.errors[0])

    def test_ioErrorGivesUp(self):
        """
        When the disk answers EIO, the file is given up with that reason.
        """
        def broken(fd, parts, size):
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        self.patch(filewriter, "_writev_all", broken)
        handle = self.open()
        self.writer.step()
        handle.write(b"x")
        self.writer.step()
        self.assertTrue(handle.failed)
        self.assertIn("Input/output error", self.errors[0])
        self.assertEqual(self.events, [])

    def test_ownerThatDoesNotPauseLosesTheFile(self):
        """
        When the owner goes on writing past twice the high-water mark, the file is given up (memory stays bounded).
        """
        handle = self.open()
        self.writer.step()
        handle.write(b"x" * 150)
        self.assertTrue(handle.write(b"x" * 50))
        self.assertFalse(handle.write(b"x"))
        self.assertEqual(self.events, [True, False])
        self.assertEqual(self.errors, ["more than 200 bytes waiting for the disk"])
        self.assertEqual(self.writer.pending, 200)  # queued already; the disk discards it
        self.writer.step()
        self.assertEqual(self.writer.pending, 0)

    def test_threadedOwnerPausingLosesNothing(self):
        """
        When a producer on another thread waits while paused, a real disk thread writes every byte, pause and resume alternate, and nothing is given up.
        """
        lock = threading.Lock()
        events = []

        def backlog(over):
            with lock:
                events.append(over)

        reactor = QueuedReactor()
        writer = DiskWriter(reactor, high_water=20_000, low_water=5_000)
        handle = writer.open(self.path, on_error=self.errors.append, on_backlog=backlog)
        chunks = [bytes([65 + i % 26]) * 1000 for i in range(3000)]
        for chunk in chunks:
            self.assertTrue(wait_for(lambda: reactor.run_calls() or not handle.paused))
            self.assertTrue(handle.write(chunk))
        handle.close()
        writer.stopService()
        reactor.run_calls()
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"".join(chunks))
        self.assertEqual(self.errors, [])
        self.assertEqual(events, [True, False] * (len(events) // 2))
        self.assertEqual(writer.pending, 0)
