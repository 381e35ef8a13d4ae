"""
A recorded console on the real reactor with a real disk thread (issue 10):
a VM that streams as fast as it may, a browser that reads everything, and a
disk slower than both.  The recording must hold every byte the browser got
(the VM is paused while the disk is behind, never a record dropped), and
what waits for the disk must stay bounded.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from typing import Any, List

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import TestCase

from tests.integration.test_backpressure import streaming_vm
from tests.integration.test_bridge_loopback import Proxy
from vaporproxy import filewriter
from vaporproxy.config import ConsoleConfig
from vaporproxy.filewriter import DiskWriter
from vaporproxy.recordings.format import KIND_TO_BROWSER, read_recording
from vaporproxy.recordings.recorder import recording_path
from vaporproxy.recordings.store import RecordingStore
from vaporproxy.relay.planner import StagePlanner

HIGH = 256 * 1024
LOW = 64 * 1024


class Metrics:
    def policy_dropped(self, kind: str, direction: str) -> None:
        pass

    def throttled(self, seconds: float) -> None:
        pass


def sleep(seconds: float) -> Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


class RecordingBackpressureTests(TestCase):
    timeout = 30

    async def _slow_disk(self) -> None:
        real = filewriter._writev_all

        def slow(fd: int, parts: Any, size: int) -> None:
            time.sleep(0.004)  # a disk of a few tens of MB/s, on the disk thread
            real(fd, parts, size)

        self.patch(filewriter, "_writev_all", slow)
        vm_port, streamers = streaming_vm(self)
        directory = self.mktemp()
        os.makedirs(directory)
        writer = DiskWriter(reactor, high_water=HIGH, low_water=LOW)
        self.addCleanup(writer.stopService)
        dropped: List[str] = []
        store = RecordingStore(directory, writer, reactor, lambda f, *a: succeed(f(*a)), on_dropped=dropped.append)
        proxy = Proxy(self, vm_port, ConsoleConfig(buffer_size=64 * 1024, connection_timeout=5))
        planner = StagePlanner(proxy.factory.config, reactor, Metrics(), store)
        planner._recording = replace(proxy.factory.config.recording, enabled=True)
        proxy.factory.planner = planner
        proxy.observer.recording_finished = lambda size: None  # type: ignore[attr-defined]
        client, factory = await proxy.open_client()
        waiting = []
        for _ in range(30):
            await sleep(0.05)
            waiting.append(writer.pending)
        [record] = proxy.registry.consoles()
        recorder = record.recorder
        self.assertTrue(recorder.active)
        self.assertGreater(streamers[0].pauses, 0)
        # Bounded: the high-water mark, plus what lands before the pause.
        self.assertLessEqual(max(waiting), HIGH + 256 * 1024, waiting)
        client.dropConnection(abort=True)
        await factory.closed
        await sleep(0.1)
        writer.stopService()  # everything queued is written
        received = sum(map(len, factory.received))
        with open(recording_path(directory, recorder.id), "rb") as f:
            _, records, cut = read_recording(f.read())
        recorded = sum(len(r.data) for r in records if r.kind == KIND_TO_BROWSER)
        self.assertFalse(cut)
        self.assertEqual(dropped, [])
        # Every byte the browser got is recorded (the proxy may have sent a
        # last chunk the client did not read before it dropped).
        self.assertGreater(received, 4 * HIGH)
        self.assertGreaterEqual(recorded, received)
        self.assertLessEqual(recorded - received, 512 * 1024)
        for s in streamers:
            if s.transport.connected:
                s.transport.abortConnection()
        await sleep(0.05)

    def test_slowDiskPausesTheVmAndLosesNothing(self) -> None:
        """
        When the disk is slower than the VM and the browser, the VM is paused, what waits for the disk stays bounded, the recording is not dropped and holds every byte the browser received.
        """
        return Deferred.fromCoroutine(self._slow_disk())
