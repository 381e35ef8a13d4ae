"""
Many short-lived timers behind one reactor timer (issue 8's set-up cost).

A console's set-up arms about ten timers (the port switch's request-line
deadline, the connection guard's request deadline twice, twisted.web's idle
timeout twice, Autobahn's opening-handshake and auto-ping timers, the
console's connection timer...) and cancels nearly all of them within
milliseconds.  Each C{reactor.callLater} builds a L{DelayedCall}, pushes it
on the reactor's heap (whose comparisons are a Python C{__lt__}), and each
C{cancel} is bookkeeping the reactor repeats when it pops or compacts: about
3.5 us per timer, against 0.5 us here (measured with a reactor holding
5,000 timers, as it does with a few thousand consoles open).

L{Timers} keeps its own heap of C{(deadline, sequence, call)} tuples
(compared in C) and one reactor timer, armed at the earliest live deadline.
A cancelled or moved call leaves its entry behind, skipped when it comes to
the head; when the skipped entries outnumber the live ones (by 256) the
heap is rebuilt, so its size stays bounded by about twice the live timers;
with nothing pending no reactor timer is armed, and a reactor timer
cancelled by someone else (trial's clean-up) cancels the calls it stood
for.  Calls run in deadline order (equal deadlines in the order they were
set), each at most once, from the reactor's timer (never from inside
C{callLater}); an error in one is logged and the others still run.
"""

from __future__ import annotations

import heapq
from typing import Any, Callable, List, Optional, Tuple
from weakref import WeakKeyDictionary

from twisted.internet.error import AlreadyCalled, AlreadyCancelled
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

__all__ = ["Timer", "Timers", "timers_for"]

log = Logger(namespace="vaporproxy.timers")

#: Skipped entries tolerated before the heap is rebuilt (beyond as many as live ones).
_REBUILD_SLACK = 256


@implementer(IDelayedCall)
class Timer:
    """
    One call of L{Timers}: an L{IDelayedCall} (C{getTime}, C{cancel},
    C{delay}, C{reset}, C{active}), as C{reactor.callLater} answers.
    """

    __slots__ = ("time", "func", "args", "kw", "_timers", "_entry", "cancelled", "called")

    def __init__(self, timers: "Timers", time: float, func: Callable[..., Any], args: tuple, kw: dict):
        self.time = time
        self.func: Optional[Callable[..., Any]] = func
        self.args = args
        self.kw = kw
        self._timers = timers
        #: The heap entry that stands for this call (C{None}: not pending).
        self._entry: Optional[tuple] = None
        self.cancelled = False
        self.called = False

    def getTime(self) -> float:
        return self.time

    def active(self) -> bool:
        return not (self.cancelled or self.called)

    def cancel(self) -> None:
        if self.cancelled:
            raise AlreadyCancelled
        if self.called:
            raise AlreadyCalled
        self.cancelled = True
        self.func, self.args, self.kw = None, (), {}
        self._timers._drop(self)

    def reset(self, secondsFromNow: float) -> None:
        self._move(self._timers.seconds() + secondsFromNow)

    def delay(self, secondsLater: float) -> None:
        self._move(self.time + secondsLater)

    def _move(self, when: float) -> None:
        if self.cancelled:
            raise AlreadyCancelled
        if self.called:
            raise AlreadyCalled
        later = when >= self.time
        self.time = when
        if self._entry is None:
            self._timers._push(self)  # due this round: it waits again instead
        elif not later:
            # Sooner: a new entry (the old one is skipped); later: the
            # entry is pushed on when it reaches the head.
            self._timers._drop(self)
            self._timers._push(self)

    def __repr__(self) -> str:
        state = "cancelled" if self.cancelled else "called" if self.called else f"at {self.time:.3f}"
        return f"<Timer {state} {self.func!r}>"


class Timers:
    """
    C{callLater} for many timers, with one reactor timer (see the module
    docstring).  Use one per reactor (or clock) and hand out its
    C{callLater} where a reactor's would go.
    """

    def __init__(self, clock: IReactorTime):
        self._clock = clock
        self.seconds = clock.seconds
        self._heap: List[Tuple[float, int, Timer]] = []
        self._sequence = 0
        #: Entries in the heap that no longer stand for a pending call.
        self._skipped = 0
        #: The reactor timer, armed at (or before) the earliest deadline.
        self._wake: Optional[IDelayedCall] = None
        self._wake_at = 0.0
        self._running = False

    def callLater(self, delay: float, func: Callable[..., Any], *args: Any, **kw: Any) -> Timer:
        """Call C{func(*args, **kw)} C{delay} seconds from now."""
        call = Timer(self, self.seconds() + delay, func, args, kw)
        self._push(call)
        return call

    def pending(self) -> int:
        """How many calls are waiting (cancelled and called ones are not)."""
        return len(self._heap) - self._skipped

    def _push(self, call: Timer) -> None:
        wake = self._wake
        if wake is not None and not wake.active():
            self._wake_lost()
        self._sequence += 1
        entry = call._entry = (call.time, self._sequence, call)
        heapq.heappush(self._heap, entry)
        if not self._running and (self._wake is None or call.time < self._wake_at):
            self._arm()

    def _wake_lost(self) -> None:
        """
        The reactor timer was cancelled by someone else (trial, cleaning up
        a test's leftover calls): the calls it stood for are cancelled too,
        as their own delayed calls would have been.
        """
        for entry in self._heap:
            call = entry[2]
            if call._entry is entry:
                call._entry = None
                call.cancelled = True
                call.func, call.args, call.kw = None, (), {}
        self._heap = []
        self._skipped = 0
        self._wake = None

    def _drop(self, call: Timer) -> None:
        if call._entry is None:
            return  # taken off the heap already (due this round)
        call._entry = None
        self._skipped += 1
        if self._skipped == len(self._heap):
            # Nothing pending: no reactor timer either (as with callLater).
            self._heap.clear()
            self._skipped = 0
            wake, self._wake = self._wake, None
            if wake is not None and wake.active():
                wake.cancel()
        elif self._skipped > len(self._heap) - self._skipped + _REBUILD_SLACK:
            self._heap = [entry for entry in self._heap if entry[2]._entry is entry]
            heapq.heapify(self._heap)
            self._skipped = 0

    def _arm(self) -> None:
        """The reactor timer at the earliest pending deadline (none: no timer)."""
        heap = self._heap
        while heap and heap[0][2]._entry is not heap[0]:
            heapq.heappop(heap)
            self._skipped -= 1
        wake, self._wake = self._wake, None
        if wake is not None and wake.active():
            if heap and heap[0][0] >= self._wake_at:
                self._wake = wake
                return  # it wakes in time (and arms again then)
            wake.cancel()
        if not heap:
            return
        when = heap[0][0]
        self._wake_at = when
        self._wake = self._clock.callLater(max(0.0, when - self.seconds()), self._fire)

    def _fire(self) -> None:
        """Run every call that is due, in deadline order, then arm again."""
        self._wake = None
        due = self._take_due(self.seconds())
        self._running = True
        try:
            for call in due:
                func, args, kw = call.func, call.args, call.kw
                if func is None or call._entry is not None:
                    continue  # cancelled or reset by an earlier call of this round
                call.called = True
                call.func, call.args, call.kw = None, (), {}
                try:
                    func(*args, **kw)
                except Exception:
                    log.failure("timer call {func!r} failed", func=func)
        finally:
            self._running = False
            self._arm()

    def _take_due(self, now: float) -> List[Timer]:
        heap = self._heap
        due: List[Timer] = []
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            call = entry[2]
            if call._entry is not entry:
                self._skipped -= 1
            elif call.time > entry[0]:
                self._sequence += 1
                call._entry = moved = (call.time, self._sequence, call)
                heapq.heappush(heap, moved)  # reset later: its entry goes on
            else:
                call._entry = None
                due.append(call)
        return due


#: The one L{Timers} of each clock (a reactor, or a test's L{Clock}).
_BY_CLOCK: "WeakKeyDictionary[Any, Timers]" = WeakKeyDictionary()


def timers_for(clock: IReactorTime) -> Timers:
    """
    The L{Timers} of C{clock}, made on first use: the port switch, the
    connection guard, twisted.web, Autobahn and the consoles share one
    heap and one reactor timer.
    """
    timers = _BY_CLOCK.get(clock)
    if timers is None:
        timers = _BY_CLOCK[clock] = Timers(clock)
    return timers
