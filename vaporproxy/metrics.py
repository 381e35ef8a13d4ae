"""
Prometheus metrics of one vaporproxy process.

L{Metrics} is the L{IOutcomeObserver} the bridge and the API report to.
It keeps its own L{CollectorRegistry} (never the process-global one), so
several instances (tests, several APIs) never collide.

Counters move when events happen (token issued, console opened, console
closed with its bytes and duration); the gauges of live consoles and
outstanding tokens are read from the console registry and the token store
when the metrics are rendered.  The byte counters are the ended consoles'
totals plus the live consoles' current counts, read at render time, so a
console that lasts for hours shows its traffic while it runs.
"""

from __future__ import annotations

from collections import Counter as _Tally
from typing import Any, Callable, Dict, Iterator, List, Set, Tuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from vaporproxy.interfaces import CONSOLE_TYPES, IOutcomeObserver, Outcome

#: Console durations (seconds): from a failed handshake to a working day.
DURATION_BUCKETS = (1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0)

#: How many closed console ids are remembered before those no longer in the
#: registry are forgotten (see L{Metrics.console_closed}).
CLOSED_IDS_PRUNE_AT = 1024


class _ByteCounters:
    """
    A collector for the two byte counters: ended consoles' totals plus the
    live consoles' current counts, computed when collected.
    """

    NAMES = (
        ("vaporproxy_console_bytes_sent", "Bytes sent to browsers by consoles (ended and live)"),
        ("vaporproxy_console_bytes_received", "Bytes received from browsers by consoles (ended and live)"),
    )

    def __init__(self, metrics: "Metrics"):
        self._metrics = metrics

    def describe(self) -> List[CounterMetricFamily]:
        return [CounterMetricFamily(name, text) for name, text in self.NAMES]

    def collect(self) -> Iterator[CounterMetricFamily]:
        for (name, text), value in zip(self.NAMES, self._metrics.byte_totals()):
            yield CounterMetricFamily(name, text, value=value)


class _RecordingBytes:
    """
    C{vaporproxy_recording_bytes_written}: ended recordings' bytes plus
    those written so far by the recordings being made, when collected.
    """

    NAME = "vaporproxy_recording_bytes_written"
    TEXT = "Bytes written to recording files (ended and being written)"

    def __init__(self, metrics: "Metrics"):
        self._metrics = metrics

    def describe(self) -> List[CounterMetricFamily]:
        return [CounterMetricFamily(self.NAME, self.TEXT)]

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.NAME, self.TEXT, value=self._metrics.recording_bytes())


#: Every metric family, in exposition order: (attribute of L{Metrics}, type,
#: name, help, labels, further arguments).  The byte counters' rows stand
#: for L{_ByteCounters} and L{_RecordingBytes}, computed when collected.
FAMILIES: Tuple[Tuple[str, Any, str, str, Tuple[str, ...], Dict[str, Any]], ...] = (
    ("_live", Gauge, "vaporproxy_consoles_live", "Consoles relaying now, by type", ("type",), {}),
    ("_tokens", Gauge, "vaporproxy_tokens_outstanding", "Issued tokens not yet used nor expired", (), {}),
    ("_tokens_issued", Counter, "vaporproxy_tokens_issued", "Console tokens issued", (), {}),
    ("_opened", Counter, "vaporproxy_consoles_opened", "Consoles that started relaying, by type", ("type",), {}),
    ("_outcomes", Counter, "vaporproxy_console_outcomes", "Consoles ended, by error code (ok for a normal close)",
     ("code",), {}),
    ("", _ByteCounters, "", "", (), {}),
    ("_durations", Histogram, "vaporproxy_console_duration_seconds", "Durations of ended consoles", (),
     {"buckets": DURATION_BUCKETS}),
    ("_audit_events", Counter, "vaporproxy_audit_events", "Audit events written, by event", ("event",), {}),
    ("_audit_dropped", Counter, "vaporproxy_audit_dropped",
     "Times the audit file was given up (disk full, too slow); events still reach the log", (), {}),
    ("_view_only", Counter, "vaporproxy_consoles_view_only", "View-only consoles that started relaying", (), {}),
    ("_policy_dropped", Counter, "vaporproxy_policy_dropped_messages",
     "Messages dropped by console policy, by kind (input, clipboard) and direction (to_vm, from_vm)",
     ("kind", "direction"), {}),
    ("_throttled", Counter, "vaporproxy_throttled_seconds", "Seconds reads from VMs were paused by bandwidth limits",
     (), {}),
    ("_recordings_active", Gauge, "vaporproxy_recordings_active", "Consoles being recorded now", (), {}),
    ("", _RecordingBytes, "", "", (), {}),
    ("_recordings_dropped", Counter, "vaporproxy_recordings_dropped",
     "Recordings given up (the disk failed, or wrote none of a paused recording for 5 s); their consoles went on", (), {}),
    ("_recording_files", Gauge, "vaporproxy_recording_files", "Recording files on disk", (), {}),
    ("_recordings_size", Gauge, "vaporproxy_recordings_size_bytes", "Total size of the recording files on disk", (),
     {}),
)  # fmt: skip


@implementer(IOutcomeObserver)
class Metrics:
    """
    The metrics of this process.

    @param registry: the live consoles (a L{vaporproxy.ws.bridge.ConsoleRegistry}:
        C{consoles()} giving records with C{as_dict(now)}).
    @param token_store: an L{ITokenStore} (its C{count()}).
    @param clock: the clock used for the records' C{as_dict(now)}.
    """

    log = Logger()

    def __init__(self, registry: Any, token_store: Any, clock: IReactorTime):
        self._consoles = registry
        self._token_store = token_store
        self._clock = clock
        self.registry = CollectorRegistry(auto_describe=True)
        #: Bytes of ended consoles (sent, received).
        self._closed_bytes = [0, 0]
        #: Consoles reported closed that may still be in the registry (so
        #: that their bytes are not counted twice); pruned as they leave it.
        self._closed_ids: Set[str] = set()
        #: The last totals exported: a counter never goes down.
        self._exported = (0, 0)
        self._recording_bytes_ended = self._recording_bytes_exported = 0  # see recording_bytes()
        self._recordings_written: Callable[[], int] = lambda: 0
        for attribute, kind, name, text, labels, options in FAMILIES:
            if kind in (_ByteCounters, _RecordingBytes):
                self.registry.register(kind(self))
            else:
                setattr(self, attribute, kind(name, text, labels, registry=self.registry, **options))
        self._live_types = set(CONSOLE_TYPES)
        #: Labelled children by label value (C{labels()} takes a lock and
        #: builds a key on every call; it is called twice per console).
        self._opened_children: Dict[str, Any] = {}
        self._outcome_children: Dict[str, Any] = {}
        self._audit_children: Dict[str, Any] = {}
        for console_type in CONSOLE_TYPES:
            self._live.labels(console_type).set(0)
            self._opened.labels(console_type)
        self._outcomes.labels("ok")

    # -- IOutcomeObserver --------------------------------------------------

    def console_opened(self, console_type: str) -> None:
        console_type = console_type or "unknown"
        child = self._opened_children.get(console_type)
        if child is None:
            child = self._opened_children[console_type] = self._opened.labels(console_type)
        child.inc()

    def console_closed(self, outcome: Outcome) -> None:
        code = outcome.error or "ok"
        child = self._outcome_children.get(code)
        if child is None:
            child = self._outcome_children[code] = self._outcomes.labels(code)
        child.inc()
        self._closed_bytes[0] += max(0, outcome.bytes_sent)
        self._closed_bytes[1] += max(0, outcome.bytes_received)
        if outcome.console_id:
            self._closed_ids.add(outcome.console_id)
            if len(self._closed_ids) >= CLOSED_IDS_PRUNE_AT:
                self._live_records()  # forgets ids no longer live
        self._durations.observe(max(0.0, outcome.duration_s))

    def token_issued(self) -> None:
        self._tokens_issued.inc()

    # -- console policy ----------------------------------------------------

    def view_only_opened(self) -> None:
        self._view_only.inc()

    def policy_dropped(self, kind: str, direction: str) -> None:
        """A message was dropped by policy (C{kind}: input or clipboard)."""
        self._policy_dropped.labels(kind, direction).inc()

    def throttled(self, seconds: float) -> None:
        """Reads from a VM were paused for C{seconds} by a bandwidth limit."""
        self._throttled.inc(max(0.0, seconds))

    # -- recordings --------------------------------------------------------

    def recording_started(self) -> None:
        self._recordings_active.inc()

    def recording_finished(self, bytes_written: int) -> None:
        self._recordings_active.dec()
        self._recording_bytes_ended += max(0, bytes_written)

    def watch_recordings(self, written: Callable[[], int]) -> None:
        """
        C{written()}: bytes written so far by the recordings being made
        (L{vaporproxy.recordings.store.RecordingStore.written}), so that
        the bytes counter grows while a console streams.
        """
        self._recordings_written = written

    def recording_bytes(self) -> int:
        """Ended recordings' bytes plus the live ones' so far (never going down)."""
        total = self._recording_bytes_ended + max(0, self._recordings_written())
        self._recording_bytes_exported = max(total, self._recording_bytes_exported)
        return self._recording_bytes_exported

    def recording_dropped(self, why: str = "") -> None:
        self._recordings_dropped.inc()

    def recordings_on_disk(self, files: int, size: int) -> None:
        """The cleanup loop's count of what the recordings directory holds."""
        self._recording_files.set(files)
        self._recordings_size.set(size)

    # -- the audit trail ---------------------------------------------------

    def audit_event(self, event: str) -> None:
        """An audit event was emitted (L{vaporproxy.audit.AuditTrail}'s C{counted})."""
        child = self._audit_children.get(event)
        if child is None:
            child = self._audit_children[event] = self._audit_events.labels(event)
        child.inc()

    def audit_dropped(self, why: str = "") -> None:
        """The audit file was given up."""
        self._audit_dropped.inc()

    # -- rendering ---------------------------------------------------------

    def _live_records(self) -> List[Dict[str, Any]]:
        """
        The live consoles' records (C{as_dict}) not already counted as
        closed; forgets closed ids that have left the registry.
        """
        now = self._clock.seconds()
        records = [record.as_dict(now) for record in self._consoles.consoles()]
        live_ids = {record.get("console_id") for record in records}
        self._closed_ids &= live_ids
        return [record for record in records if record.get("console_id") not in self._closed_ids]

    def byte_totals(self) -> Tuple[int, int]:
        """
        (bytes sent, bytes received): every ended console's plus every live
        console's count so far.  A console that closes between two reads
        moves from the live part to the ended part, counted once.
        """
        sent, received = self._closed_bytes
        for record in self._live_records():
            sent += max(0, int(record.get("bytes_sent") or 0))
            received += max(0, int(record.get("bytes_received") or 0))
        # Never below what was exported (a counter that goes down looks like
        # a restart to Prometheus).
        self._exported = (max(sent, self._exported[0]), max(received, self._exported[1]))
        return self._exported

    def render(self) -> Deferred:
        """
        The Prometheus text exposition of every metric, as C{bytes}.
        """
        return Deferred.fromCoroutine(self._render())

    async def _render(self) -> bytes:
        try:
            outstanding = await self._token_store.count()
        except Exception:  # noqa: BLE001 (a metric is missing, the rest renders)
            self.log.failure("could not count outstanding tokens")
            outstanding = float("nan")
        self._tokens.set(outstanding)
        now = self._clock.seconds()
        live = _Tally(record.as_dict(now).get("type") or "unknown" for record in self._consoles.consoles())
        self._live_types.update(live)
        for console_type in self._live_types:
            self._live.labels(console_type).set(live.get(console_type, 0))
        return generate_latest(self.registry)
