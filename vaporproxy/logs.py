"""
Logging for vaporproxy under C{twistd}: level filtering and text or JSON
output.

twistd starts logging right after C{makeService} returns, with the
L{ILogObserver} component of its application if there is one (the way a
C{.tac} file sets its own observer).  L{LogSetup} builds that observer:
a level filter (L{LevelFilter}) whose level can change on SIGHUP, in front of a
text (twistd's usual lines) or JSON-lines formatter, writing where
twistd's own options (C{--nodaemon}, C{--logfile}, C{--syslog}) say.
C{tap.VaporService} hands it to the application when twistd parents it.

C{VAPOR_LOG_LEVEL} in the environment overrides C{logging.level}.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from time import time
from typing import IO, Any, Callable, Dict, Mapping, Optional, Tuple

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LegacyLogObserverWrapper,
    Logger,
    LogLevel,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)
from zope.interface import implementer, provider

from vaporproxy.config import ConfigError, parse_log_level

#: Our level names and Twisted's.
LEVELS: Mapping[str, LogLevel] = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}

ENV_LEVEL = "VAPOR_LOG_LEVEL"

#: Event keys that are Twisted's bookkeeping, not the event's own fields.
_SKIP_FIELDS = frozenset({"message", "format", "isError", "system", "time", "why", "failure"})


#: Every level Twisted knows (L{QuickLogger.emit}'s check).
_KNOWN_LEVELS = frozenset(LogLevel.iterconstants())


class QuickLogger(Logger):
    """
    Twisted's L{Logger}, whose C{emit} checks the level with one set
    lookup: Twisted's sorts the five level constants on every event
    (C{LogLevel.iterconstants()}), and the access log and the audit trail
    log several events for every console (issue 8).  The event is the one
    Twisted's C{emit} builds; an unknown level takes Twisted's own path
    (its complaint).
    """

    def emit(self, level: LogLevel, format: Optional[str] = None, **kwargs: Any) -> None:
        if level not in _KNOWN_LEVELS:
            Logger.emit(self, level, format, **kwargs)
            return
        kwargs.update(
            log_logger=self,
            log_level=level,
            log_namespace=self.namespace,
            log_source=self.source,
            log_format=format,
            log_time=time(),
        )
        if "log_trace" in kwargs:
            kwargs["log_trace"].append((self, self.observer))  # type: ignore[attr-defined]
        self.observer(kwargs)


#: The L{LogSetup} twistd was given (L{LogSetup.install}), if any.
_installed: list = [None]


def debug_enabled() -> bool:
    """
    Whether debug events can be written: C{False} only when the installed
    L{LogSetup} (the observer twistd writes through) filters them out.

    Twisted's L{Logger} builds and publishes every event, filtered or not,
    and a caller computes the event's fields first; a few debug lines run
    for every console, so their callers check this first (issue #3).
    Without an installed setup (library use, unit tests) it is C{True}:
    whoever observes gets every event.
    """
    setup = _installed[0]
    return setup is None or setup.level == "debug"


def effective_level(config_level: str, environ: Mapping[str, str]) -> str:
    """
    The level in force: C{VAPOR_LOG_LEVEL} when set, else the config's.

    @raise ConfigError: when C{VAPOR_LOG_LEVEL} is not a level.
    """
    value = environ.get(ENV_LEVEL)
    if value is None or value == "":
        return config_level
    return parse_log_level(ENV_LEVEL, value)


def format_message(event: Mapping[str, Any]) -> str:
    """
    The text of C{event}'s C{log_format}, exactly as L{formatEvent} gives
    it, but with C{str.format_map} (C code) when the format allows it.

    Twisted's own formatter parses the format in Python on every event so
    as to support its C{{name()}} call syntax; a console open and close logs
    several lines, so that parse was a visible share of a console's set-up
    cost.  Formats with C{()}, bytes formats, flattened events and anything
    C{str.format_map} refuses go to L{formatEvent}, which gives the same
    text for the rest.
    """
    fmt = event.get("log_format")
    if type(fmt) is str and "log_flattened" not in event and "()" not in fmt:
        try:
            return fmt.format_map(event)
        except Exception:
            pass
    return formatEvent(event)


#: C{[system]} texts of events without C{log_system}, by (namespace, level).
_SYSTEMS: Dict[Tuple[Any, Any], str] = {}


def _system(event: Mapping[str, Any]) -> str:
    """
    The C{[system]} part of a classic log line (as Twisted writes it).
    """
    system = event.get("log_system")
    if system is None:
        # Built once per namespace and level (every audit and access line
        # comes this way).
        key = (event.get("log_namespace", "-"), event.get("log_level"))
        try:
            text = _SYSTEMS.get(key)
        except TypeError:  # an unhashable namespace: built every time
            text, key = None, None
        if text is None:
            level = key[1] if key is not None else event.get("log_level")
            namespace = key[0] if key is not None else event.get("log_namespace", "-")
            text = "{}#{}".format(namespace, "-" if level is None else level.name)
            if key is not None and len(_SYSTEMS) < 1024:
                _SYSTEMS[key] = text
        return text
    try:
        return str(system)
    except Exception:
        return "UNFORMATTABLE"


def classic_text_formatter(time_format: Optional[str] = timeFormatRFC3339) -> Callable[[Mapping[str, Any]], Optional[str]]:
    """
    An event formatter giving what L{textFileLogObserver} writes
    (C{"{time} [{system}] {text}\n"}, continuation lines indented by a
    tab), faster: the time stamp is formatted once per second (the format
    has no sub-second field) and the message by L{format_message}.  Events
    with a failure take Twisted's own path.
    """
    last: list = [None, "-"]

    def format_time(when: Optional[float]) -> str:
        if when is None or time_format is None:
            return "-"
        second = int(when // 1)
        if last[0] != second:
            last[1] = formatTime(second, time_format)
            last[0] = second
        return last[1]

    def format_event(event: Mapping[str, Any]) -> Optional[str]:
        if "log_failure" in event:
            return formatEventAsClassicLogText(event, formatTime=format_time)
        text = format_message(event)
        if not text:
            return None
        line = f"{format_time(event.get('log_time'))} [{_system(event)}] {text}"
        return line.replace("\n", "\n\t") + "\n"

    return format_event


def text_file_observer(out: IO[str]) -> ILogObserver:
    """
    Twisted's classic text lines to C{out} (as L{textFileLogObserver}),
    with L{classic_text_formatter}.
    """
    return FileLogObserver(out, classic_text_formatter())


def _json_default(value: Any) -> str:
    return str(value)


def json_lines_observer(out: IO[str]) -> ILogObserver:
    """
    An observer writing one JSON object per line to C{out}: C{time}
    (ISO-8601 UTC), C{level}, C{namespace}, C{system}, C{message} (the
    formatted text), C{failure} (a traceback, when there is one) and the
    event's own fields.
    """

    @provider(ILogObserver)
    def observe(event: Mapping[str, Any]) -> None:
        level = event.get("log_level")
        record = {
            "time": datetime.fromtimestamp(event.get("log_time") or 0, timezone.utc).isoformat(
                timespec="milliseconds"
            ).replace("+00:00", "Z"),
            "level": level.name if level is not None else "info",
            "namespace": event.get("log_namespace"),
            "system": event.get("log_system", event.get("system")),
            "message": format_message(event),
        }
        failure = event.get("log_failure")
        if failure is not None:
            record["failure"] = failure.getTraceback()
        for key, value in event.items():
            if not key.startswith("log_") and key not in _SKIP_FIELDS and key not in record:
                record[key] = value
        try:
            line = json.dumps(record, default=_json_default)
        except (TypeError, ValueError):
            line = json.dumps({k: str(v) for k, v in record.items()})
        out.write(line + "\n")
        out.flush()

    return observe


def twistd_destination(twistd_options: Optional[Mapping[str, Any]]) -> Any:
    """
    Where twistd would write its log for these (twistd's own) options: a
    file object, or a legacy syslog observer for C{--syslog}.

    Mirrors twistd's UnixAppLogger: C{--logfile=-} or C{--nodaemon} with
    no C{--logfile} is stdout; otherwise C{--logfile} (default
    C{twistd.log}), a L{LogFile} that rotates by size.
    """
    options = twistd_options or {}
    if options.get("syslog"):
        from twisted.python import syslog

        return syslog.SyslogObserver(options.get("prefix") or "twisted").emit
    logfile = options.get("logfile")
    nodaemon = options.get("nodaemon", twistd_options is None)
    if logfile == "-" or (nodaemon and not logfile):
        return sys.stdout
    from twisted.python.logfile import LogFile

    return LogFile.fromFullPath(logfile or "twistd.log")


@implementer(ILogObserver)
class LevelFilter:
    """
    Passes the events at or above a level on to C{observer}: what Twisted's
    L{FilteringLogObserver} with a L{LogLevelFilterPredicate} does for one
    level for every namespace (events without a level or a namespace are
    dropped), with one set lookup per event instead of a walk up the
    namespace and comparisons of level constants: every console logs, so
    that was a visible share of a console's set-up cost (issue #3).
    """

    def __init__(self, observer: ILogObserver, level: LogLevel):
        self._observer = observer
        self._passing: frozenset = frozenset()
        self.set_level(level)

    def set_level(self, level: LogLevel) -> None:
        """
        From now on pass C{level} and the levels above it.
        """
        self._passing = frozenset(other for other in LogLevel.iterconstants() if not other < level)

    def __call__(self, event: Mapping[str, Any]) -> None:
        if event.get("log_level") in self._passing and event.get("log_namespace"):
            self._observer(event)


class LogSetup:
    """
    vaporproxy's log observer: a level filter in front of a formatter.

    @ivar observer: the L{ILogObserver} to give to twistd.
    @ivar level: the level name in force.
    @ivar log_file: the L{LogFile} written, if any (for C{rotate}).
    """

    def __init__(self, level: str, format: str, destination: Any):
        """
        @param level: C{debug}, C{info}, C{warn} or C{error}.
        @param format: C{text} or C{json}.
        @param destination: a writable text file, or a legacy observer
            (syslog) which then formats by itself.
        """
        self.level = level
        self.log_file = destination if hasattr(destination, "rotate") else None
        if hasattr(destination, "write"):
            inner: ILogObserver = (
                json_lines_observer(destination)
                if format == "json"
                else text_file_observer(destination)
            )
        else:
            inner = LegacyLogObserverWrapper(destination)
        self._filter = LevelFilter(inner, LEVELS[level])
        self.observer: ILogObserver = self._filter

    def install(self) -> None:
        """
        This is the observer twistd writes through: L{debug_enabled}
        follows its level from now on.
        """
        _installed[0] = self

    def uninstall(self) -> None:
        """
        Undo L{install} (tests).
        """
        if _installed[0] is self:
            _installed[0] = None

    def set_level(self, level: str) -> None:
        """
        Change the level in force (SIGHUP reload).
        """
        self._filter.set_level(LEVELS[level])
        self.level = level


def log_setup_for(
    config_level: str,
    config_format: str,
    environ: Mapping[str, str],
    twistd_options: Optional[Mapping[str, Any]],
    destination: Optional[Callable[[Optional[Mapping[str, Any]]], Any]] = None,
) -> LogSetup:
    """
    The L{LogSetup} for a config, the environment and twistd's options.

    @raise ConfigError: when C{VAPOR_LOG_LEVEL} is not a level.
    """
    level = effective_level(config_level, environ)
    where = (destination or twistd_destination)(twistd_options)
    return LogSetup(level, config_format, where)


__all__ = [
    "ConfigError",
    "ENV_LEVEL",
    "LEVELS",
    "LevelFilter",
    "LogSetup",
    "QuickLogger",
    "classic_text_formatter",
    "debug_enabled",
    "effective_level",
    "format_message",
    "json_lines_observer",
    "log_setup_for",
    "text_file_observer",
    "twistd_destination",
]
