"""
Flow control of one relaying console (DESIGN.md rule 3), both directions.

Each transport's write buffer has a high-water mark (C{buffer_size}): over
it, the transport's valve pauses what fills it; the valve opens again once
the buffer is down to the low-water mark (half), not only once empty.

- The browser's buffer full (the VM's frames, and Autobahn's pongs and
  close frames, which count against the same buffer): reads from the VM
  pause, and so do reads from the browser, so that a client sending pings
  and never reading cannot grow the proxy's memory.
- The VM's buffer full: reads from the browser pause.
"""

from __future__ import annotations

from typing import Any, List, Optional, Set, Tuple

from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer

from vaporproxy.relay.fastwrite import high_water, low_water, low_water_off

__all__ = ["Flow", "Reads", "Valve"]


class Reads:
    """
    Reading from one transport, paused while any valve holds it (two
    valves may hold the same transport's reads).
    """

    __slots__ = ("transport", "holds")

    def __init__(self, transport: Any):
        self.transport = transport
        self.holds: Set[str] = set()

    def hold(self, why: str) -> None:
        if why in self.holds:
            return
        if not self.holds:
            self.transport.pauseProducing()
        self.holds.add(why)

    def release(self, why: str) -> None:
        if why not in self.holds:
            return
        self.holds.discard(why)
        if not self.holds:
            self.transport.resumeProducing()


@implementer(IPushProducer)
class Valve:
    """
    The producer registered on one side's transport: its write buffer
    being full holds what fills it (L{Flow.full}) until it drains to the
    low-water mark (L{Flow.drained}).
    """

    __slots__ = ("flow", "side")

    def __init__(self, flow: "Flow", side: str):
        self.flow = flow
        self.side = side

    def pauseProducing(self) -> None:
        self.flow.full(self.side)

    def resumeProducing(self) -> None:
        self.flow.drained(self.side)

    def stopProducing(self) -> None:
        # This side's connection is lost: the other one goes too (as when
        # the two transports were registered as producers of each other).
        self.flow.lost(self.side)


#: The sides, named after whose write buffer is full.
BROWSER_FULL = "browser full"
VM_FULL = "vm full"


class Flow:
    """
    The two valves of a relaying console, registered on its transports.

    Most consoles never fill a buffer: the reads' bookkeeping and the
    low-water hook are set up on the first pause only, so that a console's
    set-up pays two small objects for its flow control.
    """

    __slots__ = ("ws_transport", "vm_transport", "low", "ws_reads", "vm_reads", "_fds")

    def __init__(self, ws_transport: Any, vm_transport: Any, buffer_size: int):
        self.ws_transport = ws_transport
        self.vm_transport = vm_transport
        self.low = buffer_size // 2
        self.ws_reads: Optional[Reads] = None
        self.vm_reads: Optional[Reads] = None
        self._fds: Optional[List[Any]] = None
        high_water(ws_transport, buffer_size)
        high_water(vm_transport, buffer_size)
        # Twisted Web's HTTPChannel stays registered on the transport that
        # Autobahn took over; replace it with the valve.
        try:
            ws_transport.unregisterProducer()
        except (RuntimeError, AttributeError):
            pass
        ws_transport.registerProducer(Valve(self, BROWSER_FULL), True)
        vm_transport.registerProducer(Valve(self, VM_FULL), True)

    def _reads(self) -> Tuple[Reads, Reads]:
        if self.ws_reads is None or self.vm_reads is None:
            self.ws_reads, self.vm_reads = Reads(self.ws_transport), Reads(self.vm_transport)
            # From the first pause on, each side resumes at the low-water mark.
            self._fds = [low_water(self.ws_transport, self.low), low_water(self.vm_transport, self.low)]
        return self.ws_reads, self.vm_reads

    def full(self, side: str) -> None:
        """
        C{side}'s buffer passed the high-water mark: the browser's full
        holds reads from the VM and from the browser (its pings queue
        pongs there), the VM's full holds reads from the browser.
        """
        ws_reads, vm_reads = self._reads()
        if side == BROWSER_FULL:
            vm_reads.hold(side)
        ws_reads.hold(side)

    def drained(self, side: str) -> None:
        if self.ws_reads is None or self.vm_reads is None:
            return
        if side == BROWSER_FULL:
            self.vm_reads.release(side)
        self.ws_reads.release(side)

    def hold_vm(self, why: str, on: bool) -> None:
        """
        Hold (C{on}) or let go the reads from the VM for C{why} besides the
        valves (a recording whose disk is behind): they read again once
        nothing holds them.
        """
        _, vm_reads = self._reads()
        if on:
            vm_reads.hold(why)
        else:
            vm_reads.release(why)

    def lost(self, side: str) -> None:
        other = self.vm_transport if side == BROWSER_FULL else self.ws_transport
        other.stopProducing()

    def stop(self) -> None:
        """
        The console ended: unregister the valves, let reads go (the closing
        handshake reads the browser's close frame), undo the low-water hook.
        """
        for transport in (self.ws_transport, self.vm_transport):
            try:
                transport.unregisterProducer()
            except Exception:
                pass
        for reads in (self.ws_reads, self.vm_reads):
            for why in list(reads.holds) if reads is not None else ():
                reads.release(why)
        if self._fds is not None:
            for fd in self._fds:
                low_water_off(fd)
            self._fds = None
