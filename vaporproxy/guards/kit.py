"""
What every protocol guard is made of: the incremental parser
(L{StepReader}), the typed outputs, the queue that hands them out, and the
two-sided guard base (L{TwoSidedGuard}).

A guard is sans-IO.  Inputs are method calls: C{start()}, C{client_data(bytes)},
C{server_connected()}, C{server_data(bytes)} and, for RFB, C{server_lost(reason)}.
What the guard decides comes out as frozen values::

    SendToClient(data)  SendToServer(data)  StartTLS(creator)  Admit(is_main)
    SpiceSessionAssigned(session_id)  Established()  Failed(error, reason)

B{Every input method returns the list of outputs it handed out, in order.}
A guard built with C{sink=None} only returns them (playbook tests, a session
state machine).  A guard built with a sink (the bridge today) also delivers
each one, as it is handed out, to the sink method that stands for it
(L{deliver}, L{SINK_METHODS}: C{send_to_client}, C{send_to_server},
C{start_tls}, C{admit}, C{spice_session}, C{established}, C{fail}).

Outputs are queued while a parsing step runs and handed out after it, so a
sink that calls back into the guard never re-enters a running generator:
what the inner call produces is handed out by the outer one (and the inner
call returns C{[]}).  Nothing is handed out after L{Failed}; once L{Failed}
or L{Established} is handed out, inputs produce nothing.

L{StepReader} runs a parsing generator: it yields how many bytes it needs
next (or a condition to wait for) and gets those bytes back, so any
fragmentation of the input, down to one byte at a time, is handled in one
place.  It is on every console's set-up path: no per-byte work.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Generator, List, Optional, Tuple, Type, Union

from twisted.logger import Logger

from vaporproxy.errors import ConsoleError, ErrorCode

# The namespace the guards' log lines have always had.
log = Logger(namespace="vaporproxy.rfb")

AUTH_FAILED = "console authentication failed"


# ---------------------------------------------------------------------------
# Typed outputs
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendToClient:
    """Write C{data} to the browser."""

    data: bytes


@dataclass(frozen=True, slots=True)
class SendToServer:
    """Write C{data} to the VM (held by the caller until the VM is connected)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class StartTLS:
    """VeNCrypt: start TLS on the VM connection with this connection creator."""

    creator: Any


@dataclass(frozen=True, slots=True)
class Admit:
    """SPICE: the link message is acceptable; take a slot and dial the VM."""

    is_main: bool


@dataclass(frozen=True, slots=True)
class SpiceSessionAssigned:
    """SPICE main channel: the VM gave the console this session id."""

    session_id: int


@dataclass(frozen=True, slots=True)
class Established:
    """The handshake is over and everything received was forwarded: relay raw bytes."""


@dataclass(frozen=True, slots=True, eq=False)
class Failed:
    """
    End the console with C{error} (client-safe); C{reason} is log-only.

    Two are equal when their error codes, messages and reasons are (a
    L{ConsoleError} itself compares by identity).
    """

    error: ConsoleError
    reason: str

    def _key(self) -> Tuple[ErrorCode, str, str]:
        return self.error.code, self.error.message, self.reason

    def __eq__(self, other: object) -> bool:
        if type(other) is not Failed:
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


Output = Union[SendToClient, SendToServer, StartTLS, Admit, SpiceSessionAssigned, Established, Failed]

#: The legacy sink method that stands for each output.
SINK_METHODS: Dict[Type[Any], str] = {
    SendToClient: "send_to_client",
    SendToServer: "send_to_server",
    StartTLS: "start_tls",
    Admit: "admit",
    SpiceSessionAssigned: "spice_session",
    Established: "established",
    Failed: "fail",
}

_DELIVERY: Dict[Type[Any], Callable[[Any, Any], None]] = {
    SendToClient: lambda sink, o: sink.send_to_client(o.data),
    SendToServer: lambda sink, o: sink.send_to_server(o.data),
    StartTLS: lambda sink, o: sink.start_tls(o.creator),
    Admit: lambda sink, o: sink.admit(o.is_main),
    SpiceSessionAssigned: lambda sink, o: sink.spice_session(o.session_id),
    Established: lambda sink, o: sink.established(),
    Failed: lambda sink, o: sink.fail(o.error, o.reason),
}


def deliver(sink: Any, output: Output) -> None:
    """
    Make the sink call that stands for C{output} (L{SINK_METHODS}), e.g.
    C{SendToClient(b)} becomes C{sink.send_to_client(b)}.
    """
    _DELIVERY[type(output)](sink, output)


class OutputQueue:
    """
    A guard's outputs, queued while a parsing step runs (L{emit}) and handed
    out after it (L{hand_out}), to the sink when there is one.

    @ivar failed: whether L{Failed} was handed out.
    @ivar finished: whether L{Established} was handed out.
    """

    def __init__(self, sink: Optional[object]):
        self._sink = sink
        self._pending: Deque[Output] = deque()
        #: Queue one output (the deque's own C{append}: no Python call).
        self.emit: Callable[[Output], None] = self._pending.append
        self._handing_out = False
        self.failed = False
        self.finished = False

    def hand_out(self) -> List[Output]:
        """
        Hand out what is queued, in order, delivering each to the sink.

        @return: what was handed out; C{[]} when called from inside a sink
            call (the outer call hands it out).
        """
        pending = self._pending
        if not pending or self._handing_out or self.failed:
            return []
        sink = self._sink
        handed: List[Output] = []
        self._handing_out = True
        try:
            while pending:
                output = pending.popleft()
                handed.append(output)
                kind = type(output)
                # The data outputs first: they are most of a handshake.
                if kind is SendToClient:
                    if sink is not None:
                        sink.send_to_client(output.data)  # type: ignore[attr-defined, union-attr]
                elif kind is SendToServer:
                    if sink is not None:
                        sink.send_to_server(output.data)  # type: ignore[attr-defined, union-attr]
                else:
                    if kind is Failed:
                        self.failed = True
                        pending.clear()
                    elif kind is Established:
                        self.finished = True
                    if sink is not None:
                        _DELIVERY[kind](sink, output)
                    if self.failed:
                        break
        finally:
            self._handing_out = False
        return handed


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------


class UpTo:
    """
    What a parsing step yields to get whatever is buffered, between 1 and
    C{n} bytes, as soon as at least one byte is there.
    """

    def __init__(self, n: int):
        if n < 1:
            raise ValueError("UpTo needs a positive count")
        self.n = n


#: What a parsing step may ask for: exactly a byte count, up to a byte count
#: (L{UpTo}), or a condition to wait for.
Need = Union[int, UpTo, Callable[[], bool]]
Steps = Generator[Need, Optional[bytes], None]


class GuardFailure(Exception):
    """
    Raised inside a parsing step to end the handshake with an error.

    @ivar error: the client-safe L{ConsoleError}.
    @ivar reason: a log-only description.
    """

    def __init__(self, error: ConsoleError, reason: str):
        super().__init__(error, reason)
        self.error = error
        self.reason = reason


def client_failure(reason: str) -> GuardFailure:
    """
    A handshake failure the browser caused: BAD_REQUEST, C{reason} logged.
    """
    return GuardFailure(ConsoleError(ErrorCode.BAD_REQUEST), reason)


def server_failure(reason: str) -> GuardFailure:
    """
    A handshake failure the VM caused: CONNECTION_FAILED, C{reason} logged.
    """
    return GuardFailure(ConsoleError(ErrorCode.CONNECTION_FAILED), reason)


class StepReader:
    """
    Feeds bytes to a parsing generator.

    The generator yields an C{int} (give me exactly that many bytes), an
    L{UpTo} (give me what you have, at most that many) or a callable (resume
    me, with C{None}, once this returns true).  Bytes that
    arrive beyond what the generator asked for stay buffered, up to
    C{limit}; L{take_rest} hands them out.

    @ivar done: whether the generator has finished.
    """

    def __init__(self, steps: Steps, limit: int, overflow: Callable[[], GuardFailure]):
        self._steps = steps
        self._limit = limit
        self._overflow = overflow
        self._buffer = bytearray()
        self.done = False
        self._need: Need = 0
        self._advance(None)

    def _advance(self, value: Optional[bytes]) -> None:
        try:
            self._need = self._steps.send(value)
        except StopIteration:
            self.done = True
            # The last wait condition may be a closure over the guard.
            self._need = 0

    def feed(self, data: bytes) -> None:
        """
        Add C{data} and run the generator as far as it can go.

        @raise GuardFailure: from the generator, or when what it left
            unconsumed is more than the limit.
        """
        self._buffer += data
        self.pump()
        if len(self._buffer) > self._limit:
            raise self._overflow()

    def pump(self) -> None:
        """
        Run the generator as far as the buffered bytes and its wait
        conditions allow.
        """
        buffer = self._buffer
        while not self.done:
            need = self._need
            if type(need) is int:
                # The common step: exactly that many bytes.
                if len(buffer) < need:
                    return
                chunk = bytes(buffer[:need])
                del buffer[:need]
                self._advance(chunk)
            elif isinstance(need, UpTo):
                if not buffer:
                    return
                chunk = bytes(buffer[: need.n])
                del buffer[: need.n]
                self._advance(chunk)
            elif callable(need):
                if not need():
                    return
                self._advance(None)
            else:
                raise TypeError(f"a handshake step yielded {need!r}")

    def close(self) -> None:
        """
        Stop: the generator is closed where it waits (its frame, which
        refers to the guard, is freed with it) and nothing more is read.
        """
        self.done = True
        self._need = 0
        self._buffer.clear()
        self._steps.close()

    def take_rest(self) -> bytes:
        """
        Remove and return the bytes buffered beyond what was consumed.
        """
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest

    def buffered(self) -> int:
        """
        How many unconsumed bytes are buffered.
        """
        return len(self._buffer)


# ---------------------------------------------------------------------------
# The two-sided guard
# ---------------------------------------------------------------------------


class TwoSidedGuard:
    """
    What the RFB and SPICE guards share: a L{StepReader} per side (the
    subclass's C{_client_steps()} and C{_server_steps()} generators, started
    in that order), an L{OutputQueue} (C{_out}), how one step is run, and
    C{close}.

    A subclass sets the attributes its generators read, then calls
    C{TwoSidedGuard.__init__}.
    """

    #: Names the protocol in the debug line of a failed handshake.
    protocol_name = ""

    def __init__(self, sink: Optional[object], client_limit: int, server_limit: int):
        self._out = OutputQueue(sink)
        self._client = StepReader(
            self._client_steps(),
            client_limit,
            lambda: client_failure("client sent too much during the handshake"),
        )
        self._server = StepReader(
            self._server_steps(),
            server_limit,
            lambda: server_failure("server sent too much during the handshake"),
        )

    def _client_steps(self) -> Steps:
        raise NotImplementedError

    def _server_steps(self) -> Steps:
        raise NotImplementedError

    def _run(self, step: Callable[..., None], *args: Any) -> List[Output]:
        """
        Run C{step(*args)}, let both sides go as far as that allows (a step
        on one side may unblock the other), then hand out the queued
        outputs; a L{GuardFailure} becomes the one L{Failed}.
        """
        out = self._out
        if out.failed or out.finished:
            return []
        try:
            step(*args)
            self._client.pump()
            self._server.pump()
        except GuardFailure as failure:
            log.debug("{protocol} handshake failed: {reason}", protocol=self.protocol_name, reason=failure.reason)
            out.emit(Failed(failure.error, failure.reason))
        return out.hand_out()

    def close(self) -> None:
        """
        The caller is done with this guard (the handshake is over, failed,
        or the console ended): both parsers stop where they are, so the
        guard and its suspended generators, which refer to each other,
        are freed at once rather than by the cyclic garbage collector.
        """
        self._client.close()
        self._server.close()
