"""
Tests for L{vaporproxy.relay.pacing}: the bandwidth bucket and the update
request pacer, with a Clock.
"""

import struct

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from vaporproxy.relay.pacing import TokenBucket, UpdatePacer


def fbur(incremental):
    return struct.pack("!BBHHHH", 3, incremental, 0, 0, 640, 480)


class TokenBucketTests(SynchronousTestCase):
    def test_rateHeldOverTime(self):
        """
        When a reader passes 64 KiB chunks and pauses as told, its average rate stays within 1 % of the limit.
        """
        clock = Clock()
        rate = 10 * 1024 * 1024
        bucket = TokenBucket(rate, 64 * 1024, clock)
        passed = 0
        while clock.seconds() < 10:
            passed += 65536
            clock.advance(max(bucket.consume(65536), 0.0001))
        self.assertLess(abs(passed / clock.seconds() / rate - 1.0), 0.01)

    def test_burstAfterQuiet(self):
        """
        When the reader was quiet, one burst passes without a pause; the next bytes wait.
        """
        clock = Clock()
        bucket = TokenBucket(1000, 500, clock)
        clock.advance(60)
        self.assertEqual(bucket.consume(500), 0.0)
        self.assertAlmostEqual(bucket.consume(100), 0.1)
        self.assertAlmostEqual(bucket.throttled_s, 0.1)

    def test_sharedByConsoles(self):
        """
        When two consoles share a VM's bucket, their sum is held to the rate.
        """
        clock = Clock()
        bucket = TokenBucket(1000, 0, clock)
        self.assertAlmostEqual(bucket.consume(500), 0.5)
        self.assertAlmostEqual(bucket.consume(500), 1.0)


class UpdatePacerTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.sent = []
        self.pacer = UpdatePacer(0.5, self.clock, self.sent.append)

    def test_firstPasses(self):
        """
        When the first request comes, it passes at once.
        """
        self.assertEqual(self.pacer.offer(fbur(0)), fbur(0))

    def test_laterHeldAndCoalesced(self):
        """
        When requests come faster than the interval, one is sent when the interval ends: the latest.
        """
        self.pacer.offer(fbur(0))
        self.clock.advance(0.1)
        self.assertIsNone(self.pacer.offer(fbur(1)))
        self.clock.advance(0.1)
        self.assertIsNone(self.pacer.offer(fbur(0)))
        self.assertEqual(self.sent, [])
        self.clock.advance(0.3)
        self.assertEqual(self.sent, [fbur(0)])
        self.assertEqual(self.pacer.coalesced, 1)

    def test_pollingCutByHalf(self):
        """
        When a client polls every 100 ms for 10 s, at most one request per 0.5 s reaches the VM.
        """
        passed = 0
        for _ in range(100):
            if self.pacer.offer(fbur(1)) is not None:
                passed += 1
            self.clock.advance(0.1)
        self.assertLessEqual(passed + len(self.sent), 21)
        self.assertGreaterEqual(passed + len(self.sent), 19)

    def test_stopDropsHeld(self):
        """
        When the console ends with a request held, nothing is sent later.
        """
        self.pacer.offer(fbur(0))
        self.pacer.offer(fbur(1))
        self.pacer.stop()
        self.clock.advance(5)
        self.assertEqual(self.sent, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
