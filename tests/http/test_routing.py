"""
Tests for L{vaporproxy.http.routing.render_coroutine}: a coroutine's answer,
given at once when it does not wait, else written when it finishes.
"""

from __future__ import annotations

from typing import Any, List

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from vaporproxy.http.routing import render_coroutine


class _Log:
    def __init__(self) -> None:
        self.failures: List[Any] = []

    def failure(self, format: str, failure: Failure) -> None:
        self.failures.append(failure)


def error_answer(request: Any, failure: Failure) -> bytes:
    return b"error: " + repr(failure.value).encode()


class RenderCoroutineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.request = DummyRequest([b""])
        self.log = _Log()

    def render(self, coro: Any) -> Any:
        return render_coroutine(self.request, coro, error_answer, self.log)

    def test_noWait(self) -> None:
        """When every Deferred awaited has fired, the body is the answer itself."""

        async def work() -> bytes:
            a = await succeed(b"a")
            return a + await succeed(b"b")

        self.assertEqual(self.render(work()), b"ab")
        self.assertEqual(self.request.written, [])

    def test_raisesAtOnce(self) -> None:
        """When the coroutine raises before waiting, the answer is error_answer's for that exception."""

        async def work() -> bytes:
            await succeed(None)
            raise ValueError("bad")

        self.assertEqual(self.render(work()), b"error: ValueError('bad')")

    def test_waits(self) -> None:
        """
        When it waits, NOT_DONE_YET is answered; each result is sent in and
        each failure thrown in where it waits, and the body is written with
        its length when it returns.
        """
        first: Deferred = Deferred()
        second: Deferred = Deferred()

        async def work() -> bytes:
            a = await first
            try:
                await second
            except KeyError as e:
                return a + b" then " + repr(e).encode()
            return b"not here"

        self.assertIs(self.render(work()), NOT_DONE_YET)
        first.callback(b"one")
        self.assertEqual(self.request.written, [])
        second.errback(KeyError("two"))
        self.assertEqual(self.request.written, [b"one then KeyError('two')"])
        self.assertEqual(self.request.responseHeaders.getRawHeaders(b"content-length"), [b"24"])
        self.assertEqual(self.request.finished, 1)

    def test_failsLater(self) -> None:
        """When it raises after waiting, error_answer's body is written."""
        pending: Deferred = Deferred()

        async def work() -> bytes:
            await pending
            raise ValueError("late")

        self.assertIs(self.render(work()), NOT_DONE_YET)
        pending.callback(None)
        self.assertEqual(self.request.written, [b"error: ValueError('late')"])

    def test_clientGone(self) -> None:
        """
        When the client goes away while it waits, the Deferred it awaits is
        cancelled, the cancellation reaches it, and nothing is written or
        logged.
        """
        pending: Deferred = Deferred()
        seen: List[Any] = []

        async def work() -> bytes:
            try:
                await pending
            except CancelledError as e:
                seen.append(e)
                raise
            return b"not here"

        self.assertIs(self.render(work()), NOT_DONE_YET)
        self.request.processingFailed(Failure(ConnectionDone()))
        self.assertEqual(len(seen), 1)
        self.assertTrue(pending.called)
        self.assertEqual(self.log.failures, [])
        self.assertEqual(self.request.written, [])
