"""
Tests for L{vaporproxy.guards.kit}: the typed outputs, their queue and
delivery to a legacy sink, L{StepReader} and L{TwoSidedGuard}.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, get_args

from twisted.trial.unittest import SynchronousTestCase

from tests.guards.playbook import (
    ClientData,
    Playbook,
    RecordingSink,
    ServerConnected,
    ServerData,
    Start,
    assert_plays,
    coalesced,
)
from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.guards.kit import (
    SINK_METHODS,
    Admit,
    Established,
    Failed,
    GuardFailure,
    Output,
    OutputQueue,
    SendToClient,
    SendToServer,
    SpiceSessionAssigned,
    StartTLS,
    StepReader,
    Steps,
    TwoSidedGuard,
    UpTo,
    client_failure,
    deliver,
    server_failure,
)

CREATOR = object()
#: One output of every kind, and the sink call that stands for it.
EVERY_OUTPUT = [
    (SendToClient(b"to browser"), ("send_to_client", b"to browser")),
    (SendToServer(b"to vm"), ("send_to_server", b"to vm")),
    (StartTLS(CREATOR), ("start_tls", CREATOR)),
    (Admit(True), ("admit", True)),
    (SpiceSessionAssigned(7), ("spice_session", 7)),
    (Established(), ("established",)),
    (Failed(ConsoleError(ErrorCode.BAD_REQUEST), "why"), ("fail", ErrorCode.BAD_REQUEST, "why")),
]


def overflow() -> GuardFailure:
    return client_failure("overflow")


class OutputTests(SynchronousTestCase):
    """
    The typed outputs are frozen values.
    """

    def test_frozen(self) -> None:
        """
        When an output's field is assigned, FrozenInstanceError is raised.
        """
        output = SendToClient(b"x")
        self.assertRaises(dataclasses.FrozenInstanceError, setattr, output, "data", b"y")

    def test_equal_by_kind_and_value(self) -> None:
        """
        When two outputs are compared, they are equal only if of one kind
        with equal fields.
        """
        self.assertEqual(SendToClient(b"x"), SendToClient(b"x"))
        self.assertNotEqual(SendToClient(b"x"), SendToServer(b"x"))
        self.assertNotEqual(SendToClient(b"x"), SendToClient(b"y"))
        self.assertEqual(Established(), Established())
        self.assertEqual(len({Admit(True), Admit(True), Admit(False)}), 2)

    def test_failed_compares_code_message_reason(self) -> None:
        """
        When two Failed are compared, their errors' codes and messages and
        their reasons decide (not the errors' identity).
        """
        one = Failed(ConsoleError(ErrorCode.BAD_REQUEST), "why")
        self.assertEqual(one, Failed(ConsoleError(ErrorCode.BAD_REQUEST), "why"))
        self.assertEqual(hash(one), hash(Failed(ConsoleError(ErrorCode.BAD_REQUEST), "why")))
        self.assertNotEqual(one, Failed(ConsoleError(ErrorCode.CONNECTION_FAILED), "why"))
        self.assertNotEqual(one, Failed(ConsoleError(ErrorCode.BAD_REQUEST, "other"), "why"))
        self.assertNotEqual(one, Failed(ConsoleError(ErrorCode.BAD_REQUEST), "other"))
        self.assertNotEqual(one, Established())


class DeliverTests(SynchronousTestCase):
    """
    L{deliver}: each output becomes the legacy sink call that stands for it.
    """

    def test_every_kind(self) -> None:
        """
        When one output of every kind is delivered, the sink gets the call
        named in SINK_METHODS with the output's fields.
        """
        sink = RecordingSink()
        for output, _ in EVERY_OUTPUT:
            deliver(sink, output)
        self.assertEqual(sink.calls, [call for _, call in EVERY_OUTPUT])
        for output, call in EVERY_OUTPUT:
            self.assertEqual(SINK_METHODS[type(output)], call[0])

    def test_every_output_type_has_a_method(self) -> None:
        """
        When a kind of output exists, SINK_METHODS names its sink method.
        """
        self.assertEqual(set(SINK_METHODS), set(get_args(Output)))


class OutputQueueTests(SynchronousTestCase):
    """
    L{OutputQueue}: outputs queued during a step, handed out after it.
    """

    def test_hand_out_in_order(self) -> None:
        """
        When outputs are queued, hand_out returns them in order, delivers
        them to the sink, and a second hand_out returns nothing.
        """
        sink = RecordingSink()
        queue = OutputQueue(sink)
        for output, _ in EVERY_OUTPUT[:5]:
            queue.emit(output)
        self.assertEqual(queue.hand_out(), [output for output, _ in EVERY_OUTPUT[:5]])
        self.assertEqual(sink.calls, [call for _, call in EVERY_OUTPUT[:5]])
        self.assertEqual(queue.hand_out(), [])

    def test_without_sink(self) -> None:
        """
        When the queue has no sink, hand_out only returns the outputs.
        """
        queue = OutputQueue(None)
        queue.emit(SendToClient(b"a"))
        queue.emit(Established())
        self.assertEqual(queue.hand_out(), [SendToClient(b"a"), Established()])
        self.assertTrue(queue.finished)
        self.assertFalse(queue.failed)

    def test_nothing_after_failed(self) -> None:
        """
        When Failed is handed out, what was queued after it is dropped, and
        later outputs are not handed out.
        """
        sink = RecordingSink()
        queue = OutputQueue(sink)
        failed = Failed(ConsoleError(ErrorCode.CONNECTION_FAILED), "gone")
        for output in [SendToServer(b"a"), failed, SendToClient(b"late")]:
            queue.emit(output)
        self.assertEqual(queue.hand_out(), [SendToServer(b"a"), failed])
        self.assertTrue(queue.failed)
        queue.emit(SendToClient(b"later"))
        self.assertEqual(queue.hand_out(), [])
        self.assertEqual(sink.names(), ["fail"])

    def test_reentrant_sink(self) -> None:
        """
        When the sink queues and hands out more outputs from inside a sink
        call, the inner hand_out returns nothing and the outer one delivers
        them after what was already queued.
        """
        inner: List[List[Output]] = []

        class Reentrant(RecordingSink):
            def send_to_client(self, data: bytes) -> None:
                super().send_to_client(data)
                if data == b"first":
                    queue.emit(SendToServer(b"inner"))
                    inner.append(queue.hand_out())

        queue = OutputQueue(Reentrant())
        queue.emit(SendToClient(b"first"))
        queue.emit(SendToClient(b"second"))
        handed = queue.hand_out()
        self.assertEqual(inner, [[]])
        self.assertEqual(handed, [SendToClient(b"first"), SendToClient(b"second"), SendToServer(b"inner")])


class StepReaderTests(SynchronousTestCase):
    """
    L{StepReader}: bytes fed in any fragmentation reach the parsing
    generator as it asked for them.
    """

    def test_exact_counts_any_fragmentation(self) -> None:
        """
        When a generator asks for 3 then 2 bytes, it gets exactly those
        whether the input comes whole or a byte at a time; the rest stays
        buffered.
        """
        for pieces in ([b"abcdefg"], [bytes([b]) for b in b"abcdefg"], [b"ab", b"cdef", b"g"]):
            seen: List[bytes] = []

            def steps() -> Steps:
                seen.append((yield 3))
                seen.append((yield 2))

            reader = StepReader(steps(), 100, overflow)
            for piece in pieces:
                reader.feed(piece)
            self.assertEqual(seen, [b"abc", b"de"])
            self.assertTrue(reader.done)
            self.assertEqual(reader.buffered(), 2)
            self.assertEqual(reader.take_rest(), b"fg")
            self.assertEqual(reader.buffered(), 0)

    def test_up_to(self) -> None:
        """
        When a generator yields UpTo(n), it gets what is buffered, at most
        n bytes, as soon as one byte is there.
        """
        seen: List[bytes] = []

        def steps() -> Steps:
            while True:
                seen.append((yield UpTo(4)))

        reader = StepReader(steps(), 100, overflow)
        reader.feed(b"")
        self.assertEqual(seen, [])
        reader.feed(b"ab")
        reader.feed(b"cdefgh")
        self.assertEqual(seen, [b"ab", b"cdef", b"gh"])
        self.assertRaises(ValueError, UpTo, 0)

    def test_condition(self) -> None:
        """
        When a generator yields a condition, it resumes (with None) only on
        a pump after the condition turned true.
        """
        state = {"ready": False}
        seen: List[Optional[bytes]] = []

        def steps() -> Steps:
            seen.append((yield lambda: state["ready"]))
            seen.append((yield 1))

        reader = StepReader(steps(), 100, overflow)
        reader.feed(b"x")
        self.assertEqual(seen, [])
        state["ready"] = True
        reader.pump()
        self.assertEqual(seen, [None, b"x"])

    def test_overflow(self) -> None:
        """
        When more than the limit stays unconsumed, feed raises the
        overflow failure.
        """

        def steps() -> Steps:
            yield 100

        reader = StepReader(steps(), 4, overflow)
        reader.feed(b"1234")
        failure = self.assertRaises(GuardFailure, reader.feed, b"5")
        self.assertEqual((failure.error.code, failure.reason), (ErrorCode.BAD_REQUEST, "overflow"))

    def test_bad_yield(self) -> None:
        """
        When a generator yields something that is not a need, TypeError
        is raised.
        """

        def steps() -> Steps:
            yield "three"  # type: ignore[misc]

        reader = StepReader(steps(), 100, overflow)
        self.assertRaises(TypeError, reader.pump)

    def test_close(self) -> None:
        """
        When a reader is closed, its generator is closed where it waited,
        what was buffered is dropped and nothing more is parsed.
        """
        seen: List[bytes] = []
        closed: List[bool] = []

        def steps() -> Steps:
            try:
                while True:
                    seen.append((yield 2))
            finally:
                closed.append(True)

        reader = StepReader(steps(), 100, overflow)
        reader.feed(b"abc")
        self.assertEqual((seen, closed), ([b"ab"], []))
        reader.close()
        self.assertEqual(closed, [True])
        self.assertTrue(reader.done)
        self.assertEqual(reader.take_rest(), b"", "what was buffered is dropped")
        reader.feed(b"de")
        self.assertEqual(seen, [b"ab"], "nothing more is parsed")


class Knock(TwoSidedGuard):
    """
    A toy guard: the browser's 2-byte knock goes to the VM once it is
    connected; the VM answers one byte, 0 to let the browser in.
    """

    protocol_name = "knock"

    def __init__(self, sink: Optional[object]):
        self._connected = False
        self._knock = b""
        super().__init__(sink, 8, 8)

    def start(self) -> List[Output]:
        return self._run(self._client.pump)

    def client_data(self, data: bytes) -> List[Output]:
        return self._run(self._client.feed, data)

    def server_connected(self) -> List[Output]:
        self._connected = True
        return self._run(self._server.pump)

    def server_data(self, data: bytes) -> List[Output]:
        return self._run(self._server.feed, data)

    def _client_steps(self) -> Steps:
        self._knock = yield 2

    def _server_steps(self) -> Steps:
        emit = self._out.emit
        yield lambda: self._connected and self._client.done
        emit(SendToServer(self._knock))
        answer = yield 1
        if answer != b"\x00":
            raise server_failure("VM said %r" % (answer,))
        emit(SendToClient(b"welcome"))
        emit(Established())


class TwoSidedGuardTests(SynchronousTestCase):
    """
    L{TwoSidedGuard}: one step, both sides pumped, outputs handed out.
    """

    def test_playbook(self) -> None:
        """
        When the browser knocks and the VM lets it in, each input hands out
        what it unblocked, on either side, in one piece or byte at a time.
        """
        book = Playbook(lambda: Knock(None))
        book >> Start() >> ClientData(b"hi") >> ServerConnected() << SendToServer(b"hi")
        book >> ServerData(b"\x00") << SendToClient(b"welcome") << Established()
        book >> ClientData(b"late") >> ServerData(b"late")
        assert_plays(self, book)

    def test_failure_is_one_failed(self) -> None:
        """
        When a step raises GuardFailure, the input hands out one Failed and
        later inputs hand out nothing.
        """
        book = Playbook(lambda: Knock(None))
        book >> ServerConnected() >> ClientData(b"hi") << SendToServer(b"hi")
        book >> ServerData(b"\x01") << Failed(ConsoleError(ErrorCode.CONNECTION_FAILED), "VM said b'\\x01'")
        book >> ServerData(b"\x00")
        assert_plays(self, book)

    def test_overflow_is_failed(self) -> None:
        """
        When a side sends more than its limit unconsumed, the guard fails
        with that side's error.
        """
        guard = Knock(None)
        self.assertEqual(
            guard.client_data(b"x" * 11),
            [Failed(ConsoleError(ErrorCode.BAD_REQUEST), "client sent too much during the handshake")],
        )
        guard = Knock(None)
        self.assertEqual(
            guard.server_data(b"x" * 9),
            [Failed(ConsoleError(ErrorCode.CONNECTION_FAILED), "server sent too much during the handshake")],
        )

    def test_sink_gets_what_is_returned(self) -> None:
        """
        When the guard has a sink, each input also delivers exactly the
        outputs it returns, as sink calls.
        """
        sink = RecordingSink()
        guard = Knock(sink)
        returned = guard.client_data(b"hi") + guard.server_connected() + guard.server_data(b"\x00")
        replay = RecordingSink()
        for output in returned:
            deliver(replay, output)
        self.assertEqual(sink.calls, replay.calls)
        self.assertEqual(sink.names(), ["established"])

    def test_coalesced(self) -> None:
        """
        When adjacent data outputs of one kind are coalesced, they join;
        other outputs keep them apart.
        """
        self.assertEqual(
            coalesced([SendToClient(b"a"), SendToClient(b"b"), Established(), SendToClient(b"c"), SendToServer(b"d")]),
            [SendToClient(b"ab"), Established(), SendToClient(b"c"), SendToServer(b"d")],
        )
