"""
Tests for L{vaporproxy.relay.flow} and the low-water hook of
L{vaporproxy.relay.fastwrite}: file descriptors in memory whose socket takes
what the test says, producers driven by hand.
"""

from __future__ import annotations

from typing import List

from twisted.internet.abstract import FileDescriptor
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from vaporproxy.relay.fastwrite import low_water, low_water_off, write_buffered
from vaporproxy.relay.flow import Flow, Reads

BUFFER = 1000


class MemoryDescriptor(FileDescriptor):
    """
    A connected file descriptor whose socket accepts C{accept} bytes per
    write-readiness (C{doWrite}), and records what was sent.
    """

    def __init__(self, reactor: MemoryReactor):
        super().__init__(reactor)
        self.connected = 1
        self.accept = 0
        self.sent: List[bytes] = []
        self.startReading()

    def writeSomeData(self, data: bytes) -> int:
        n = min(self.accept, len(data))
        self.sent.append(bytes(data[:n]))
        return n

    def reading(self) -> bool:
        return self in self.reactor.readers


class RecordingTransport:
    """A transport whose reads are paused and resumed by hand."""

    def __init__(self) -> None:
        self.states: List[str] = []

    def pauseProducing(self) -> None:
        self.states.append("paused")

    def resumeProducing(self) -> None:
        self.states.append("producing")


class ReadsTests(SynchronousTestCase):
    """
    A transport's reads stay paused while any valve holds them.
    """

    def test_twoHolds(self) -> None:
        """When two valves hold the same reads, they resume only once both released them, and each hold pauses once."""
        transport = RecordingTransport()
        reads = Reads(transport)
        reads.hold("a")
        reads.hold("a")
        reads.hold("b")
        reads.release("a")
        self.assertEqual(transport.states, ["paused"])
        reads.release("b")
        reads.release("b")
        self.assertEqual(transport.states, ["paused", "producing"])


class LowWaterTests(SynchronousTestCase):
    """
    The producer of a descriptor resumes at the low-water mark, not only
    when the buffer is empty.
    """

    def setUp(self) -> None:
        self.fd = MemoryDescriptor(MemoryReactor())
        self.fd.bufferSize = BUFFER
        self.producer = RecordingTransport()
        self.fd.registerProducer(self.producer, True)

    def test_resumeAtLowWater(self) -> None:
        """When the buffer drains from over the high-water mark to half of it, the producer resumes though bytes remain queued."""
        low_water(self.fd, BUFFER // 2)
        self.fd.write(b"x" * (BUFFER + 200))
        self.assertEqual(self.producer.states, ["paused"])
        self.fd.accept = 400
        self.fd.doWrite()
        self.assertEqual(write_buffered(self.fd), BUFFER - 200)
        self.assertEqual(self.producer.states, ["paused"])
        self.fd.doWrite()
        self.assertEqual(write_buffered(self.fd), BUFFER - 600)
        self.assertEqual(self.producer.states, ["paused", "producing"])
        self.fd.doWrite()
        self.assertEqual(write_buffered(self.fd), 0)
        self.assertEqual(self.producer.states, ["paused", "producing"])

    def test_twistedWithout(self) -> None:
        """When the hook is off, the producer resumes only once the buffer is empty (Twisted's own behaviour)."""
        low_water_off(low_water(self.fd, BUFFER // 2))
        self.fd.write(b"x" * (BUFFER + 200))
        self.fd.accept = 800
        self.fd.doWrite()
        self.assertEqual(self.producer.states, ["paused"])
        self.fd.doWrite()
        self.assertEqual(self.producer.states, ["paused", "producing"])


class FlowTests(SynchronousTestCase):
    """
    A relaying console's two valves over descriptors in memory.
    """

    def setUp(self) -> None:
        reactor = MemoryReactor()
        self.ws = MemoryDescriptor(reactor)
        self.vm = MemoryDescriptor(reactor)
        self.flow = Flow(self.ws, self.vm, BUFFER)

    def test_pongFloodPausesBrowserReads(self) -> None:
        """When a browser sends pings and never reads, the pongs fill its buffer to the high-water mark and reads from it (and from the VM) stop, so memory stays bounded; they resume at the low-water mark."""
        pong = b"\x8a\x7d" + b"p" * 125
        while self.ws.reading():
            # Each ping read from the browser is answered with a pong.
            self.ws.write(pong)
            self.assertLess(write_buffered(self.ws), BUFFER + len(pong) + 1)
        self.assertFalse(self.vm.reading())
        self.ws.accept = write_buffered(self.ws) - BUFFER // 2
        self.ws.doWrite()
        self.assertTrue(self.ws.reading())
        self.assertTrue(self.vm.reading())

    def test_vmFullPausesBrowserReads(self) -> None:
        """When the VM's buffer passes the high-water mark, reads from the browser pause and the VM's own reads go on."""
        self.vm.write(b"k" * (BUFFER + 1))
        self.assertFalse(self.ws.reading())
        self.assertTrue(self.vm.reading())
        self.vm.accept = BUFFER
        self.vm.doWrite()
        self.assertTrue(self.ws.reading())

    def test_bothFull(self) -> None:
        """When both buffers are full, browser reads resume only once both drained to the low-water mark."""
        self.vm.write(b"k" * (BUFFER + 1))
        self.ws.write(b"f" * (BUFFER + 1))
        self.vm.accept = BUFFER + 1
        self.vm.doWrite()
        self.assertFalse(self.ws.reading())
        self.ws.accept = BUFFER + 1
        self.ws.doWrite()
        self.assertTrue(self.ws.reading())

    def test_lostSideTakesTheOther(self) -> None:
        """When one side's connection is lost, the other side's connection is closed too (Twisted tells the valve to stop producing)."""
        self.ws.loseConnection = lambda: setattr(self.ws, "lost", True)  # type: ignore[method-assign]
        self.vm.loseConnection = lambda: setattr(self.vm, "lost", True)  # type: ignore[method-assign]
        self.ws.producer.stopProducing()
        self.assertTrue(getattr(self.vm, "lost", False))
        self.vm.producer.stopProducing()
        self.assertTrue(getattr(self.ws, "lost", False))

    def test_stop(self) -> None:
        """When the console ends, the valves are unregistered, held reads resume and the low-water hook is gone."""
        self.ws.write(b"f" * (BUFFER + 1))
        self.flow.stop()
        self.assertIsNone(self.ws.producer)
        self.assertIsNone(self.vm.producer)
        self.assertTrue(self.ws.reading())
        self.assertTrue(self.vm.reading())
        self.assertNotIn("doWrite", vars(self.ws))
