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
from vaporproxy.tokens import MemoryTokenStore

VM = "6f1c2a4e-3b5d-4c8e-9a7f-0123456789ab"


class FakeRecord:
    def __init__(self, console_type: str):
        self.console_type = console_type

    def as_dict(self, now: float) -> Dict[str, Any]:
        return {"type": self.console_type, "vm_id": VM}


class FakeRegistry:
    def __init__(self) -> None:
        self.records: List[FakeRecord] = []

    def consoles(self) -> List[FakeRecord]:
        return list(self.records)


def outcome(error: Any = None, sent: int = 0, received: int = 0, duration: float = 0.0) -> Outcome:
    return Outcome(
        console_id="c1",
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
