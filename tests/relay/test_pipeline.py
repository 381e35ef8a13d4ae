"""
Tests for L{vaporproxy.relay.pipeline} and the byte-counter stage, alone and
spliced into a relaying console (in memory, the console WebSocket harness).
"""

from __future__ import annotations

from typing import Any, List

from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.ws.test_bridge import VM_UUID, Harness
from vaporproxy.interfaces import IRelayStage
from vaporproxy.relay.pipeline import Pipeline, build, stages_for
from vaporproxy.relay.stages.counter import ByteCounter


@implementer(IRelayStage)
class DropKeys:
    """A stage that drops every browser chunk holding C{b"key"}."""

    def __init__(self) -> None:
        self.closed = False

    def to_vm(self, data: bytes) -> bytes:
        return b"" if b"key" in data else data

    def to_browser(self, data: bytes) -> bytes:
        return data.upper()

    def close(self) -> None:
        self.closed = True


class PipelineTests(SynchronousTestCase):
    """
    Stages run in order, each direction on its own.
    """

    def test_noStageIsStraight(self) -> None:
        """When a console has no stage, there is no pipeline at all (the bytes go straight)."""
        self.assertIsNone(build(stages_for(None, None)))

    def test_inOrderAndStopsAtDrop(self) -> None:
        """When a stage drops a chunk, the stages after it never see it; what passes goes through all in order."""
        first, drop, last = ByteCounter(), DropKeys(), ByteCounter()
        pipeline = Pipeline([first, drop, last])
        self.assertEqual(pipeline.to_vm(b"key press"), b"")
        self.assertEqual(pipeline.to_vm(b"mouse"), b"mouse")
        self.assertEqual(pipeline.to_browser(b"frame"), b"FRAME")
        self.assertEqual((first.to_vm_bytes, first.to_vm_chunks), (14, 2))
        self.assertEqual((last.to_vm_bytes, last.to_vm_chunks), (5, 1))
        pipeline.close()
        self.assertTrue(first.closed and drop.closed and last.closed)

    def test_counterIsAStage(self) -> None:
        """When checked against IRelayStage, the byte counter provides it and passes bytes unchanged."""
        counter = ByteCounter()
        self.assertTrue(verifyObject(IRelayStage, counter))
        self.assertEqual(counter.to_browser(b"abc"), b"abc")
        self.assertEqual((counter.to_browser_bytes, counter.to_browser_chunks), (3, 1))


class SplicedTests(SynchronousTestCase):
    """
    A console's stages are spliced in once the guard is established.
    """

    def setUp(self) -> None:
        self.h = Harness()
        self.stages: List[Any] = []
        self.asked: List[Any] = []

        def stages_for(grant: Any, policy: Any) -> Any:
            self.asked.append((grant.vm_uuid, policy))
            return tuple(self.stages)

        self.h.factory.stages_for = stages_for

    def test_handshakeBytesNotStaged(self) -> None:
        """When bytes cross during the guard's handshake, only the guard sees them; the counter counts relayed bytes only."""
        counter = ByteCounter()
        self.stages = [counter]
        conn = self.h.open(self.h.token())
        conn.send(b"early")
        backend = conn.connect_backend()
        self.assertEqual(backend.value(), b"early")
        self.assertEqual(counter.to_vm_bytes, 0)
        conn.send(b"key press")
        conn.from_vm(b"hello")
        self.assertEqual((counter.to_vm_bytes, counter.to_browser_bytes), (9, 5))
        self.assertEqual(backend.value(), b"earlykey press")
        self.assertEqual(conn.messages, [(b"hello", True)])
        self.assertEqual(self.asked, [(VM_UUID, self.h.factory.config.console)])

    def test_stageChangesBytes(self) -> None:
        """When a stage drops the browser's chunk and rewrites the VM's, the VM and the browser see the result, and the stage is closed when the console ends."""
        drop = DropKeys()
        self.stages = [drop]
        conn = self.h.open(self.h.token())
        backend = conn.connect_backend()
        conn.send(b"key press")
        conn.send(b"mouse")
        conn.from_vm(b"frame")
        self.assertEqual(backend.value(), b"mouse")
        self.assertEqual(conn.messages, [(b"FRAME", True)])
        conn.vm_closes()
        self.assertTrue(drop.closed)
