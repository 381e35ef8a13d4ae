"""
Tests for L{vaporproxy.logs}' fast formatters: they must write exactly what
Twisted's own formatters write.
"""

from __future__ import annotations

import io
import json
from typing import Any, Dict, List

from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from vaporproxy.logs import (
    LevelFilter,
    LogSetup,
    QuickLogger,
    debug_enabled,
    classic_text_formatter,
    format_message,
    json_lines_observer,
    text_file_observer,
)


class _Thing:
    name = "thing"

    def __repr__(self) -> str:
        return "<Thing>"


def _failure() -> Failure:
    try:
        1 / 0
    except ZeroDivisionError:
        return Failure()


def sample_events() -> List[Dict[str, Any]]:
    """
    Events covering the formatting features: fields, conversions, format
    specs, attribute and index access, Twisted's call syntax, missing
    keys, bad formats, bytes formats, multi-line text, systems, no format,
    failures, and time stamps on and off whole seconds.
    """
    base = {"log_time": 1700000000.25, "log_namespace": "vaporproxy.test", "log_level": LogLevel.info}
    events = [
        {"log_format": "plain text"},
        {"log_format": "console {console_id} closed: sent={sent} {ratio:.2f}", "console_id": "abc",
         "sent": 58, "ratio": 1 / 3},
        {"log_format": "{thing!r} {thing.name} {items[0]} {mapping[k]}", "thing": _Thing(),
         "items": [7], "mapping": {"k": "v"}},
        {"log_format": "called {f()} and {x}", "f": lambda: "yes", "x": 1},
        {"log_format": "missing {nothere}"},
        {"log_format": "bad {"},
        {"log_format": b"bytes {x}", "x": 2},
        {"log_format": "two\nlines {x}", "x": "and\nthree"},
        {"log_format": "with system", "log_system": "-"},
        {"log_format": "no level", "log_level": None},
        {"log_format": "no time", "log_time": None},
        {"log_format": "braces {{literal}} {x}", "x": 3},
        {"log_format": ""},
        {"no_format": True},
        {"log_format": "failed {what}", "what": "here", "log_failure": _failure()},
        {"log_format": "on the second", "log_time": 1700000001.0},
        {"log_format": "before epoch second", "log_time": 1699999999.999},
    ]
    return [dict(base, **e) for e in events]


class FormatMessageTests(SynchronousTestCase):
    """
    Tests for L{format_message}.
    """

    def test_sameAsTwisted(self) -> None:
        """
        When given any sample event, the text is what formatEvent gives.
        """
        for event in sample_events():
            self.assertEqual(format_message(event), formatEvent(event), event.get("log_format"))


class ClassicTextFormatterTests(SynchronousTestCase):
    """
    Tests for L{classic_text_formatter} and L{text_file_observer}.
    """

    def test_sameLinesAsTwisted(self) -> None:
        """
        When the sample events are written, the output is byte for byte what
        Twisted's textFileLogObserver writes.
        """
        ours, theirs = io.StringIO(), io.StringIO()
        observer, reference = text_file_observer(ours), textFileLogObserver(theirs)
        for event in sample_events():
            observer(event)
            reference(event)
        self.assertEqual(ours.getvalue(), theirs.getvalue())
        self.assertIn("[vaporproxy.test#info] console abc closed: sent=58 0.33\n", ours.getvalue())

    def test_timeStampCachedPerSecond(self) -> None:
        """
        When events of the same second follow each other, their time stamp
        is the same; the next second gets its own.
        """
        fmt = classic_text_formatter()
        first = fmt({"log_format": "a", "log_time": 1700000000.1})
        second = fmt({"log_format": "a", "log_time": 1700000000.9})
        third = fmt({"log_format": "a", "log_time": 1700000001.0})
        assert first is not None and third is not None
        self.assertEqual(first, second)
        self.assertNotEqual(first.split(" ")[0], third.split(" ")[0])

    def test_noTimeFormat(self) -> None:
        """
        When the time format is None, the stamp is a dash.
        """
        self.assertEqual(classic_text_formatter(None)({"log_format": "x", "log_time": 5.0}), "- [-#-] x\n")

    def test_logSetupWritesThroughIt(self) -> None:
        """
        When LogSetup writes text, filtered events are not written and the
        others are written as Twisted would.
        """
        out, reference = io.StringIO(), io.StringIO()
        setup = LogSetup("info", "text", out)
        event = dict(sample_events()[1])
        setup.observer(dict(event, log_level=LogLevel.debug))
        setup.observer(event)
        textFileLogObserver(reference)(event)
        self.assertEqual(out.getvalue(), reference.getvalue())


class LevelFilterTests(SynchronousTestCase):
    """
    Tests for L{LevelFilter}: it passes exactly the events Twisted's
    L{FilteringLogObserver} with a L{LogLevelFilterPredicate} passes.
    """

    def events(self) -> List[Dict[str, Any]]:
        events: List[Dict[str, Any]] = []
        for level in [None, *LogLevel.iterconstants()]:
            for namespace in [None, "", "vaporproxy.bridge", "twisted.python.log"]:
                event: Dict[str, Any] = {"log_format": "x"}
                if level is not None:
                    event["log_level"] = level
                if namespace is not None:
                    event["log_namespace"] = namespace
                events.append(event)
        return events

    def test_sameAsTwisted(self) -> None:
        """
        For every level it is set to, the events passed are those Twisted's
        level filter passes (none without a level or a namespace), also
        after a level change.
        """
        for level in LogLevel.iterconstants():
            ours: List[Any] = []
            theirs: List[Any] = []
            fast = LevelFilter(ours.append, LogLevel.critical)
            fast.set_level(level)
            reference = FilteringLogObserver(theirs.append, [LogLevelFilterPredicate(level)])
            for event in self.events():
                fast(event)
                reference(event)
            self.assertEqual(ours, theirs)
            self.assertTrue(ours, level)


class QuickLoggerTests(SynchronousTestCase):
    """
    Tests for L{QuickLogger}: its events are those Twisted's L{Logger} emits.
    """

    def test_sameEventsAsTwisted(self) -> None:
        """
        At every level, with and without fields, the event it emits has the
        keys and values of Twisted's (the time aside), the logger and its
        source included.
        """
        ours: List[Dict[str, Any]] = []
        theirs: List[Dict[str, Any]] = []
        source = _Thing()
        quick = QuickLogger(namespace="vaporproxy.test", source=source, observer=ours.append)
        twisted = Logger(namespace="vaporproxy.test", source=source, observer=theirs.append)
        for level in LogLevel.iterconstants():
            quick.emit(level, "at {level_name} {x}", level_name=level.name, x=1)
            twisted.emit(level, "at {level_name} {x}", level_name=level.name, x=1)
        quick.info("no fields")
        twisted.info("no fields")
        self.assertEqual(len(ours), 6)
        for mine, reference in zip(ours, theirs):
            self.assertIs(mine.pop("log_logger"), quick)
            self.assertIs(reference.pop("log_logger"), twisted)
            self.assertLess(abs(mine.pop("log_time") - reference.pop("log_time")), 5)
            self.assertEqual(mine, reference)
            self.assertEqual(formatEvent(mine), formatEvent(reference))

    def test_unknownLevel(self) -> None:
        """
        An unknown level is refused as Twisted refuses it: one critical
        event naming the level, with the failure.
        """
        ours: List[Dict[str, Any]] = []
        QuickLogger(namespace="vaporproxy.test", observer=ours.append).emit("loud", "x")  # type: ignore[arg-type]
        self.assertEqual(len(ours), 1)
        self.assertIs(ours[0]["log_level"], LogLevel.critical)
        self.assertEqual(ours[0]["invalidLevel"], "loud")
        self.assertIn("log_failure", ours[0])

    def test_trace(self) -> None:
        """
        An event with C{log_trace} gets the logger and its observer
        appended, as Twisted's does.
        """
        trace: List[Any] = []
        observer: List[Dict[str, Any]] = []
        quick = QuickLogger(namespace="vaporproxy.test", observer=observer.append)
        quick.info("traced", log_trace=trace)
        self.assertEqual(trace, [(quick, observer.append)])


class JSONMessageTests(SynchronousTestCase):
    """
    Tests for the C{message} of L{json_lines_observer}.
    """

    def test_messageAsTwisted(self) -> None:
        """
        When the sample events are written as JSON, each message is what
        formatEvent gives.
        """
        out = io.StringIO()
        observer = json_lines_observer(out)
        events = sample_events()
        for event in events:
            observer(event)
        messages = [json.loads(line)["message"] for line in out.getvalue().splitlines()]
        self.assertEqual(messages, [formatEvent(e) for e in events])


class DebugEnabledTests(SynchronousTestCase):
    """
    Tests for L{debug_enabled}: the gate of costly debug lines.
    """

    def test_noSetupInstalled(self) -> None:
        """When no setup is installed (library use, tests), debug lines are wanted."""
        self.assertTrue(debug_enabled())

    def test_followsInstalledLevel(self) -> None:
        """When a setup is installed, debug lines are wanted only at level debug, following SIGHUP changes."""
        setup = LogSetup("info", "text", io.StringIO())
        setup.install()
        self.addCleanup(setup.uninstall)
        self.assertFalse(debug_enabled())
        setup.set_level("debug")
        self.assertTrue(debug_enabled())
        setup.set_level("warn")
        self.assertFalse(debug_enabled())
        setup.uninstall()
        self.assertTrue(debug_enabled())

    def test_otherSetupsDoNotCount(self) -> None:
        """When a setup is made but not installed, the gate stays open."""
        LogSetup("error", "text", io.StringIO())
        self.assertTrue(debug_enabled())


class IsoUtcTests(SynchronousTestCase):
    """
    The project's timestamp, asked for two seconds in turn.
    """

    def test_alternating_seconds(self) -> None:
        """When two seconds are asked for in turn (and more than it keeps), each answer is that second's."""
        from datetime import datetime, timezone

        from vaporproxy.timestamps import iso_utc

        seconds = [1_700_000_000 + (i % 2) * 300 + i // 20 for i in range(60)]
        for second in seconds:
            expected = datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            self.assertEqual(iso_utc(second + 0.75), expected)
