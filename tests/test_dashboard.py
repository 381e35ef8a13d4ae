"""
Tests for contrib/grafana/vaporproxy.json: every PromQL expression parses,
and every metric and label it queries exists in a real C{/metrics} answer of
the app (after consoles have ended, so the labelled series exist).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Set, Tuple

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from tests.http.test_api import ADMIN_KEY, BASE, NOW, Harness, auth
from vaporproxy.interfaces import Outcome

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DASHBOARD = os.path.join(CHECKOUT, "contrib", "grafana", "vaporproxy.json")

#: Grafana's interval variables, as Prometheus would see them.
GRAFANA_INTERVALS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "6h"}
#: Labels Prometheus adds when it scrapes.
TARGET_LABELS = {"instance", "job"}
FUNCTIONS = {
    "abs", "absent", "ceil", "clamp", "clamp_max", "clamp_min", "delta", "deriv", "exp", "floor",
    "histogram_quantile", "idelta", "increase", "irate", "label_replace", "ln", "log2", "log10",
    "rate", "resets", "round", "scalar", "sort", "sort_desc", "sqrt", "time", "vector",
    "avg_over_time", "max_over_time", "min_over_time", "sum_over_time", "count_over_time",
}  # fmt: skip
AGGREGATIONS = {"sum", "avg", "min", "max", "count", "topk", "bottomk", "quantile", "stddev", "stdvar", "group"}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
BINARY_WORDS = {"and", "or", "unless", "bool", "offset"}
_TOKEN = re.compile(
    r"""\s*(?:
      (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
    | (?P<range>\[[^\]]*\])
    | (?P<number>\d+(?:\.\d+)?(?:e[+-]?\d+)?)
    | (?P<name>[A-Za-z_:][A-Za-z0-9_:]*)
    | (?P<op>==|!=|=~|!~|>=|<=|[-+*/%^<>=,(){}])
    )""",
    re.X,
)
_DURATION = re.compile(r"^\[\d+[smhdwy](?:\d+[smhdwy])*(?::(?:\d+[smhdwy])*)?\]$")


class PromQLError(ValueError):
    """
    An expression the parser does not accept.
    """


@dataclass
class Query:
    """
    What one PromQL expression reads: metric names, label matchers by metric,
    and the labels it groups by.
    """

    metrics: Set[str] = field(default_factory=set)
    matchers: Set[Tuple[str, str]] = field(default_factory=set)
    grouping: Set[str] = field(default_factory=set)


def tokens(expr: str) -> List[Tuple[str, str]]:
    """
    (kind, text) of each token of C{expr}; a character no token starts with is an error.
    """
    for variable, value in GRAFANA_INTERVALS.items():
        expr = expr.replace(variable, value)
    found, position = [], 0
    while position < len(expr.rstrip()):
        match = _TOKEN.match(expr, position)
        if match is None or match.end() == position:
            raise PromQLError(f"unexpected {expr[position:position + 20]!r} in {expr!r}")
        kind = match.lastgroup or ""
        found.append((kind, match.group(kind)))
        position = match.end()
    return found


def _labels(items: List[Tuple[str, str]], start: int, close: str) -> Tuple[List[Tuple[str, str, str]], int]:
    """
    Parse C{label op "value", …} up to C{close} (matchers) or C{label, …}
    (grouping, no op); answer the triples and the index after C{close}.
    """
    out, i = [], start
    while items[i][1] != close:
        kind, label = items[i]
        if kind != "name":
            raise PromQLError(f"label name expected, got {label!r}")
        if close == "}":
            op, (value_kind, value) = items[i + 1][1], items[i + 2]
            if op not in ("=", "!=", "=~", "!~") or value_kind != "string":
                raise PromQLError(f"bad matcher {label}{op}{value}")
            out.append((label, op, value))
            i += 3
        else:
            out.append((label, "", ""))
            i += 1
        if items[i][1] == ",":
            i += 1
    return out, i + 1


def parse(expr: str) -> Query:
    """
    Check C{expr}'s structure (balanced brackets, known functions, well-formed
    selectors, ranges and groupings) and answer what it reads.
    """
    items = tokens(expr) + [("end", "")]
    query, depth, i = Query(), 0, 0
    while items[i][0] != "end":
        kind, text = items[i]
        following = items[i + 1][1]
        if kind == "name" and text in GROUPING:
            if following != "(":
                raise PromQLError(f"{text} without a label list in {expr!r}")
            labels, i = _labels(items, i + 2, ")")
            query.grouping.update(label for label, _, _ in labels)
            continue
        if kind == "name" and (following == "(" or (text in AGGREGATIONS and following in GROUPING)):
            if text not in FUNCTIONS | AGGREGATIONS:
                raise PromQLError(f"unknown function {text!r} in {expr!r}")
        elif kind == "name" and text not in BINARY_WORDS:
            query.metrics.add(text)
            if following == "{":
                matchers, i = _labels(items, i + 2, "}")
                query.matchers.update((text, label) for label, _, _ in matchers)
                continue
        elif kind == "range" and not _DURATION.match(text):
            raise PromQLError(f"bad range {text!r} in {expr!r}")
        elif text == "{":
            raise PromQLError(f"selector without a metric name in {expr!r}")
        depth += {"(": 1, ")": -1}.get(text, 0)
        if depth < 0:
            raise PromQLError(f"unbalanced ')' in {expr!r}")
        i += 1
    if depth:
        raise PromQLError(f"unbalanced '(' in {expr!r}")
    if not query.metrics:
        raise PromQLError(f"no metric in {expr!r}")
    return query


def dashboard_expressions() -> Iterator[Tuple[str, str]]:
    """
    (where, PromQL) for every panel target and every label_values() variable.
    """
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"])
            if match is None:
                raise PromQLError(f"variable {variable['name']}: {variable['definition']!r}")
            yield f"variable {variable['name']!r}", f"sum by ({match.group(2)}) ({match.group(1)})"


def exposed_series(text: str) -> Dict[str, Set[str]]:
    """
    Sample names in a Prometheus text answer, each with its label names.
    """
    series: Dict[str, Set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def outcome(console_id: str, error: str | None, duration: float) -> Outcome:
    return Outcome(console_id, None, "vnc", "alice", 4096, 512, NOW, duration, error, "test")


class PromQLParserTests(SynchronousTestCase):
    def test_readsMetricsMatchersAndGrouping(self) -> None:
        """
        When an expression is parsed, its metrics, matcher labels and grouping labels are found, not its functions.
        """
        query = parse('sum by (code) (rate(a_total{code!="ok", x=~"$v"}[$__rate_interval])) / sum(b)')
        self.assertEqual(query.metrics, {"a_total", "b"})
        self.assertEqual(query.matchers, {("a_total", "code"), ("a_total", "x")})
        self.assertEqual(query.grouping, {"code"})

    def test_rejectsMistakes(self) -> None:
        """
        When an expression has an unknown function, a bad range, or unbalanced brackets, it is refused.
        """
        for bad in ("rates(a[5m])", "rate(a[5 minutes])", "sum(rate(a[5m])", "sum(a))", '{code="ok"}', "a{code}"):
            self.assertRaises(PromQLError, parse, bad)


class DashboardTests(SynchronousTestCase):
    def setUp(self) -> None:
        h = Harness()
        h.metrics.console_opened("vnc")
        h.metrics.console_opened("spice")
        h.metrics.console_closed(outcome("c-ok", None, 42.0))
        h.metrics.console_closed(outcome("c-idle", "IDLE_TIMEOUT", 600.0))
        h.metrics.token_issued()
        d = h.treq.get(BASE + "/metrics", headers=auth(ADMIN_KEY))
        h.treq.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        self.series = exposed_series(self.successResultOf(response.text()))

    def test_everyExpressionParses(self) -> None:
        """
        When the dashboard is read, every panel has at least one target and every expression parses.
        """
        expressions = list(dashboard_expressions())
        self.assertGreaterEqual(len(expressions), 12)
        for where, expr in expressions:
            with self.subTest(where):
                parse(expr)

    def test_everyMetricIsExported(self) -> None:
        """
        When the app answers /metrics after consoles ended, every metric the dashboard queries is in it.
        """
        missing = {
            (where, metric)
            for where, expr in dashboard_expressions()
            for metric in parse(expr).metrics
            if metric not in self.series
        }
        self.assertEqual(missing, set())

    def test_everyLabelIsExported(self) -> None:
        """
        When the dashboard filters or groups by a label, the queried metrics carry it (or Prometheus adds it).
        """
        wrong = set()
        for where, expr in dashboard_expressions():
            query = parse(expr)
            for metric, label in query.matchers:
                if label not in self.series.get(metric, set()) | TARGET_LABELS:
                    wrong.add((where, metric, label))
            for label in query.grouping - TARGET_LABELS:
                if not any(label in self.series.get(metric, set()) for metric in query.metrics):
                    wrong.add((where, "by", label))
        self.assertEqual(wrong, set())

    def test_coversTheIssuesPanels(self) -> None:
        """
        When the dashboard is read, it shows live consoles, set-ups, bytes, outcomes by code and durations.
        """
        queried = set().union(*(parse(expr).metrics for _, expr in dashboard_expressions()))
        for metric in (
            "vaporproxy_consoles_live", "vaporproxy_consoles_opened_total", "vaporproxy_console_bytes_sent_total",
            "vaporproxy_console_bytes_received_total", "vaporproxy_console_outcomes_total",
            "vaporproxy_console_duration_seconds_bucket",
        ):  # fmt: skip
            self.assertIn(metric, queried)
