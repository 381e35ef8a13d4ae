"""
Tests for L{vaporproxy.recordings.heap}: glibc's thresholds while recording.
"""

from twisted.trial.unittest import SynchronousTestCase

from vaporproxy.recordings.heap import MMAP_THRESHOLD, TRIM_THRESHOLD, keep_freed_heap


class FakeLibc:
    def __init__(self, answer):
        self.calls = []
        self.answer = answer

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return self.answer


class KeepFreedHeapTests(SynchronousTestCase):
    def test_setsTrimThenMmapThreshold(self):
        """
        When the C library has mallopt, the trim threshold (M_TRIM_THRESHOLD, -1) and the mmap threshold (M_MMAP_THRESHOLD, -3) are set.
        """
        libc = FakeLibc(1)
        self.assertTrue(keep_freed_heap(libc))
        self.assertEqual(libc.calls, [(-1, TRIM_THRESHOLD), (-3, MMAP_THRESHOLD)])

    def test_refusedOrMissing(self):
        """
        When mallopt refuses (answers 0) or is missing, the answer is False and nothing fails.
        """
        self.assertFalse(keep_freed_heap(FakeLibc(0)))
        self.assertFalse(keep_freed_heap(object()))

    def test_thisProcessLibc(self):
        """
        When run against this process's C library (glibc here), the thresholds are accepted.
        """
        import platform

        if platform.libc_ver()[0] != "glibc":
            self.skipTest("not glibc")
        self.assertTrue(keep_freed_heap())
