"""
Tests for L{vaporproxy.metrics}.
"""

from __future__ import annotations

from typing import Any, Dict, List

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from vaporproxy.interfaces import Grant, IOutcomeObserver, Outcome
from vaporproxy.metrics import Metrics
from vaporproxy.stores.tokens import MemoryTokenStore

VM = "6f1c2a4e-3b5d-4c8e-9a7f-0123456789ab"


class FakeRecord:
    def __init__(self, console_type: str, console_id: str = "", sent: int = 0, received: int = 0):
        self.console_type = console_type
        self.console_id = console_id
        self.bytes_sent = sent
        self.bytes_received = received

    def as_dict(self, now: float) -> Dict[str, Any]:
        return {
            "console_id": self.console_id,
            "type": self.console_type,
            "vm_id": VM,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
        }


class FakeRegistry:
    def __init__(self) -> None:
        self.records: List[FakeRecord] = []

    def consoles(self) -> List[FakeRecord]:
        return list(self.records)


def outcome(
    error: Any = None, sent: int = 0, received: int = 0, duration: float = 0.0, console_id: str = "c1"
) -> Outcome:
    return Outcome(
        console_id=console_id,
        vm_uuid=VM,
        console_type="vnc",
        user="alice",
        bytes_sent=sent,
        bytes_received=received,
        started_at=0.0,
        duration_s=duration,
        error=error,
        reason="test",
    )


class MetricsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = MemoryTokenStore(self.clock, 300)
        self.registry = FakeRegistry()
        self.metrics = Metrics(self.registry, self.store, self.clock)

    def samples(self) -> Dict[tuple, float]:
        text = self.successResultOf(self.metrics.render()).decode("utf-8")
        found: Dict[tuple, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return found

    def test_interface(self) -> None:
        """When checked against IOutcomeObserver, Metrics provides it."""
        self.assertTrue(verifyObject(IOutcomeObserver, self.metrics))

    def test_empty(self) -> None:
        """When nothing has happened, every metric is present at zero."""
        s = self.samples()
        self.assertEqual(s[("vaporproxy_consoles_live", (("type", "vnc"),))], 0)
        self.assertEqual(s[("vaporproxy_consoles_live", (("type", "spice"),))], 0)
        self.assertEqual(s[("vaporproxy_tokens_outstanding", ())], 0)
        self.assertEqual(s[("vaporproxy_tokens_issued_total", ())], 0)
        self.assertEqual(s[("vaporproxy_console_outcomes_total", (("code", "ok"),))], 0)
        self.assertEqual(s[("vaporproxy_console_duration_seconds_count", ())], 0)

    def test_live_consoles(self) -> None:
        """When consoles are live in the registry, the gauge counts them by type and follows them down."""
        self.registry.records = [FakeRecord("vnc"), FakeRecord("vnc"), FakeRecord("spice")]
        s = self.samples()
        self.assertEqual(s[("vaporproxy_consoles_live", (("type", "vnc"),))], 2)
        self.assertEqual(s[("vaporproxy_consoles_live", (("type", "spice"),))], 1)
        self.registry.records = []
        s = self.samples()
        self.assertEqual(s[("vaporproxy_consoles_live", (("type", "vnc"),))], 0)

    def test_outstanding_tokens(self) -> None:
        """When tokens are issued and expire, the outstanding gauge follows the store."""
        for _ in range(3):
            self.successResultOf(self.store.issue(Grant(VM, VM, "vnc", 0, "alice")))
        self.assertEqual(self.samples()[("vaporproxy_tokens_outstanding", ())], 3)
        self.clock.advance(301)
        self.assertEqual(self.samples()[("vaporproxy_tokens_outstanding", ())], 0)

    def test_store_unreachable(self) -> None:
        """When the store cannot count, the other metrics still render."""
        self.patch(self.store, "count", lambda: fail(ConnectionRefusedError()))
        self.metrics.token_issued()
        s = self.samples()
        self.assertEqual(s[("vaporproxy_tokens_issued_total", ())], 1)
        self.assertNotEqual(s[("vaporproxy_tokens_outstanding", ())], s[("vaporproxy_tokens_outstanding", ())])
        self.assertEqual(len(self.flushLoggedErrors(ConnectionRefusedError)), 1)

    def test_events(self) -> None:
        """When consoles open and close, the counters and the histogram record them."""
        self.metrics.token_issued()
        self.metrics.token_issued()
        self.metrics.console_opened("vnc")
        self.metrics.console_opened("spice")
        self.metrics.console_opened("spice")
        self.metrics.console_closed(outcome(None, sent=1000, received=10, duration=42.0))
        self.metrics.console_closed(outcome("IDLE_TIMEOUT", sent=5, received=7, duration=600.0))
        self.metrics.console_closed(outcome("CONNECTION_FAILED", duration=0.5))
        s = self.samples()
        self.assertEqual(s[("vaporproxy_tokens_issued_total", ())], 2)
        self.assertEqual(s[("vaporproxy_consoles_opened_total", (("type", "vnc"),))], 1)
        self.assertEqual(s[("vaporproxy_consoles_opened_total", (("type", "spice"),))], 2)
        self.assertEqual(s[("vaporproxy_console_outcomes_total", (("code", "ok"),))], 1)
        self.assertEqual(s[("vaporproxy_console_outcomes_total", (("code", "IDLE_TIMEOUT"),))], 1)
        self.assertEqual(s[("vaporproxy_console_outcomes_total", (("code", "CONNECTION_FAILED"),))], 1)
        self.assertEqual(s[("vaporproxy_console_bytes_sent_total", ())], 1005)
        self.assertEqual(s[("vaporproxy_console_bytes_received_total", ())], 17)
        self.assertEqual(s[("vaporproxy_console_duration_seconds_count", ())], 3)
        self.assertEqual(s[("vaporproxy_console_duration_seconds_sum", ())], 642.5)
        self.assertEqual(s[("vaporproxy_console_duration_seconds_bucket", (("le", "1.0"),))], 1)
        self.assertEqual(s[("vaporproxy_console_duration_seconds_bucket", (("le", "60.0"),))], 2)

    def test_own_registry(self) -> None:
        """When two Metrics exist, they neither collide nor touch the global registry."""
        other = Metrics(FakeRegistry(), self.store, self.clock)
        other.token_issued()
        self.assertEqual(self.samples()[("vaporproxy_tokens_issued_total", ())], 0)
        self.assertIsNone(REGISTRY.get_sample_value("vaporproxy_tokens_issued_total"))


SENT = ("vaporproxy_console_bytes_sent_total", ())
RECEIVED = ("vaporproxy_console_bytes_received_total", ())


class LiveBytesTests(SynchronousTestCase):
    """
    The byte counters include live consoles, counted once.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = FakeRegistry()
        self.metrics = Metrics(self.registry, MemoryTokenStore(self.clock, 300), self.clock)

    def totals(self) -> tuple:
        text = self.successResultOf(self.metrics.render()).decode("utf-8")
        found = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return found[SENT], found[RECEIVED]

    def test_liveConsolesCount(self) -> None:
        """When consoles are still open, their bytes so far are in the totals and grow with them."""
        a = FakeRecord("vnc", "a", sent=1000, received=10)
        b = FakeRecord("spice", "b", sent=500, received=5)
        self.registry.records = [a, b]
        self.assertEqual(self.totals(), (1500, 15))
        a.bytes_sent += 4000
        b.bytes_received += 20
        self.assertEqual(self.totals(), (5500, 35))

    def test_closeBetweenRenders(self) -> None:
        """When a console closes between two renders, its bytes move from live to ended without being counted twice."""
        a = FakeRecord("vnc", "a", sent=100, received=7)
        other = FakeRecord("vnc", "o", sent=1, received=1)
        self.registry.records = [a, other]
        self.assertEqual(self.totals(), (101, 8))
        a.bytes_sent = 150
        self.registry.records = [other]
        self.metrics.console_closed(outcome(sent=150, received=7, console_id="a"))
        self.assertEqual(self.totals(), (151, 8))
        self.assertEqual(self.totals(), (151, 8))

    def test_closedWhileStillRegistered(self) -> None:
        """When the close is reported before the console leaves the registry, it is counted once, and its id is then forgotten."""
        a = FakeRecord("vnc", "a", sent=300, received=3)
        self.registry.records = [a]
        self.metrics.console_closed(outcome(sent=300, received=3, console_id="a"))
        self.assertEqual(self.totals(), (300, 3))
        self.registry.records = []
        self.assertEqual(self.totals(), (300, 3))
        self.assertEqual(self.metrics._closed_ids, set())

    def test_closedIdsBounded(self) -> None:
        """When many consoles close and nobody scrapes, the remembered ids stay bounded."""
        from vaporproxy.metrics import CLOSED_IDS_PRUNE_AT

        for i in range(3 * CLOSED_IDS_PRUNE_AT):
            self.metrics.console_closed(outcome(sent=1, console_id=f"c{i}"))
        self.assertLess(len(self.metrics._closed_ids), CLOSED_IDS_PRUNE_AT)
        self.assertEqual(self.totals(), (3 * CLOSED_IDS_PRUNE_AT, 0))

    def test_neverGoesDown(self) -> None:
        """When a console's close reports fewer bytes than were last seen live, the exported counter does not go down."""
        self.registry.records = [FakeRecord("vnc", "a", sent=900, received=90)]
        self.assertEqual(self.totals(), (900, 90))
        self.registry.records = []
        self.metrics.console_closed(outcome(sent=800, received=80, console_id="a"))
        self.assertEqual(self.totals(), (900, 90))
        self.metrics.console_closed(outcome(sent=200, received=20, console_id="b"))
        self.assertEqual(self.totals(), (1000, 100))

    def test_textFormat(self) -> None:
        """When rendered, the byte counters keep their names, type and sample format."""
        self.registry.records = [FakeRecord("vnc", "a", sent=42, received=4)]
        text = self.successResultOf(self.metrics.render()).decode("utf-8")
        self.assertIn("# TYPE vaporproxy_console_bytes_sent_total counter\n", text)
        self.assertIn("vaporproxy_console_bytes_sent_total 42.0\n", text)
        self.assertIn("vaporproxy_console_bytes_received_total 4.0\n", text)


class PolicyAndRecordingMetricsTests(SynchronousTestCase):
    def test_exported(self):
        """
        When policy drops, throttling and recordings are reported, /metrics shows each figure under its name.
        """
        from prometheus_client import generate_latest

        class NoConsoles:
            def consoles(self):
                return []

        metrics = Metrics(NoConsoles(), None, Clock())
        metrics.view_only_opened()
        metrics.policy_dropped("input", "to_vm")
        metrics.policy_dropped("clipboard", "from_vm")
        metrics.throttled(0.25)
        metrics.recording_started()
        metrics.recording_started()
        metrics.recording_finished(1000)
        metrics.recording_dropped("disk full")
        metrics.recordings_on_disk(3, 4096)
        text = generate_latest(metrics.registry).decode()
        for line in (
            "vaporproxy_consoles_view_only_total 1.0",
            'vaporproxy_policy_dropped_messages_total{direction="to_vm",kind="input"} 1.0',
            'vaporproxy_policy_dropped_messages_total{direction="from_vm",kind="clipboard"} 1.0',
            "vaporproxy_throttled_seconds_total 0.25",
            "vaporproxy_recordings_active 1.0",
            "vaporproxy_recording_bytes_written_total 1000.0",
            "vaporproxy_recordings_dropped_total 1.0",
            "vaporproxy_recording_files 3.0",
            "vaporproxy_recordings_size_bytes 4096.0",
        ):
            self.assertIn(line, text)

    def test_recordingBytesWhileLive(self):
        """
        When consoles are being recorded, the bytes-written counter grows with their files, and an ended recording is counted once.
        """

        class NoConsoles:
            def consoles(self):
                return []

        metrics = Metrics(NoConsoles(), None, Clock())
        live = {"a": 300, "b": 200}
        metrics.watch_recordings(lambda: sum(live.values()))
        self.assertEqual(metrics.recording_bytes(), 500)
        live["a"] = 900
        self.assertEqual(metrics.recording_bytes(), 1100)
        del live["a"]
        metrics.recording_finished(1000)  # its last bytes were written meanwhile
        self.assertEqual(metrics.recording_bytes(), 1200)
        live["b"] = 0  # never down, even if a size were read low
        self.assertEqual(metrics.recording_bytes(), 1200)
