"""
Prometheus metrics of one vaporproxy process.

L{Metrics} is the L{IOutcomeObserver} the bridge and the API report to.
It keeps its own L{CollectorRegistry} (never the process-global one), so
several instances (tests, several APIs) never collide.

Counters move when events happen (token issued, console opened, console
closed with its bytes and duration); the gauges of live consoles and
outstanding tokens are read from the console registry and the token store
when the metrics are rendered.
"""

from __future__ import annotations

from collections import Counter as _Tally
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from vaporproxy.interfaces import CONSOLE_TYPES, IOutcomeObserver, Outcome

#: Console durations (seconds): from a failed handshake to a working day.
DURATION_BUCKETS = (1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0)


@implementer(IOutcomeObserver)
class Metrics:
    """
    The metrics of this process.

    @param registry: the live consoles (a L{vaporproxy.bridge.ConsoleRegistry}:
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
        r = self.registry
        self._live = Gauge(
            "vaporproxy_consoles_live", "Consoles relaying now, by type", ["type"], registry=r
        )
        self._tokens = Gauge(
            "vaporproxy_tokens_outstanding", "Issued tokens not yet used nor expired", registry=r
        )
        self._tokens_issued = Counter(
            "vaporproxy_tokens_issued", "Console tokens issued", registry=r
        )
        self._opened = Counter(
            "vaporproxy_consoles_opened", "Consoles that started relaying, by type", ["type"], registry=r
        )
        self._outcomes = Counter(
            "vaporproxy_console_outcomes",
            "Consoles ended, by error code (ok for a normal close)",
            ["code"],
            registry=r,
        )
        self._bytes_sent = Counter(
            "vaporproxy_console_bytes_sent", "Bytes sent to browsers by ended consoles", registry=r
        )
        self._bytes_received = Counter(
            "vaporproxy_console_bytes_received", "Bytes received from browsers by ended consoles", registry=r
        )
        self._durations = Histogram(
            "vaporproxy_console_duration_seconds",
            "Durations of ended consoles",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self._live_types = set(CONSOLE_TYPES)
        for console_type in CONSOLE_TYPES:
            self._live.labels(console_type).set(0)
            self._opened.labels(console_type)
        self._outcomes.labels("ok")

    # -- IOutcomeObserver --------------------------------------------------

    def console_opened(self, console_type: str) -> None:
        self._opened.labels(console_type or "unknown").inc()

    def console_closed(self, outcome: Outcome) -> None:
        self._outcomes.labels(outcome.error or "ok").inc()
        self._bytes_sent.inc(max(0, outcome.bytes_sent))
        self._bytes_received.inc(max(0, outcome.bytes_received))
        self._durations.observe(max(0.0, outcome.duration_s))

    def token_issued(self) -> None:
        self._tokens_issued.inc()

    # -- rendering ---------------------------------------------------------

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
