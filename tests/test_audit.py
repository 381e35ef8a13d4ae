"""
Tests for L{vaporproxy.audit}: one JSON line per event, and the log.
"""

import json

from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from vaporproxy.audit import AUDIT_EVENTS, AuditTrail
from vaporproxy.filewriter import DiskWriter

VM_UUID = "6f1b2a3c-1111-4222-8333-944455556666"

#: One call per event, with the fields a caller passes.
CALLS = {
    "token_issued": dict(
        user="alice", vm_uuid=VM_UUID, vm_name="web-1", client="192.0.2.7", console_type="vnc",
        mode="control", expires_at="2026-12-04T17:35:00Z", via="key",
    ),
    "console_opened": dict(
        console_id="c1", user="alice", vm_uuid=VM_UUID, vm_name="web-1", client="192.0.2.7",
        console_type="vnc", mode="view",
    ),
    "console_closed": dict(
        console_id="c1", user="alice", vm_uuid=VM_UUID, vm_name="web-1", client="192.0.2.7",
        console_type="vnc", mode="view", bytes_to_client=1234, bytes_from_client=56, duration_s=12.3456,
        outcome="IDLE_TIMEOUT", reason="idle timeout", recording_id="r1",
    ),
    "share_created": dict(
        share_id="s1", by="alice", vm_uuid=VM_UUID, vm_name="web-1", mode="view", max_uses=5,
        expires_at="2026-12-04T17:45:00Z",
    ),
    "share_revoked": dict(share_id="s1", by="admin", vm_uuid=VM_UUID, consoles_closed=2),
    "sessions_terminated": dict(by="admin", vm_uuid=VM_UUID, vm_name="web-1", count=3),
}


class AuditTrailTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1764869400.25)
        self.path = self.mktemp()
        self.writer = DiskWriter(self.clock, threaded=False)
        self.counted = []
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.trail = AuditTrail(self.clock, self.writer.open(self.path, flush_each=True), self.counted.append)

    def lines(self):
        with open(self.path, "rb") as f:
            return [json.loads(line) for line in f.read().splitlines()]

    def test_everyEventOneLine(self):
        """
        When every event is emitted once, the file holds one JSON object per event with its fields, time and name.
        """
        for event in AUDIT_EVENTS:
            getattr(self.trail, event)(**CALLS[event])
        lines = self.lines()
        self.assertEqual([line["event"] for line in lines], list(AUDIT_EVENTS))
        self.assertEqual({line["time"] for line in lines}, {"2025-12-04T17:30:00.250Z"})
        closed = lines[2]
        self.assertEqual(closed["bytes_to_client"], 1234)
        self.assertEqual(closed["duration_s"], 12.346)
        self.assertEqual(closed["outcome"], "IDLE_TIMEOUT")
        self.assertEqual(closed["type"], "vnc")
        self.assertEqual(lines[0]["via"], "key")
        self.assertEqual(self.counted, list(AUDIT_EVENTS))

    def test_logNamespace(self):
        """
        When an event is emitted, the log gets it under vaporproxy.audit with the same record.
        """
        self.trail.sessions_terminated(**CALLS["sessions_terminated"])
        audit = [e for e in self.events if e.get("log_namespace") == "vaporproxy.audit"]
        self.assertEqual(len(audit), 1)
        self.assertEqual(audit[0]["audit"], self.lines()[0])

    def test_clientStringCannotStartALine(self):
        """
        When a value holds CR, LF or other control characters, the file still has exactly one line for the event.
        """
        call = dict(CALLS["console_opened"], client="1.2.3.4\r\n{\"event\":\"forged\"}\x00")
        self.trail.console_opened(**call)
        with open(self.path, "rb") as f:
            raw = f.read()
        self.assertEqual(raw.count(b"\n"), 1)
        self.assertEqual(self.lines()[0]["client"], call["client"])

    def test_noFile(self):
        """
        When no audit file is set, events still reach the log and the counter.
        """
        trail = AuditTrail(self.clock, None, self.counted.append)
        trail.share_revoked(**CALLS["share_revoked"])
        self.assertEqual(self.counted, ["share_revoked"])
        self.assertTrue([e for e in self.events if e.get("log_namespace") == "vaporproxy.audit"])

    def test_noSecretField(self):
        """
        When a caller passes a token (or any field an event does not name), the call is refused.
        """
        self.assertRaises(TypeError, self.trail.token_issued, token="a" * 64, **CALLS["token_issued"])


class AuditMetricsTests(SynchronousTestCase):
    def test_countedInMetrics(self):
        """
        When the trail counts into Metrics, /metrics shows audit events by name and the dropped count.
        """
        from prometheus_client import generate_latest

        from vaporproxy.metrics import Metrics

        class NoConsoles:
            def consoles(self):
                return []

        metrics = Metrics(NoConsoles(), None, Clock())
        trail = AuditTrail(Clock(), None, metrics.audit_event)
        trail.sessions_terminated(**CALLS["sessions_terminated"])
        trail.sessions_terminated(**CALLS["sessions_terminated"])
        metrics.audit_dropped("disk full")
        text = generate_latest(metrics.registry).decode()
        self.assertIn('vaporproxy_audit_events_total{event="sessions_terminated"} 2.0', text)
        self.assertIn("vaporproxy_audit_dropped_total 1.0", text)
