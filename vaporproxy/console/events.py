"""
The typed inputs and outputs of one console's state machine
(L{vaporproxy.console.session}): what happened, and what to do.

Plain slotted dataclasses (cheap to build: a console makes a few dozen),
compared by value in the playbooks.  The ones without fields have one
shared instance each (C{STOP_IO}, ...), which the machine answers with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

from vaporproxy.errors import ConsoleError

__all__ = [
    "ACCESS_REVOKED", "ENDED_BY_ADMIN", "Input", "MAX_SPICE_CHANNELS", "Output", "REQUIRE_TLS_MESSAGE", "SHARE_REVOKED",
]  # fmt: skip

#: What a console WebSocket in clear is told when C{console.enable_tls} is
#: on (UNAUTHORIZED, 4008).
REQUIRE_TLS_MESSAGE = "console connections require TLS"

#: The most WebSockets (channels, the main one included) one SPICE console
#: may have in this process: spice-html5 opens 4 (6 with sound), usbredir
#: adds more.  Later channels join without a lease, so without this cap one
#: token could open any number of VM connections while its console lives.
#: Channels of a console whose main channel is in another process are
#: capped the same way, per token and session, in this process.
MAX_SPICE_CHANNELS = 16

#: What the browser of a console closed with 4010 SESSION_TERMINATED reads
#: (the JSON error text), by why it ended: the code is the same for all, so
#: the text is the only place a person learns which one happened.
ENDED_BY_ADMIN = "Console ended by an administrator"
SHARE_REVOKED = "Share link revoked"
ACCESS_REVOKED = "Your access to this VM was revoked"

_typed = dataclass(slots=True)


# -- inputs: what happened ----------------------------------------------------


@_typed
class Opened:
    """The WebSocket opened; C{tls_ok}: TLS is not required or is there."""

    token: Optional[str]
    tls_ok: bool = True


@_typed
class Redeemed:
    redemption: Any


@_typed
class VmFound:
    """The locator found the VM (C{vm}): its console and host are checked next."""

    vm: Any


@_typed
class Located:
    """
    The VM's console was found and its host allowed: dial C{target}.
    C{spice}: the guard reads the link message before admission.
    """

    target: Any
    spice: bool = False


@_typed
class GuardAdmit:
    """
    SPICE: the link message was read; C{is_main}: the main channel.  For a
    later channel, what the adapter read around it: C{inputs_channel} (the
    keyboard and mouse channel), C{channels} (how many this console already
    has in this process), C{console_here} (its main channel is here).
    """

    is_main: bool
    inputs_channel: bool = False
    channels: int = 0
    console_here: bool = True


@_typed
class Admitted:
    lease: Any


@_typed
class SetupFailed:
    """
    A set-up step failed (origin, path, token, VM, host, limit, store):
    C{error}; C{reason} for the log, by default "setup failed: CODE".
    """

    error: ConsoleError
    reason: Optional[str] = None


@_typed
class BackendConnected:
    """The VM connection is up (C{backend}: its protocol)."""

    backend: Any = None


@_typed
class BackendFailed:
    """The VM connection could not be made (C{detail}: the failure's type)."""

    detail: str = ""


@_typed
class BackendLost:
    pass


@_typed
class GuardEstablished:
    """The guard's handshake is over; C{client_rest}: what it held back."""

    client_rest: bytes = b""


@_typed
class GuardFailed:
    """The guard failed the handshake (its C{fail})."""

    error: ConsoleError
    reason: str


@_typed
class GuardRefused:
    """A guard call raised C{error} (e.g. a bad SPICE link)."""

    error: ConsoleError


@_typed
class GuardCrashed:
    """A guard call raised something that is not a console error."""


@_typed
class ClientClosed:
    code: Optional[int]


@_typed
class TimerFired:
    """C{which}: "connect" or "idle"; C{silent}: seconds since last traffic."""

    which: str
    silent: float = 0.0


@_typed
class Terminate:
    """C{DELETE} of the VM's consoles (4010); C{message}: what the browser reads."""

    message: str = ENDED_BY_ADMIN


@_typed
class Shutdown:
    """The proxy is shutting down (1001)."""


@_typed
class Revoked:
    """
    The credential or share that minted the token was revoked (4010);
    C{message}: what the browser reads (L{ACCESS_REVOKED}, L{SHARE_REVOKED}).
    """

    message: str = ACCESS_REVOKED


@_typed
class TextMessage:
    """The browser sent a text message: console streams are binary."""


@_typed
class ProtocolError:
    """The browser broke WebSocket framing (1002) or a size cap (1009)."""

    code: int
    reason: str


@_typed
class SetupOverflow:
    """The browser sent more than C{buffer_size} before the guard existed."""


@_typed
class PolicyViolated:
    """A policy stage could not frame what C{side} ("browser", "VM") sent."""

    side: str
    detail: str


@_typed
class OwnerEnded:
    """SPICE: the console this channel joined ended (its main channel)."""

    error: Optional[ConsoleError]
    reason: str
    code: Optional[int]


Input = Union[
    Opened, Redeemed, VmFound, Located, GuardAdmit, Admitted, SetupFailed, BackendConnected, BackendFailed,
    BackendLost, GuardEstablished, GuardFailed, GuardRefused, GuardCrashed, ClientClosed, TimerFired, Terminate,
    Shutdown, Revoked, TextMessage, ProtocolError, SetupOverflow, PolicyViolated, OwnerEnded,
]  # fmt: skip


# -- outputs: what to do ------------------------------------------------------


@_typed
class Redeem:
    token: str


@_typed
class Locate:
    redemption: Any


@_typed
class CheckHost:
    """Pick the VM's console, resolve its host through the host policy."""

    vm: Any


@_typed
class Acquire:
    vm_uuid: str


@_typed
class Unredeem:
    token: str


@_typed
class Register:
    """The console was admitted: register it (stats, C{DELETE}, shutdown)."""


@_typed
class StartGuard:
    pass


@_typed
class PauseReading:
    """SPICE: the link was read; no more from the browser until the VM answers."""


@_typed
class JoinConsole:
    """
    SPICE: a later channel joins its console (no lease of its own);
    C{here}: the main channel is in this process (else this channel stands
    for the console here, counted by the other process).
    """

    here: bool = True


@_typed
class Dial:
    target: Any


@_typed
class UseBackend:
    """The VM connection is up: write to it, tell the guard."""

    backend: Any


@_typed
class DropBackend:
    """A VM connection that completed after the console ended: abort it."""

    backend: Any


@_typed
class SplicePipeline:
    """Relay: the console's stages and flow control replace the guard."""

    client_rest: bytes = b""


@_typed
class StartIdleTimer:
    delay: float


@_typed
class ConsoleOpened:
    """Count the console as opened (metrics, audit trail)."""


@_typed
class ForgetLocated:
    """The VM did not answer as located: drop the locator's cached lookup."""


@_typed
class StopIO:
    """Stop the timers, the guard, the dial, the relay and the backend."""


@_typed
class ReleaseLease:
    lease: Any


@_typed
class RecordOutcome:
    """
    The console ended: unregister it, record its one outcome, finish its
    recording, end the channels that joined it (with C{code}, 1000 by
    default).
    """

    error: Optional[ConsoleError]
    reason: str
    code: Optional[int] = None


@_typed
class LeaveConsole:
    """A joined SPICE channel ended: its bytes stay in its console's totals."""


@_typed
class CloseClient:
    """Send C{error} (JSON then its 4000+n code) or, without one, C{code}."""

    error: Optional[ConsoleError]
    code: Optional[int]


Output = Union[
    Redeem, Locate, CheckHost, Acquire, Unredeem, Register, StartGuard, PauseReading, JoinConsole, Dial,
    UseBackend, DropBackend, SplicePipeline, StartIdleTimer, ConsoleOpened, ForgetLocated, StopIO, ReleaseLease,
    RecordOutcome, LeaveConsole, CloseClient,
]  # fmt: skip

# The shared instances of the inputs and outputs without fields.
BACKEND_LOST = BackendLost()
GUARD_CRASHED = GuardCrashed()
TERMINATE = Terminate()
SHUTDOWN = Shutdown()
REVOKED = Revoked()
TEXT_MESSAGE = TextMessage()
SETUP_OVERFLOW = SetupOverflow()
REGISTER = Register()
START_GUARD = StartGuard()
PAUSE_READING = PauseReading()
CONSOLE_OPENED = ConsoleOpened()
FORGET_LOCATED = ForgetLocated()
STOP_IO = StopIO()
LEAVE_CONSOLE = LeaveConsole()
