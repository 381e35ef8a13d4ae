"""
L{vaporproxy.ws.autobahn_compat.event_loop}: a real epoll reactor (not the
test run's) dispatching real socket events directly, with the legacy log
context Twisted's C{callWithLogger} gave them.
"""

from __future__ import annotations

import inspect
import socket
import threading
from typing import Any, List

from twisted.internet.abstract import FileDescriptor
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.task import Clock
from twisted.python import context, log
from twisted.python.log import ILogContext
from twisted.trial.unittest import SynchronousTestCase

from vaporproxy.ws.autobahn_compat import event_loop
from vaporproxy.ws.autobahn_compat.event_loop import quicken


class Reader(FileDescriptor):
    """One end of a socket pair, whose reads run C{on_read}."""

    def __init__(self, reactor: Any, sock: socket.socket, on_read: Any):
        super().__init__(reactor)
        self.sock = sock
        self.on_read = on_read

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "Reader,7,peer"

    def doRead(self) -> None:
        self.sock.recv(100)
        self.on_read()


class EventLoopTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.left, self.right = socket.socketpair()
        self.addCleanup(self.left.close)
        self.addCleanup(self.right.close)
        self.reactor = EPollReactor()
        self.addCleanup(self._close_reactor)  # (cleanups run last first: before the sockets close)
        self.addCleanup(context.setDefault, ILogContext, context.defaultContextDict[ILogContext])
        self.events: List[dict] = []
        log.addObserver(self.events.append)
        self.addCleanup(log.removeObserver, self.events.append)

    def _close_reactor(self) -> None:
        self.reactor.removeAll()
        self.reactor._poller.close()

    def reader(self, on_read: Any) -> Reader:
        reader = Reader(self.reactor, self.left, on_read)
        self.reactor.addReader(reader)
        self.right.send(b"x")
        return reader

    def test_twistedsShapeIsTheOneCopied(self) -> None:
        """
        The copied loop is Twisted's doPoll less the context: if the
        installed Twisted's loop changed, this fails and the copy must be
        compared again.
        """
        source = inspect.getsource(EPollReactor.doPoll)
        self.assertIn("l = self._poller.poll(timeout, len(self._selectables))", source)
        self.assertIn("_drdw = self._doReadOrWrite", source)
        self.assertIn("log.callWithLogger(selectable, _drdw, selectable, fd, event)", source)
        self.assertIs(EPollReactor.doIteration, EPollReactor.doPoll)
        self.assertIsInstance(self.reactor._selectables, dict)

    def test_onlyTwistedsEpollReactor(self) -> None:
        self.assertFalse(quicken(Clock()))

        class Other(EPollReactor):
            pass

        other = Other()
        self.addCleanup(other._poller.close)
        self.assertFalse(quicken(other))
        self.assertNotIn("doPoll", vars(other))

    def test_dispatchesWithTheDescriptorsLogSystem(self) -> None:
        """
        A read runs; a legacy log line made during it carries the
        descriptor's logPrefix, one made outside carries "-".
        """
        self.assertTrue(quicken(self.reactor))
        ran: List[str] = []
        self.reader(lambda: (ran.append("read"), log.msg("inside")))
        self.reactor.doIteration(1)
        log.msg("outside")
        self.assertEqual(ran, ["read"])
        systems = {e["message"][0]: e["system"] for e in self.events if e.get("message")}
        self.assertEqual(systems, {"inside": "Reader,7,peer", "outside": "-"})

    def test_sameSystemAsTwisted(self) -> None:
        """Without quicken, Twisted's own loop gives the same system (the test's premise)."""
        self.reader(lambda: log.msg("inside"))
        self.reactor.doIteration(1)
        self.assertEqual([e["system"] for e in self.events if e.get("message") == ("inside",)], ["Reader,7,peer"])

    def test_nestedContextWins(self) -> None:
        self.assertTrue(quicken(self.reactor))
        self.reader(lambda: log.callWithContext({"system": "nested"}, log.msg, "inside"))
        self.reactor.doIteration(1)
        self.assertEqual([e["system"] for e in self.events if e.get("message") == ("inside",)], ["nested"])

    def test_otherThreadsSeeNoDescriptor(self) -> None:
        """A thread logging while the reactor thread dispatches gets "-"."""
        self.assertTrue(quicken(self.reactor))

        def from_thread() -> None:
            thread = threading.Thread(target=log.msg, args=("thread",))
            thread.start()
            thread.join()

        self.reader(from_thread)
        self.reactor.doIteration(1)
        self.assertEqual([e["system"] for e in self.events if e.get("message") == ("thread",)], ["-"])

    def test_escapingErrorLoggedWithSystem(self) -> None:
        """
        What escapes C{_doReadOrWrite} is logged with the descriptor's
        system, as C{callWithLogger} does, and the loop goes on.
        """
        self.assertTrue(quicken(self.reactor))
        reader = self.reader(lambda: None)
        self.reactor._doReadOrWrite = lambda *a: 1 / 0
        self.reactor.doIteration(1)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        errors = [e for e in self.events if e.get("isError")]
        self.assertEqual([e["system"] for e in errors], ["Reader,7,peer"])
        self.assertIsNone(event_loop._dispatching[0])
        self.reactor.removeReader(reader)

    def test_keyboardInterruptPropagates(self) -> None:
        self.assertTrue(quicken(self.reactor))
        self.reader(lambda: None)

        def interrupt(*args: Any) -> None:
            raise KeyboardInterrupt()

        self.reactor._doReadOrWrite = interrupt
        self.assertRaises(KeyboardInterrupt, self.reactor.doIteration, 1)
        self.assertIsNone(event_loop._dispatching[0])

    def test_buggyLogPrefix(self) -> None:
        self.assertTrue(quicken(self.reactor))
        reader = self.reader(lambda: log.msg("inside"))
        reader.logPrefix = lambda: 1 / 0  # type: ignore[method-assign]
        self.reactor.doIteration(1)
        self.assertEqual(
            [e["system"] for e in self.events if e.get("message") == ("inside",)], ["(buggy logPrefix method)"]
        )
