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

from typing import Any, Set, Tuple

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
    The producer registered on one transport: its write buffer being full
    holds C{reads} (each a L{Reads}) until it drains to the low-water mark.
    """

    __slots__ = ("name", "reads")

    def __init__(self, name: str, reads: Tuple[Reads, ...]):
        self.name = name
        self.reads = reads

    def pauseProducing(self) -> None:
        for reads in self.reads:
            reads.hold(self.name)

    def resumeProducing(self) -> None:
        for reads in self.reads:
            reads.release(self.name)

    def stopProducing(self) -> None:
        self.resumeProducing()


class Flow:
    """
    The two valves of a relaying console, registered on its transports.
    """

    def __init__(self, ws_transport: Any, vm_transport: Any, buffer_size: int):
        self.ws_transport = ws_transport
        self.vm_transport = vm_transport
        ws_reads, vm_reads = Reads(ws_transport), Reads(vm_transport)
        self.reads = (ws_reads, vm_reads)
        self.to_browser = Valve("browser full", (vm_reads, ws_reads))
        self.to_vm = Valve("vm full", (ws_reads,))
        high_water(ws_transport, buffer_size)
        high_water(vm_transport, buffer_size)
        low = buffer_size // 2
        self._fds = (low_water(ws_transport, low), low_water(vm_transport, low))
        # Twisted Web's HTTPChannel stays registered on the transport that
        # Autobahn took over; replace it with the valve.
        try:
            ws_transport.unregisterProducer()
        except (RuntimeError, AttributeError):
            pass
        ws_transport.registerProducer(self.to_browser, True)
        vm_transport.registerProducer(self.to_vm, True)

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
        self.to_browser.resumeProducing()
        self.to_vm.resumeProducing()
        for fd in self._fds:
            low_water_off(fd)
        self._fds = (None, None)
