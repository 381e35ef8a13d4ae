"""
The epoll reactor's event dispatch without a log context built per event
(part of the compat room: C{EPollReactor._poller}, C{_selectables} and
C{_doReadOrWrite} are Twisted's private names).

Twisted's C{doPoll} hands every ready descriptor to C{log.callWithLogger},
which asks the descriptor for its C{logPrefix()}, copies the legacy log
context and pushes it for the call: about 16 k instructions per event
(callgrind, Twisted 26.10), against 1 k for the call itself, and a console
set-up is about a dozen events: with Twisted's loop 2.67-2.71 M instructions per
set-up, with this one 2.46 M (-8 %, bench/setupcost.py, 6 Dec).  L{quicken}
replaces the reactor's C{doPoll} with the same loop calling
C{_doReadOrWrite} directly, and keeps what the context was for: a legacy
C{log.msg}/C{log.err} made while a descriptor's event runs still carries
that descriptor's C{logPrefix()} as its C{system}, now computed only when
such a line is written (L{_DispatchLogContext}); an exception escaping the
dispatch is logged with it, as C{callWithLogger} does.
"""

from __future__ import annotations

import errno
import threading
from types import MethodType
from typing import Any, List, Optional

from twisted.python import context, log
from twisted.python.log import ILogContext

__all__ = ["quicken"]

#: The descriptor whose event the reactor thread is dispatching, if any.
_dispatching: List[Any] = [None]


class _DispatchLogContext(dict):
    """
    The legacy log context's default (Twisted's is C{{"system": "-"}}):
    read through C{copy()} by C{log.msg} and C{log.callWithContext}, it
    names the descriptor being dispatched on the reactor's thread.
    """

    def __init__(self, reactor_thread: int):
        super().__init__(system="-")
        self._thread = reactor_thread

    def copy(self) -> dict:  # type: ignore[override]
        selectable = _dispatching[0]
        if selectable is None or threading.get_ident() != self._thread:
            return {"system": "-"}
        return {"system": _prefix(selectable)}


def _prefix(selectable: Any) -> str:
    try:
        return selectable.logPrefix()
    except Exception:
        return "(buggy logPrefix method)"


def _do_poll(self: Any, timeout: Optional[float]) -> None:
    """Twisted's C{EPollReactor.doPoll}, each event dispatched directly."""
    if timeout is None:
        timeout = -1  # Wait indefinitely.
    try:
        ready = self._poller.poll(timeout, len(self._selectables))
    except OSError as err:
        if err.errno == errno.EINTR:
            return
        raise
    dispatch = self._doReadOrWrite
    selectables = self._selectables
    for fd, event in ready:
        selectable = selectables.get(fd)
        if selectable is None:
            continue
        _dispatching[0] = selectable
        try:
            dispatch(selectable, fd, event)
        except KeyboardInterrupt:
            raise
        except BaseException:
            log.err(system=_prefix(selectable))
        finally:
            _dispatching[0] = None


def quicken(reactor: Any) -> bool:
    """
    Give C{reactor} the direct dispatch when it is Twisted's epoll reactor
    with the shape this module knows (C{False}, nothing changed, for any
    other reactor: a test's, or one chosen with C{twistd --reactor}).
    """
    from twisted.internet.epollreactor import EPollReactor

    if type(reactor) is not EPollReactor:
        return False
    if not all(hasattr(reactor, name) for name in ("_poller", "_selectables", "_doReadOrWrite")):
        return False
    context.setDefault(ILogContext, _DispatchLogContext(threading.get_ident()))
    reactor.doPoll = reactor.doIteration = MethodType(_do_poll, reactor)
    return True
