"""
The console's relay stages spliced into the bridge (issues 8, 9, 10): in
memory, through the bridge harness (a guard that only forwards, a VM that
is a StringTransport).
"""

import os
import struct
from dataclasses import replace

from twisted.internet.defer import succeed
from twisted.trial.unittest import SynchronousTestCase

from tests.relay.test_rfbclient import CUT_TEXT, FB_UPDATE_REQUEST, KEY_EVENT, POINTER_EVENT, SET_ENCODINGS
from tests.ws.test_bridge import BUFFER, VM_UUID, Harness, error_of
from vaporproxy.config import ClipboardConfig, ConsoleConfig
from vaporproxy.filewriter import DiskWriter
from vaporproxy.recordings.format import KIND_TO_BROWSER, read_recording
from vaporproxy.recordings.store import RecordingStore
from vaporproxy.relay.planner import StagePlanner

SERVER_INIT = struct.pack("!HH", 640, 480) + bytes([32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0]) + struct.pack("!I", 2) + b"vm"


class Metrics:
    """What the planner tells metrics."""

    def __init__(self):
        self.dropped = []
        self.throttled_s = 0.0

    def policy_dropped(self, kind, direction):
        self.dropped.append((kind, direction))

    def throttled(self, seconds):
        self.throttled_s += seconds


class StagesTests(SynchronousTestCase):
    def harness(self, recordings=None, **console):
        base = ConsoleConfig(connection_timeout=10.0, idle_timeout=60.0, buffer_size=BUFFER,
                             allowed_hosts=("127.0.0.1", "::1"))  # fmt: skip
        h = Harness(console=replace(base, **console))
        self.metrics = Metrics()
        h.factory.planner = StagePlanner(h.config, h.reactor, self.metrics, recordings)
        return h

    def open(self, h, **grant):
        conn = h.open(h.token(**grant))
        conn.pump.flush()
        conn.connect_backend()
        conn.backend_transport.clear()
        return conn

    def test_noStagesNoPipeline(self):
        """
        When a control console has no policy, no pipeline is spliced and its bytes go straight.
        """
        h = self.harness()
        conn = self.open(h)
        self.assertIsNone(conn.server._pipeline)
        conn.send(b"\xff\xfe raw bytes, not RFB")
        self.assertEqual(conn.backend_transport.value(), b"\xff\xfe raw bytes, not RFB")

    def test_viewOnlyDropsInput(self):
        """
        When a view-only console's browser sends keys and pointer events among update requests, only the update requests reach the VM.
        """
        h = self.harness()
        conn = self.open(h, mode="view")
        conn.send(SET_ENCODINGS + FB_UPDATE_REQUEST + KEY_EVENT)
        conn.send(POINTER_EVENT + CUT_TEXT + FB_UPDATE_REQUEST)
        self.assertEqual(conn.backend_transport.value(), SET_ENCODINGS + FB_UPDATE_REQUEST * 2)
        self.assertEqual(self.metrics.dropped, [("input", "to_vm")] * 2 + [("clipboard", "to_vm")])
        self.assertIsNone(conn.closed)

    def test_viewOnlyUnknownTypeCloses(self):
        """
        When a view-only console's browser sends a message type the filter does not know, the console closes with 4012 and nothing reaches the VM.
        """
        h = self.harness()
        conn = self.open(h, mode="view")
        conn.send(bytes([253, 1, 2, 3]))
        self.assertEqual(conn.closed, (4012, "BAD_REQUEST"))
        self.assertEqual(error_of(conn)["code"], "BAD_REQUEST")
        self.assertEqual(conn.backend_transport.value(), b"")

    def test_clipboardFromVmDropped(self):
        """
        When clipboard from_vm is off, the VM's ServerCutText never reaches the browser and its screen updates do.
        """
        h = self.harness(clipboard=ClipboardConfig(from_vm=False))
        conn = self.open(h)
        conn.from_vm(SERVER_INIT)
        cut = struct.pack("!BxxxI", 3, 6) + b"secret"
        bell = b"\x02"
        conn.from_vm(cut + bell)
        received = b"".join(payload for payload, binary in conn.messages if binary)
        self.assertEqual(received, SERVER_INIT + bell)
        self.assertEqual(self.metrics.dropped, [("clipboard", "from_vm")])

    def test_throttlePausesVmReads(self):
        """
        When a console has a bandwidth limit, a chunk over the burst is passed whole, then reads from the VM pause and resume later.
        """
        h = self.harness(max_bandwidth=64 * 1024)
        conn = self.open(h)
        conn.from_vm(b"x" * (256 * 1024))
        received = sum(len(payload) for payload, binary in conn.messages if binary)
        self.assertEqual(received, 256 * 1024)
        self.assertEqual(conn.backend_transport.producerState, "paused")
        self.assertGreater(self.metrics.throttled_s, 2.0)
        h.reactor.advance(self.metrics.throttled_s + 0.1)
        self.assertEqual(conn.backend_transport.producerState, "producing")

    def test_recorded(self):
        """
        When recording is on, the browser's received bytes are recorded and the file is finished when the console ends.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        store = RecordingStore(directory, DiskWriter(None, threaded=False), None, lambda f, *a: succeed(f(*a)))
        h = self.harness(recordings=store)
        store._clock = h.reactor
        h.factory.planner._recording = replace(h.config.recording, enabled=True)
        h.factory.observer.recording_started = lambda: None
        h.factory.observer.recording_finished = lambda size: None
        conn = self.open(h)
        conn.from_vm(b"screen one")
        conn.vm_closes()
        [meta] = self.successResultOf(store.list())
        with open(os.path.join(directory, meta["id"] + ".vprec"), "rb") as f:
            header, records, cut = read_recording(f.read())
        self.assertEqual(header["vm_id"], VM_UUID)
        self.assertEqual([r.data for r in records if r.kind == KIND_TO_BROWSER], [b"screen one"])
        self.assertEqual(meta["outcome"], "ok")  # the VM closed a relaying console: a normal end

    def test_recordedWaitsForTheDisk(self):
        """
        When a recorded console's disk falls behind, reads from the VM pause until the disk caught up, and every byte the browser got is recorded.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        writer = DiskWriter(None, threaded=False, high_water=64 * 1024, low_water=16 * 1024)
        store = RecordingStore(directory, writer, None, lambda f, *a: succeed(f(*a)))
        h = self.harness(recordings=store)
        store._clock = writer._reactor = h.reactor
        h.factory.planner._recording = replace(h.config.recording, enabled=True)
        h.factory.observer.recording_started = lambda: None
        h.factory.observer.recording_finished = lambda size: None
        conn = self.open(h)
        writer.hold()
        conn.from_vm(b"a" * 40_000)
        self.assertEqual(conn.backend_transport.producerState, "producing")
        conn.from_vm(b"b" * 40_000)
        self.assertEqual(conn.backend_transport.producerState, "paused")
        writer.step()
        self.assertEqual(conn.backend_transport.producerState, "producing")
        conn.vm_closes()
        writer.step()
        [meta] = self.successResultOf(store.list())
        with open(os.path.join(directory, meta["id"] + ".vprec"), "rb") as f:
            _, records, _ = read_recording(f.read())
        self.assertEqual(b"".join(r.data for r in records if r.kind == KIND_TO_BROWSER), b"a" * 40_000 + b"b" * 40_000)


class OwnerCapsTests(SynchronousTestCase):
    def test_perUserCap(self):
        """
        When max_connections_per_user is 1, a user's second console closes with 4007 while the first stays, and another user still opens one.
        """
        from vaporproxy.stores.limits import MemoryLimiter

        h = Harness()
        h.factory.limiter = MemoryLimiter(5, 100, 1, 0)
        first = h.open(h.token())
        first.pump.flush()
        first.connect_backend()
        second = h.open(h.token())
        second.pump.flush()
        self.assertEqual(second.closed, (4007, "MAX_CONNECTIONS_REACHED"))
        self.assertIsNone(first.closed)
        other = h.open(self.bob_token(h))
        other.pump.flush()
        self.assertIsNone(other.closed)

    def bob_token(self, h):
        from vaporproxy.interfaces import Grant

        grant = Grant(vm_ref=VM_UUID, vm_uuid=VM_UUID, console_type="vnc", display=0, user="bob")
        result = []
        h.tokens.issue(grant).addCallback(result.append)
        return result[0].token


class AuditedConsoleTests(SynchronousTestCase):
    def test_openedAndClosed(self):
        """
        When a console opens and ends, the audit trail gets console_opened and console_closed with its VM, mode, bytes and outcome, and no token.
        """
        import json

        from vaporproxy.audit import AuditTrail

        h = Harness()
        path = self.mktemp()
        h.factory.audit = AuditTrail(h.reactor, DiskWriter(h.reactor, threaded=False).open(path, flush_each=True))
        token = h.token(vm_name="web-1", mode="view")
        conn = h.open(token)
        conn.pump.flush()
        conn.connect_backend()
        conn.from_vm(b"screen")
        conn.vm_closes()
        with open(path) as f:
            text = f.read()
        opened, closed = [json.loads(line) for line in text.splitlines()]
        self.assertEqual((opened["event"], opened["vm_name"], opened["mode"]), ("console_opened", "web-1", "view"))
        self.assertEqual((closed["event"], closed["bytes_to_client"], closed["outcome"]), ("console_closed", 6, None))
        self.assertEqual(closed["console_id"], opened["console_id"])
        self.assertNotIn(token, text)
