"""
Bandwidth policy as time (SPEC.md "Bandwidth"), with an injected clock:

- L{TokenBucket}: how long to pause reads from the VM after passing some
  bytes so that a console (or all of a VM's consoles, sharing one bucket)
  stays at C{max_bandwidth}.  Enforced by pausing, never by buffering: the
  relay passes what it read, then stops reading for the answered delay.
- L{UpdatePacer}: VNC C{min_update_interval}: at most one
  FramebufferUpdateRequest per interval reaches the VM; later ones are
  held, the latest replacing the earlier, and sent when the interval ends.
  This cuts the VM's traffic at its source instead of queueing it.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

__all__ = ["TokenBucket", "UpdatePacer"]


class TokenBucket:
    """
    A token bucket that may go into debt: C{consume(n)} always succeeds
    and answers how long the caller should wait before the next bytes.

    @param rate: bytes per second.
    @param burst: bytes that may pass at once after a quiet spell.
    """

    def __init__(self, rate: float, burst: float, clock: Any):
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock.seconds()
        #: Seconds this bucket asked its users to wait, in all (metrics).
        self.throttled_s = 0.0

    def consume(self, size: int) -> float:
        """
        C{size} bytes passed; answer the seconds to pause (0.0: go on).
        """
        now = self._clock.seconds()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate) - size
        self._at = now
        if self._tokens >= 0:
            return 0.0
        delay = -self._tokens / self.rate
        self.throttled_s += delay
        return delay


class UpdatePacer:
    """
    Holds FramebufferUpdateRequests closer together than C{interval}.

    @param send: called with a held request when its time comes.
    """

    def __init__(self, interval: float, clock: Any, send: Callable[[bytes], None]):
        self.interval = interval
        self._clock = clock
        self._send = send
        self._last: Optional[float] = None
        self._held: Optional[bytes] = None
        self._timer: Any = None
        self._due = 0.0
        #: Requests replaced by a later one before they were sent.
        self.coalesced = 0

    def offer(self, request: bytes) -> Optional[bytes]:
        """
        A request from the browser: answer it to pass now, or C{None} when
        it is held.
        """
        now = self._clock.seconds()
        if self._timer is None and (self._last is None or now - self._last >= self.interval):
            self._last = now
            return request
        if self._held is not None:
            self.coalesced += 1
        self._held = request
        if self._timer is None:
            self._due = self._last + self.interval
            self._timer = self._clock.callLater(self._due - now, self._release)
        return None

    def _release(self) -> None:
        self._timer = None
        held, self._held = self._held, None
        if held is not None:
            # The interval counts from when the request was due, so a late
            # timer does not slow the pace.
            self._last = self._due
            self._send(held)

    def stop(self) -> None:
        """The console ended: drop what is held."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._held = None
