"""
Autobahn's batched-timer interface over an injected reactor (part of the
compat room: C{factory._batched_timer} is Autobahn's private name).
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from vaporproxy.timers import timers_for

__all__ = ["ReactorTimer"]


class ReactorTimer:
    """
    Autobahn's batched timer interface (C{factory._batched_timer}) over an
    injected reactor, so that Autobahn's own timeouts (opening and closing
    handshakes, auto-ping) run on the reactor we were given instead of
    txaio's global one (DESIGN.md rule 1; correctness, not speed).
    """

    def __init__(self, reactor: IReactorTime):
        #: The reactor's shared timers (L{vaporproxy.timers}): Autobahn arms
        #: two per console and cancels them.
        self.timers = timers_for(reactor)

    def call_later(self, delay: float, fun: Callable, *args: Any, **kwargs: Any) -> "_Call":
        return _Call(self.timers.callLater(delay, fun, *args, **kwargs))


class _Call:
    """
    A delayed call whose C{cancel} may be called after it ran.
    """

    __slots__ = ("_call",)

    def __init__(self, call: IDelayedCall):
        self._call = call

    def cancel(self) -> None:
        if self._call.active():
            self._call.cancel()
