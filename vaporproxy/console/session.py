"""
One console as one I/O-free state machine (DESIGN.md rule 4, issue #8).

Typed inputs in (what happened), typed outputs out (what to do); no
sockets, no reactor, no Deferreds.  The adapter (the console WebSocket)
is to turn events into inputs and execute the outputs; today the channel
(L{vaporproxy.ws.channel}) still runs the same lifecycle itself, and this
machine is its specification, proven by the playbooks in
C{tests/console/test_session.py} (issue #8: the wiring is what is left).

States, each with only the data it needs::

    SettingUp (redeeming -> locating -> admitting)
      -> Handshaking (the guard is the only stage)
      -> Relaying (the console's pipeline)
      -> Closing (close sent, waiting for the browser)
      -> Ended

Every way out goes through L{Session._finish}: exactly one
L{RecordOutcome}, and exactly one L{ReleaseLease} for a lease ever
granted, late grants included (a lease granted after the console ended is
released at once: late arrivals are transitions, not checks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Union

from vaporproxy.errors import CLOSE_GOING_AWAY, ConsoleError, ErrorCode

__all__ = ["Session"]


# -- inputs -------------------------------------------------------------------


@dataclass(frozen=True)
class Opened:
    """The WebSocket opened; C{tls_ok}: TLS is not required or is there."""

    token: Optional[str]
    tls_ok: bool = True


@dataclass(frozen=True)
class Redeemed:
    redemption: Any


@dataclass(frozen=True)
class Located:
    """
    The VM's console was found and its host allowed: dial C{target}.
    C{spice}: the guard reads the link message before admission.
    """

    target: Any
    spice: bool = False


@dataclass(frozen=True)
class GuardAdmit:
    """SPICE: the link message was read; C{is_main}: the main channel."""

    is_main: bool


@dataclass(frozen=True)
class Admitted:
    lease: Any


@dataclass(frozen=True)
class SetupFailed:
    """A set-up step failed (token, VM, host, limit, store): C{error}."""

    error: ConsoleError


@dataclass(frozen=True)
class BackendConnected:
    pass


@dataclass(frozen=True)
class BackendFailed:
    pass


@dataclass(frozen=True)
class BackendLost:
    pass


@dataclass(frozen=True)
class GuardEstablished:
    pass


@dataclass(frozen=True)
class GuardFailed:
    error: ConsoleError
    reason: str


@dataclass(frozen=True)
class ClientClosed:
    code: Optional[int]


@dataclass(frozen=True)
class TimerFired:
    """C{which}: "connect" or "idle"; C{silent}: seconds since last traffic."""

    which: str
    silent: float = 0.0


@dataclass(frozen=True)
class Terminate:
    pass


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class PolicyRevoked:
    pass


@dataclass(frozen=True)
class TextMessage:
    """The browser sent a text message: console streams are binary."""


@dataclass(frozen=True)
class ProtocolError:
    """The browser broke WebSocket framing (1002) or a size cap (1009)."""

    code: int
    reason: str


@dataclass(frozen=True)
class SetupOverflow:
    """The browser sent more than C{buffer_size} before the guard existed."""


@dataclass(frozen=True)
class OwnerEnded:
    """SPICE: the console this channel joined ended (its main channel)."""

    error: Optional[ConsoleError]
    reason: str
    code: Optional[int]


Input = Union[
    Opened, Redeemed, Located, GuardAdmit, Admitted, SetupFailed, BackendConnected, BackendFailed, BackendLost,
    GuardEstablished, GuardFailed, ClientClosed, TimerFired, Terminate, Shutdown, PolicyRevoked,
    TextMessage, ProtocolError, SetupOverflow, OwnerEnded,
]  # fmt: skip


# -- outputs ------------------------------------------------------------------


@dataclass(frozen=True)
class Redeem:
    token: str


@dataclass(frozen=True)
class Locate:
    redemption: Any


@dataclass(frozen=True)
class Acquire:
    vm_uuid: str


@dataclass(frozen=True)
class Unredeem:
    token: str


@dataclass(frozen=True)
class StartGuard:
    pass


@dataclass(frozen=True)
class Dial:
    target: Any


@dataclass(frozen=True)
class JoinConsole:
    """SPICE: a later channel joins its console (no lease of its own)."""


@dataclass(frozen=True)
class SplicePipeline:
    pass


@dataclass(frozen=True)
class StartIdleTimer:
    delay: float


@dataclass(frozen=True)
class StopBackend:
    pass


@dataclass(frozen=True)
class CloseClient:
    """Send C{error} (JSON then its 4000+n code) or, without one, C{code}."""

    error: Optional[ConsoleError]
    code: Optional[int]


@dataclass(frozen=True)
class RecordOutcome:
    error: Optional[str]
    reason: str


@dataclass(frozen=True)
class ReleaseLease:
    lease: Any


Output = Union[
    Redeem, Locate, Acquire, Unredeem, StartGuard, JoinConsole, Dial, SplicePipeline, StartIdleTimer, StopBackend,
    CloseClient, RecordOutcome, ReleaseLease,
]  # fmt: skip


# -- states -------------------------------------------------------------------


@dataclass
class SettingUp:
    token: Optional[str] = None
    redemption: Any = None
    target: Any = None
    guard_started: bool = False
    opened: bool = False


@dataclass
class Handshaking:
    redemption: Any
    lease: Any
    backend: bool = False


@dataclass
class Relaying:
    redemption: Any
    lease: Any


@dataclass
class Closing:
    pass


@dataclass
class Ended:
    pass


State = Union[SettingUp, Handshaking, Relaying, Closing, Ended]


class Session:
    """
    One console's lifecycle; L{handle} takes an input, answers outputs.
    """

    def __init__(self, idle_timeout: float = 0.0):
        self.idle_timeout = idle_timeout
        self.state: State = SettingUp()

    def handle(self, event: Input) -> List[Output]:
        state = self.state
        handler = getattr(self, f"_{type(state).__name__}_{type(event).__name__}", None)
        if handler is not None:
            return handler(state, event)
        return self._any(state, event)

    # -- setting up -------------------------------------------------------

    def _SettingUp_Opened(self, state: SettingUp, event: Opened) -> List[Output]:
        state.opened = True
        if not event.tls_ok:
            return self._finish(ConsoleError(ErrorCode.UNAUTHORIZED), "console connections require TLS")
        if not event.token:
            return self._finish(ConsoleError(ErrorCode.INVALID_TOKEN), "setup failed: INVALID_TOKEN")
        state.token = event.token
        return [Redeem(event.token)]

    def _SettingUp_Redeemed(self, state: SettingUp, event: Redeemed) -> List[Output]:
        state.redemption = event.redemption
        return [Locate(event.redemption)]

    def _SettingUp_Located(self, state: SettingUp, event: Located) -> List[Output]:
        state.target = event.target
        if event.spice:
            # SPICE: the guard reads the link message, then says admit.
            state.guard_started = True
            return [StartGuard()]
        return [Acquire(state.redemption.grant.vm_uuid)]

    def _SettingUp_GuardAdmit(self, state: SettingUp, event: GuardAdmit) -> List[Output]:
        if state.target is None or not state.guard_started:
            return []
        if event.is_main != state.redemption.first:
            # A second main channel, or a first use that is not main.
            error = ConsoleError(ErrorCode.TOKEN_ALREADY_USED)
            return self._finish(error, "spice channel does not match the token's use")
        if event.is_main:
            return [Acquire(state.redemption.grant.vm_uuid)]
        self.state = Handshaking(state.redemption, None)
        return [JoinConsole(), Dial(state.target)]

    def _SettingUp_Admitted(self, state: SettingUp, event: Admitted) -> List[Output]:
        self.state = Handshaking(state.redemption, event.lease)
        start: List[Output] = [] if state.guard_started else [StartGuard()]
        return start + [Dial(state.target)]

    def _SettingUp_SetupFailed(self, state: SettingUp, event: SetupFailed) -> List[Output]:
        out: List[Output] = []
        spent = state.redemption is not None and state.redemption.first
        if event.error.code is ErrorCode.MAX_CONNECTIONS_REACHED and spent and state.token:
            # A console refused for lack of a slot does not spend its token.
            out.append(Unredeem(state.token))
        return out + self._finish(event.error, f"setup failed: {event.error.code.name}")

    # -- handshaking ------------------------------------------------------

    def _Handshaking_BackendConnected(self, state: Handshaking, event: BackendConnected) -> List[Output]:
        state.backend = True
        return []

    def _Handshaking_BackendFailed(self, state: Handshaking, event: BackendFailed) -> List[Output]:
        return self._finish(ConsoleError(ErrorCode.CONNECTION_FAILED), "backend connect failed")

    def _Handshaking_BackendLost(self, state: Handshaking, event: BackendLost) -> List[Output]:
        return self._finish(ConsoleError(ErrorCode.CONNECTION_FAILED), "backend closed during handshake")

    def _Handshaking_GuardEstablished(self, state: Handshaking, event: GuardEstablished) -> List[Output]:
        if not state.backend:
            return []
        self.state = Relaying(state.redemption, state.lease)
        out: List[Output] = [SplicePipeline()]
        if self.idle_timeout > 0:
            out.append(StartIdleTimer(self.idle_timeout))
        return out

    def _Handshaking_GuardFailed(self, state: Handshaking, event: GuardFailed) -> List[Output]:
        return self._finish(event.error, f"guard: {event.reason}")

    # -- relaying ---------------------------------------------------------

    def _Relaying_BackendLost(self, state: Relaying, event: BackendLost) -> List[Output]:
        return self._finish(None, "backend closed", 1000)

    def _Relaying_TimerFired(self, state: Relaying, event: TimerFired) -> List[Output]:
        if event.which != "idle":
            return []  # the connection timer is moot once relaying
        if event.silent >= self.idle_timeout:
            return self._finish(ConsoleError(ErrorCode.IDLE_TIMEOUT), "idle timeout")
        return [StartIdleTimer(self.idle_timeout - event.silent)]

    # -- closing and ended: late arrivals ----------------------------------

    def _Closing_ClientClosed(self, state: Closing, event: ClientClosed) -> List[Output]:
        self.state = Ended()
        return []

    def _late(self, event: Input) -> List[Output]:
        if isinstance(event, Admitted):
            return [ReleaseLease(event.lease)]  # granted after the end: given back at once
        if isinstance(event, BackendConnected):
            return [StopBackend()]
        return []

    # -- inputs valid in any live state ------------------------------------

    def _any(self, state: State, event: Input) -> List[Output]:
        if isinstance(state, (Closing, Ended)):
            return self._late(event)
        if isinstance(event, ClientClosed):
            if isinstance(state, SettingUp) and not state.opened:
                return self._finish(None, "websocket handshake not completed", closed=True)
            return self._finish(None, f"client closed (code {event.code})", closed=True)
        if isinstance(event, TextMessage):
            return self._finish(ConsoleError(ErrorCode.BAD_REQUEST, "Console streams are binary"), "text message")
        if isinstance(event, ProtocolError):
            return self._finish(None, f"websocket protocol error: {event.reason}", event.code)
        if isinstance(event, SetupOverflow) and not isinstance(state, Relaying):
            error = ConsoleError(ErrorCode.BAD_REQUEST, "Too much data before the console was ready")
            return self._finish(error, "setup buffer overflow")
        if isinstance(event, OwnerEnded):
            return self._finish(event.error, f"console ended: {event.reason}", event.code or 1000)
        if isinstance(event, TimerFired) and event.which == "connect":
            return self._finish(ConsoleError(ErrorCode.CONNECTION_FAILED), "connection timeout")
        if isinstance(event, Terminate):
            return self._finish(ConsoleError(ErrorCode.SESSION_TERMINATED), "terminated")
        if isinstance(event, Shutdown):
            return self._finish(None, "shutdown", CLOSE_GOING_AWAY)
        if isinstance(event, PolicyRevoked):
            return self._finish(ConsoleError(ErrorCode.SESSION_TERMINATED), "policy revoked")
        if isinstance(event, SetupFailed):
            return self._finish(event.error, f"setup failed: {event.error.code.name}")
        if isinstance(event, GuardFailed):
            return self._finish(event.error, f"guard: {event.reason}")
        return []  # an input this state does not expect changes nothing

    def _finish(
        self, error: Optional[ConsoleError], reason: str, code: Optional[int] = None, closed: bool = False
    ) -> List[Output]:
        """
        The one way out: stop the backend, give the lease back, record the
        outcome, close the browser's side (unless it closed first).
        """
        state = self.state
        out: List[Output] = []
        if isinstance(state, (Handshaking, Relaying)):
            out.append(StopBackend())
        lease = getattr(state, "lease", None)
        if lease is not None:
            out.append(ReleaseLease(lease))
        out.append(RecordOutcome(error.code.name if error is not None else None, reason))
        if closed:
            self.state = Ended()
        else:
            out.append(CloseClient(error, code))
            self.state = Closing()
        return out
