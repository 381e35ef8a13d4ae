"""
L{vaporproxy.timers}: many timers behind one clock timer, each call run at
its deadline, in order, once.
"""

from __future__ import annotations

from typing import List

from twisted.internet.error import AlreadyCalled, AlreadyCancelled
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from vaporproxy import timers as timers_module
from vaporproxy.timers import Timers


class TimersTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.timers = Timers(self.clock)
        self.ran: List[str] = []

    def note(self, name: str) -> None:
        self.ran.append(name)

    def test_isADelayedCall(self) -> None:
        call = self.timers.callLater(5, self.note, "a")
        verifyObject(IDelayedCall, call)
        self.assertEqual(call.getTime(), 5)
        self.assertTrue(call.active())

    def test_runsAtItsDeadlineWithArguments(self) -> None:
        seen = []
        self.timers.callLater(10, lambda *a, **k: seen.append((a, k)), 1, 2, x=3)
        self.clock.advance(9.99)
        self.assertEqual(seen, [])
        self.clock.advance(0.01)
        self.assertEqual(seen, [((1, 2), {"x": 3})])

    def test_oneClockTimerForMany(self) -> None:
        for index in range(100):
            self.timers.callLater(10 + index / 100, self.note, str(index))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertEqual(self.timers.pending(), 100)
        self.clock.advance(11)
        self.assertEqual(self.ran, [str(index) for index in range(100)])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_deadlineOrderNotCallOrder(self) -> None:
        self.timers.callLater(3, self.note, "late")
        self.timers.callLater(1, self.note, "early")
        self.timers.callLater(2, self.note, "middle")
        self.timers.callLater(2, self.note, "middle-second")
        self.clock.pump([1, 1, 1])
        self.assertEqual(self.ran, ["early", "middle", "middle-second", "late"])

    def test_sooner_call_armsClockSooner(self) -> None:
        self.timers.callLater(10, self.note, "ten")
        self.timers.callLater(1, self.note, "one")
        self.clock.advance(1)
        self.assertEqual(self.ran, ["one"])
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()], [10])

    def test_cancel(self) -> None:
        call = self.timers.callLater(1, self.note, "a")
        self.timers.callLater(2, self.note, "b")
        call.cancel()
        self.assertFalse(call.active())
        self.assertRaises(AlreadyCancelled, call.cancel)
        self.assertRaises(AlreadyCancelled, call.reset, 5)
        self.clock.advance(3)
        self.assertEqual(self.ran, ["b"])

    def test_cancelDropsTheCallable(self) -> None:
        """A cancelled call holds nothing of what it would have called."""
        call = self.timers.callLater(1, self.note, "a")
        call.cancel()
        self.assertIsNone(call.func)
        self.assertEqual((call.args, call.kw), ((), {}))

    def test_lastCancelStopsTheClockTimer(self) -> None:
        calls = [self.timers.callLater(1, self.note, "a") for _ in range(3)]
        for call in calls:
            call.cancel()
        # As with the clock's own calls: nothing pending, no clock timer.
        self.assertEqual((self.clock.getDelayedCalls(), self.timers.pending()), ([], 0))
        self.clock.advance(1)
        self.assertEqual(self.ran, [])

    def test_calledOnce(self) -> None:
        call = self.timers.callLater(1, self.note, "a")
        self.clock.advance(1)
        self.assertFalse(call.active())
        self.assertRaises(AlreadyCalled, call.cancel)
        self.assertRaises(AlreadyCalled, call.reset, 1)
        self.clock.advance(10)
        self.assertEqual(self.ran, ["a"])

    def test_resetLater(self) -> None:
        call = self.timers.callLater(2, self.note, "a")
        self.clock.advance(1)
        call.reset(5)
        self.assertEqual(call.getTime(), 6)
        self.clock.advance(4.9)
        self.assertEqual(self.ran, [])
        self.clock.advance(0.1)
        self.assertEqual(self.ran, ["a"])

    def test_resetSooner(self) -> None:
        call = self.timers.callLater(10, self.note, "a")
        call.reset(1)
        self.clock.advance(1)
        self.assertEqual(self.ran, ["a"])
        self.clock.advance(10)
        self.assertEqual(self.ran, ["a"])
        self.assertEqual(self.timers.pending(), 0)

    def test_delay(self) -> None:
        call = self.timers.callLater(2, self.note, "a")
        call.delay(3)
        self.clock.advance(4)
        self.assertEqual(self.ran, [])
        self.clock.advance(1)
        self.assertEqual(self.ran, ["a"])

    def test_callLaterZeroFromACallRunsAfterIt(self) -> None:
        """A call set from a running call waits for a clock timer of its own."""

        def first() -> None:
            self.timers.callLater(0, self.note, "zero")
            self.note("first, after setting zero")

        self.timers.callLater(1, first)
        self.timers.callLater(1, self.note, "second")
        self.clock.advance(1)
        self.assertEqual(self.ran, ["first, after setting zero", "second", "zero"])

    def test_cancelOrResetByAnEarlierCallOfTheSameRound(self) -> None:
        later = self.timers.callLater(1, self.note, "cancelled")
        moved = self.timers.callLater(1, self.note, "moved")
        self.timers.callLater(0.5, lambda: (later.cancel(), moved.reset(2)))
        self.clock.advance(1)
        self.assertEqual(self.ran, [])
        self.clock.advance(2)
        self.assertEqual(self.ran, ["moved"])
        self.assertEqual(self.timers.pending(), 0)

    def test_failingCallLoggedOthersRun(self) -> None:
        self.timers.callLater(1, lambda: 1 / 0)
        self.timers.callLater(1, self.note, "after")
        self.clock.advance(1)
        self.assertEqual(self.ran, ["after"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_heapStaysBounded(self) -> None:
        """Cancelled entries are dropped from the heap before they pile up."""
        for _ in range(10_000):
            self.timers.callLater(300, self.note, "x").cancel()
        live = [self.timers.callLater(300, self.note, "live") for _ in range(10)]
        self.assertLessEqual(len(self.timers._heap), 2 * len(live) + timers_module._REBUILD_SLACK + 1)
        self.assertEqual(self.timers.pending(), 10)
        self.clock.advance(300)
        self.assertEqual(self.ran, ["live"] * 10)

    def test_wakeCancelledFromOutside(self) -> None:
        """
        When the clock timer is cancelled by someone else (trial cleaning
        up a test's leftover calls), the calls it stood for are cancelled,
        and later calls still run.
        """
        leftover = self.timers.callLater(5, self.note, "leftover")
        for call in self.clock.getDelayedCalls():
            call.cancel()
        self.timers.callLater(1, self.note, "later")
        self.assertFalse(leftover.active())
        self.clock.advance(10)
        self.assertEqual(self.ran, ["later"])
        self.assertEqual(self.timers.pending(), 0)
