"""
One console as one I/O-free state machine (DESIGN.md rule 3, issue #8).

Typed inputs in (what happened), typed outputs out (what to do), both in
L{vaporproxy.console.events}; no sockets, no reactor, no Deferreds.  This
machine is the console's lifecycle: the console WebSocket
(L{vaporproxy.ws.channel}) is its adapter, turning Autobahn's, the
stores', the VM connection's, the guard's and the timers' events into
inputs, and executing the outputs (L{vaporproxy.ws.effects}).  The
playbooks in C{tests/console/test_session.py} prove it.

States, each with only the data it needs::

    SettingUp (redeeming -> locating -> admitting)
      -> Handshaking (the guard is the only stage)
      -> Relaying (the console's pipeline)
      -> Closing (close sent, waiting for the browser)
      -> Ended

A channel is the console's owner (it holds the lease: a VNC WebSocket, a
SPICE main channel), a SPICE channel that joined its console here
(C{JOINED}: no lease, no outcome of its own), or a SPICE channel whose main
channel is in another process (C{REMOTE}: it stands for the console here).

Every way out goes through L{Session._finish}: exactly one
L{RecordOutcome} (L{LeaveConsole} for a joined channel), and exactly one
L{ReleaseLease} for a lease ever granted, late grants included (a lease
granted after the console ended is released at once: late arrivals are
transitions, not checks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Union

from vaporproxy.console.events import (
    CONSOLE_OPENED, FORGET_LOCATED, LEAVE_CONSOLE, MAX_SPICE_CHANNELS, PAUSE_READING, REGISTER,
    REQUIRE_TLS_MESSAGE, START_GUARD, STOP_IO, Acquire, Admitted, BackendConnected, BackendFailed, BackendLost,
    CheckHost, ClientClosed, CloseClient, Dial, DropBackend, GuardAdmit, GuardCrashed, GuardEstablished, GuardFailed,
    GuardRefused, Input, JoinConsole, Locate, Located, Opened, Output, OwnerEnded, PolicyViolated, ProtocolError,
    RecordOutcome, Redeem, Redeemed, ReleaseLease, Revoked, SHARE_REVOKED, SetupFailed, SetupOverflow, Shutdown,
    SplicePipeline, StartIdleTimer, Terminate, TextMessage, TimerFired, Unredeem, UseBackend, VmFound,
)  # fmt: skip
from vaporproxy.errors import CLOSE_GOING_AWAY, ConsoleError, ErrorCode

__all__ = ["JOINED", "OWNER", "REMOTE", "Session"]

#: The roles of a channel in its console (see the module's docstring).
OWNER = "owner"
JOINED = "joined"
REMOTE = "remote"

_POLICY_MESSAGES = {
    "browser": "Message not allowed on this console",
    "VM": "The VM sent what the console's policy cannot pass",
}


# -- states -------------------------------------------------------------------


@dataclass(slots=True)
class SettingUp:
    token: Optional[str] = None
    redemption: Any = None
    target: Any = None
    guard_started: bool = False
    opened: bool = False


@dataclass(slots=True)
class Handshaking:
    redemption: Any
    lease: Any
    role: str = OWNER
    backend: bool = False


@dataclass(slots=True)
class Relaying:
    redemption: Any
    lease: Any
    role: str = OWNER


@dataclass(slots=True)
class Closing:
    pass


@dataclass(slots=True)
class Ended:
    pass


State = Union[SettingUp, Handshaking, Relaying, Closing, Ended]

# Closing and Ended hold nothing: one instance each serves every console.
CLOSING = Closing()
ENDED = Ended()
Outputs = List[Output]


class Session:
    """
    One console's lifecycle; L{handle} takes an input, answers outputs.

    @ivar live: C{False} once the console ended (L{Closing}, L{Ended}).
    """

    __slots__ = ("idle_timeout", "state", "live")

    def __init__(self, idle_timeout: float = 0.0):
        self.idle_timeout = idle_timeout
        self.state: State = SettingUp()
        self.live = True

    def handle(self, event: Input) -> Outputs:
        state = self.state
        handler = _HANDLERS[type(state)].get(type(event))
        if handler is not None:
            return handler(self, state, event)
        if not self.live:
            return self._late(event)
        return self._any(state, event)

    # -- setting up -------------------------------------------------------

    def _opened(self, state: SettingUp, event: Opened) -> Outputs:
        state.opened = True
        if not event.tls_ok:
            # The token is not even redeemed.
            return self._finish(ConsoleError(ErrorCode.UNAUTHORIZED, REQUIRE_TLS_MESSAGE), "setup failed: UNAUTHORIZED")
        if not event.token:
            return self._finish(ConsoleError(ErrorCode.INVALID_TOKEN), "setup failed: INVALID_TOKEN")
        state.token = event.token
        return [Redeem(event.token)]

    def _redeemed(self, state: SettingUp, event: Redeemed) -> Outputs:
        state.redemption = event.redemption
        return [Locate(event.redemption)]

    def _vm_found(self, state: SettingUp, event: VmFound) -> Outputs:
        return [CheckHost(event.vm)]

    def _located(self, state: SettingUp, event: Located) -> Outputs:
        state.target = event.target
        if event.spice:
            # SPICE: the guard reads the link message, then says admit.
            state.guard_started = True
            return [START_GUARD]
        return [Acquire(state.redemption.grant.vm_uuid)]

    def _guard_admit(self, state: SettingUp, event: GuardAdmit) -> Outputs:
        if state.target is None or not state.guard_started:
            return []
        redemption = state.redemption
        if event.is_main != redemption.first:
            # A second main channel, or a first use that is not main.
            error = ConsoleError(ErrorCode.TOKEN_ALREADY_USED)
            return self._finish(error, "spice channel does not match the token's use")
        if redemption.grant.mode == "view" and event.inputs_channel:
            error = ConsoleError(ErrorCode.UNAUTHORIZED, "A view-only console has no input channel")
            return self._finish(error, "view-only console: inputs channel refused")
        if event.is_main:
            return [PAUSE_READING, Acquire(redemption.grant.vm_uuid)]
        if event.channels >= MAX_SPICE_CHANNELS:
            error = ConsoleError(ErrorCode.MAX_CONNECTIONS_REACHED, "Too many channels for this console")
            return self._finish(error, f"spice console already has {MAX_SPICE_CHANNELS} channels")
        self.state = Handshaking(redemption, None, JOINED if event.console_here else REMOTE)
        return [PAUSE_READING, JoinConsole(event.console_here), Dial(state.target)]

    def _admitted(self, state: SettingUp, event: Admitted) -> Outputs:
        self.state = Handshaking(state.redemption, event.lease)
        if state.guard_started:
            return [REGISTER, Dial(state.target)]
        return [REGISTER, START_GUARD, Dial(state.target)]

    def _setup_failed(self, state: SettingUp, event: SetupFailed) -> Outputs:
        out: Outputs = []
        spent = state.redemption is not None and state.redemption.first
        if event.error.code is ErrorCode.MAX_CONNECTIONS_REACHED and spent and state.token:
            # A console refused for lack of a slot does not spend its token.
            out.append(Unredeem(state.token))
        return out + self._finish(event.error, event.reason or f"setup failed: {event.error.code.name}")

    # -- handshaking ------------------------------------------------------

    def _backend_connected(self, state: Handshaking, event: BackendConnected) -> Outputs:
        state.backend = True
        return [UseBackend(event.backend)]

    def _backend_failed(self, state: Handshaking, event: BackendFailed) -> Outputs:
        reason = f"backend connect failed: {event.detail}" if event.detail else "backend connect failed"
        return self._finish(ConsoleError(ErrorCode.CONNECTION_FAILED), reason)

    def _lost_in_handshake(self, state: Handshaking, event: BackendLost) -> Outputs:
        return self._finish(ConsoleError(ErrorCode.CONNECTION_FAILED), "backend closed during handshake")

    def _established(self, state: Handshaking, event: GuardEstablished) -> Outputs:
        if not state.backend:
            return []
        self.state = Relaying(state.redemption, state.lease, state.role)
        out: Outputs = [SplicePipeline(event.client_rest)]
        if state.role is not JOINED and self.idle_timeout > 0:
            out.append(StartIdleTimer(self.idle_timeout))
        if state.role is OWNER:
            out.append(CONSOLE_OPENED)
        return out

    # -- relaying ---------------------------------------------------------

    def _lost_while_relaying(self, state: Relaying, event: BackendLost) -> Outputs:
        return self._finish(None, "backend closed", 1000)

    def _timer_while_relaying(self, state: Relaying, event: TimerFired) -> Outputs:
        if event.which != "idle":
            return []  # the connection timer is moot once relaying
        if event.silent >= self.idle_timeout:
            return self._finish(ConsoleError(ErrorCode.IDLE_TIMEOUT), "idle timeout")
        return [StartIdleTimer(self.idle_timeout - event.silent)]

    def _relaying_ignores(self, state: Relaying, event: Input) -> Outputs:
        return []  # e.g. the setup buffer: moot once relaying

    # -- closing and ended: late arrivals ----------------------------------

    def _client_closed_at_last(self, state: Closing, event: ClientClosed) -> Outputs:
        self.state = ENDED
        return []

    def _late(self, event: Input) -> Outputs:
        if type(event) is Admitted:
            return [ReleaseLease(event.lease)]  # granted after the end: given back at once
        if type(event) is BackendConnected:
            return [DropBackend(event.backend)]
        return []

    # -- inputs valid in any live state ------------------------------------

    def _any(self, state: State, event: Input) -> Outputs:
        kind = type(event)
        end = _ENDINGS.get(kind)
        if end is not None:
            return end(self, state, event)
        if kind is TimerFired and event.which == "connect":  # type: ignore[union-attr]
            return self._finish(ConsoleError(ErrorCode.CONNECTION_FAILED), "connection timeout")
        return []  # an input this state does not expect changes nothing

    def _client_closed(self, state: State, event: ClientClosed) -> Outputs:
        if isinstance(state, SettingUp) and not state.opened:
            return self._finish(None, "websocket handshake not completed", closed=True)
        return self._finish(None, f"client closed (code {event.code})", closed=True)

    def _text(self, state: State, event: TextMessage) -> Outputs:
        return self._finish(ConsoleError(ErrorCode.BAD_REQUEST, "Console streams are binary"), "text message")

    def _protocol_error(self, state: State, event: ProtocolError) -> Outputs:
        return self._finish(None, f"websocket protocol error: {event.reason}", event.code)

    def _overflow(self, state: State, event: SetupOverflow) -> Outputs:
        error = ConsoleError(ErrorCode.BAD_REQUEST, "Too much data before the console was ready")
        return self._finish(error, "setup buffer overflow")

    def _policy(self, state: State, event: PolicyViolated) -> Outputs:
        error = ConsoleError(ErrorCode.BAD_REQUEST, _POLICY_MESSAGES.get(event.side, _POLICY_MESSAGES["VM"]))
        return self._finish(error, f"policy, from the {event.side}: {event.detail}")

    def _owner_ended(self, state: State, event: OwnerEnded) -> Outputs:
        return self._finish(event.error, f"console ended: {event.reason}", event.code or 1000)

    def _terminate(self, state: State, event: Terminate) -> Outputs:
        return self._finish(ConsoleError(ErrorCode.SESSION_TERMINATED, event.message), "terminated")

    def _shutdown(self, state: State, event: Shutdown) -> Outputs:
        return self._finish(None, "shutdown", CLOSE_GOING_AWAY)

    def _revoked(self, state: State, event: Revoked) -> Outputs:
        reason = "revoked: share link" if event.message == SHARE_REVOKED else "revoked"
        return self._finish(ConsoleError(ErrorCode.SESSION_TERMINATED, event.message), reason)

    def _failed(self, state: State, event: SetupFailed) -> Outputs:
        return self._finish(event.error, event.reason or f"setup failed: {event.error.code.name}")

    def _guard_failed(self, state: State, event: GuardFailed) -> Outputs:
        return self._finish(event.error, f"guard: {event.reason}", forget=True)

    def _guard_refused(self, state: State, event: GuardRefused) -> Outputs:
        return self._finish(event.error, f"guard refused: {event.error.code.name}", forget=True)

    def _guard_crashed(self, state: State, event: GuardCrashed) -> Outputs:
        return self._finish(ConsoleError(ErrorCode.INTERNAL_ERROR), "guard error")

    # -- the one way out ---------------------------------------------------

    def _finish(
        self, error: Optional[ConsoleError], reason: str, code: Optional[int] = None, closed: bool = False,
        forget: bool = False,
    ) -> Outputs:  # fmt: skip
        """
        Stop everything, give the lease back, record the outcome (or leave
        the joined console), close the browser's side (unless it closed
        first).  A VM that did not answer as located is looked up afresh
        next time.
        """
        state = self.state
        out: Outputs = []
        if forget or (error is not None and error.code is ErrorCode.CONNECTION_FAILED):
            out.append(FORGET_LOCATED)
        out.append(STOP_IO)
        joined = False
        if type(state) is Handshaking or type(state) is Relaying:
            if state.lease is not None:  # type: ignore[union-attr]
                out.append(ReleaseLease(state.lease))  # type: ignore[union-attr]
            joined = state.role is JOINED  # type: ignore[union-attr]
        out.append(LEAVE_CONSOLE if joined else RecordOutcome(error, reason, code))
        self.live = False
        if closed:
            self.state = ENDED
        else:
            out.append(CloseClient(error, code))
            self.state = CLOSING
        return out


Handler = Callable[[Session, Any, Any], Outputs]

#: The transitions each state defines; the rest go to L{Session._any}
#: (live states) or L{Session._late}.
_HANDLERS: Dict[type, Dict[type, Handler]] = {
    SettingUp: {
        Opened: Session._opened,
        Redeemed: Session._redeemed,
        VmFound: Session._vm_found,
        Located: Session._located,
        GuardAdmit: Session._guard_admit,
        Admitted: Session._admitted,
        SetupFailed: Session._setup_failed,
    },
    Handshaking: {
        BackendConnected: Session._backend_connected,
        BackendFailed: Session._backend_failed,
        BackendLost: Session._lost_in_handshake,
        GuardEstablished: Session._established,
    },
    Relaying: {
        BackendLost: Session._lost_while_relaying,
        TimerFired: Session._timer_while_relaying,
        SetupOverflow: Session._relaying_ignores,
    },
    Closing: {ClientClosed: Session._client_closed_at_last},
    Ended: {},
}

#: The inputs that end a console in any live state.
_ENDINGS: Dict[type, Handler] = {
    ClientClosed: Session._client_closed,
    TextMessage: Session._text,
    ProtocolError: Session._protocol_error,
    SetupOverflow: Session._overflow,
    PolicyViolated: Session._policy,
    OwnerEnded: Session._owner_ended,
    Terminate: Session._terminate,
    Shutdown: Session._shutdown,
    Revoked: Session._revoked,
    SetupFailed: Session._failed,
    GuardFailed: Session._guard_failed,
    GuardRefused: Session._guard_refused,
    GuardCrashed: Session._guard_crashed,
}
