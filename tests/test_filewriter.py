"""
Tests for L{vaporproxy.filewriter}: appending off the reactor, bounded.
"""

import os
import time

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from vaporproxy.filewriter import DiskWriter


class ThreadReactor(Clock):
    """A clock whose C{callFromThread} runs the call at once (the list is thread-safe)."""

    def __init__(self):
        super().__init__()
        self.from_thread = []

    def callFromThread(self, f, *args):
        self.from_thread.append((f, args))
        f(*args)


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
        writer = DiskWriter(ThreadReactor(), flush_interval=60)
        self.addCleanup(writer.stopService)
        handle = writer.open(self.path, flush_each=True)
        handle.write(b"one event\n")
        self.assertTrue(wait_for(lambda: os.path.exists(self.path) and open(self.path, "rb").read() == b"one event\n"))

    def test_flushedWithinInterval(self):
        """
        When a handle does not flush each write, its bytes still reach the file within the flush interval.
        """
        writer = DiskWriter(ThreadReactor(), flush_interval=0.05)
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
        self.assertEqual([f for f, _ in reactor.from_thread], [errors.append])

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
