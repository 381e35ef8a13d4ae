"""
Playbooks for L{vaporproxy.console.session}: input sequences replayed on a
session, the outputs compared; every way a console ends yields exactly one
outcome and gives back every lease it was granted.
"""

from __future__ import annotations

from typing import Any, List, Sequence

from twisted.trial.unittest import SynchronousTestCase

from vaporproxy.console.events import (
    MAX_SPICE_CHANNELS,
    REQUIRE_TLS_MESSAGE,
    SHARE_REVOKED,
    Acquire,
    CheckHost,
    Admitted,
    BackendConnected,
    BackendFailed,
    BackendLost,
    ClientClosed,
    CloseClient,
    ConsoleOpened,
    Dial,
    DropBackend,
    ForgetLocated,
    GuardAdmit,
    GuardCrashed,
    GuardEstablished,
    GuardFailed,
    GuardRefused,
    JoinConsole,
    LeaveConsole,
    Locate,
    Located,
    Opened,
    OwnerEnded,
    PauseReading,
    PolicyViolated,
    ProtocolError,
    RecordOutcome,
    Redeem,
    Redeemed,
    Register,
    ReleaseLease,
    Revoked,
    SetupFailed,
    SetupOverflow,
    Shutdown,
    SplicePipeline,
    StartGuard,
    StartIdleTimer,
    StopIO,
    Terminate,
    TextMessage,
    TimerFired,
    Unredeem,
    UseBackend,
    VmFound,
)
from vaporproxy.console.session import Closing, Ended, Handshaking, Relaying, Session
from vaporproxy.errors import CLOSE_GOING_AWAY, ConsoleError, ErrorCode
from vaporproxy.interfaces import Grant, Redemption

TOKEN = "ab" * 32
VM_UUID = "6f1b2a3c-1111-4222-8333-944455556666"
GRANT = Grant(vm_ref=VM_UUID, vm_uuid=VM_UUID, console_type="vnc", display=0, user="alice")
VIEW_GRANT = Grant(vm_ref=VM_UUID, vm_uuid=VM_UUID, console_type="spice", display=0, user="alice", mode="view")
REDEMPTION = Redemption(grant=GRANT, first=True)
JOINED = Redemption(grant=GRANT, first=False, spice_session_id=7)
VM = object()
TARGET = ("127.0.0.1", 5901)
LEASE = "lease-1"
BACKEND = "backend-1"
IDLE = 600.0

#: The inputs that bring a console to each state.
TO_HANDSHAKING = [Opened(TOKEN), Redeemed(REDEMPTION), VmFound(VM), Located(TARGET), Admitted(LEASE)]
TO_RELAYING = TO_HANDSHAKING + [BackendConnected(BACKEND), GuardEstablished()]
#: A later SPICE channel up to its admission.
TO_SPICE_ADMIT = [Opened(TOKEN), Redeemed(JOINED), VmFound(VM), Located(TARGET, spice=True)]


def error(code: ErrorCode) -> ConsoleError:
    return ConsoleError(code)


class Playbook:
    """A session and every output it gave, input by input."""

    def __init__(self, inputs: Sequence[Any]):
        self.session = Session(idle_timeout=IDLE)
        self.steps: List[List[Any]] = [self.session.handle(i) for i in inputs]

    @property
    def outputs(self) -> List[Any]:
        return [o for step in self.steps for o in step]

    def last(self) -> List[Any]:
        return self.steps[-1]

    def of(self, kind: type) -> List[Any]:
        return [o for o in self.outputs if isinstance(o, kind)]

    def outcome(self) -> Any:
        """The one outcome, as (error code name or None, reason, close code)."""
        [outcome] = self.of(RecordOutcome)
        return (outcome.error.code.name if outcome.error else None, outcome.reason, outcome.code)


class SessionTestsMixin:
    def play(self, inputs: Sequence[Any], leases: int = 0) -> Playbook:
        """
        Replay C{inputs}; assert one ending (an outcome, or leaving the
        joined console), one stop, C{leases} releases, and no live session.
        """
        book = Playbook(inputs)
        endings = book.of(RecordOutcome) + book.of(LeaveConsole)
        self.assertEqual(len(endings), 1, book.outputs)  # type: ignore[attr-defined]
        self.assertEqual(len(book.of(StopIO)), 1, book.outputs)  # type: ignore[attr-defined]
        self.assertEqual(len(book.of(ReleaseLease)), leases, book.outputs)  # type: ignore[attr-defined]
        self.assertFalse(book.session.live)  # type: ignore[attr-defined]
        return book

    def assertEnded(self, book: Playbook, code: Any, reason: str) -> None:
        self.assertEqual(book.outcome()[:2], (code, reason))  # type: ignore[attr-defined]


class HappyPathTests(SynchronousTestCase):
    """
    A console sets up, hands over to the guard and relays.
    """

    def test_setupOutputs(self) -> None:
        """When a console sets up, it redeems, locates, checks the host, takes a slot, registers, starts the guard and dials; on established it splices its pipeline, arms the idle timer and counts itself opened."""
        book = Playbook(TO_RELAYING)
        self.assertEqual(
            book.steps,
            [
                [Redeem(TOKEN)],
                [Locate(REDEMPTION)],
                [CheckHost(VM)],
                [Acquire(GRANT.vm_uuid)],
                [Register(), StartGuard(), Dial(TARGET)],
                [UseBackend(BACKEND)],
                [SplicePipeline(b""), StartIdleTimer(IDLE), ConsoleOpened()],
            ],
        )
        self.assertIsInstance(book.session.state, Relaying)
        self.assertTrue(book.session.live)

    def test_establishedBeforeBackend(self) -> None:
        """When the guard says established before the VM is connected, the session keeps handshaking."""
        book = Playbook(TO_HANDSHAKING + [GuardEstablished()])
        self.assertEqual(book.last(), [])
        self.assertIsInstance(book.session.state, Handshaking)

    def test_clientRestSpliced(self) -> None:
        """When the guard held back some of the browser's bytes, the splice carries them into the pipeline."""
        book = Playbook(TO_HANDSHAKING + [BackendConnected(BACKEND), GuardEstablished(b"rest")])
        self.assertEqual(book.last()[0], SplicePipeline(b"rest"))

    def test_noIdleTimeout(self) -> None:
        """When the idle timeout is off (0), no idle timer is armed."""
        session = Session(idle_timeout=0)
        outputs = [session.handle(i) for i in TO_RELAYING]
        self.assertEqual(outputs[-1], [SplicePipeline(b""), ConsoleOpened()])


class SpiceTests(SessionTestsMixin, SynchronousTestCase):
    """
    SPICE: the guard reads the link message before the console is admitted.
    """

    def test_mainChannel(self) -> None:
        """When a SPICE main channel sets up, the guard starts first, reads pause and the slot is taken on its admit, then it registers and dials."""
        book = Playbook(TO_HANDSHAKING[:3] + [Located(TARGET, spice=True), GuardAdmit(True), Admitted(LEASE)])
        self.assertEqual(
            book.steps[3:], [[StartGuard()], [PauseReading(), Acquire(GRANT.vm_uuid)], [Register(), Dial(TARGET)]]
        )

    def test_laterChannelJoins(self) -> None:
        """When a later channel of a SPICE console of this process is admitted, it joins without a lease, arms no idle timer, is not counted, and its end leaves the console instead of recording an outcome."""
        book = self.play(TO_SPICE_ADMIT + [GuardAdmit(False), BackendConnected(BACKEND), GuardEstablished(), ClientClosed(1000)])
        self.assertEqual(book.steps[4], [PauseReading(), JoinConsole(True), Dial(TARGET)])
        self.assertEqual(book.steps[6], [SplicePipeline(b"")])
        self.assertEqual((book.of(Acquire), book.of(RecordOutcome), len(book.of(LeaveConsole))), ([], [], 1))

    def test_remoteChannel(self) -> None:
        """When a later channel's main channel is in another process, it stands for the console here: idle timer, an outcome of its own, but not counted as opened."""
        book = self.play(
            TO_SPICE_ADMIT + [GuardAdmit(False, console_here=False), BackendConnected(BACKEND), GuardEstablished(),
                              Terminate()],
        )  # fmt: skip
        self.assertEqual(book.steps[4], [PauseReading(), JoinConsole(False), Dial(TARGET)])
        self.assertEqual(book.steps[6], [SplicePipeline(b""), StartIdleTimer(IDLE)])
        self.assertEnded(book, "SESSION_TERMINATED", "terminated")

    def test_linkDoesNotMatchToken(self) -> None:
        """When the link's kind does not match the token's use (a second main channel), TOKEN_ALREADY_USED and no slot."""
        book = self.play(TO_SPICE_ADMIT + [GuardAdmit(True)])
        self.assertEnded(book, "TOKEN_ALREADY_USED", "spice channel does not match the token's use")
        self.assertEqual(book.of(Acquire), [])

    def test_viewOnlyInputsChannel(self) -> None:
        """When a view-only console's later channel is the inputs channel, UNAUTHORIZED with its message; other channels join."""
        view = Redemption(grant=VIEW_GRANT, first=False, spice_session_id=7)
        start = [Opened(TOKEN), Redeemed(view), VmFound(VM), Located(TARGET, spice=True)]
        book = self.play(start + [GuardAdmit(False, inputs_channel=True)])
        self.assertEnded(book, "UNAUTHORIZED", "view-only console: inputs channel refused")
        [close] = book.of(CloseClient)
        self.assertEqual(close.error.message, "A view-only console has no input channel")
        self.assertEqual(Playbook(start + [GuardAdmit(False)]).last()[1], JoinConsole(True))

    def test_channelCap(self) -> None:
        """When the console already has MAX_SPICE_CHANNELS channels here, the later channel is refused (4007) and no token is given back."""
        book = self.play(TO_SPICE_ADMIT + [GuardAdmit(False, channels=MAX_SPICE_CHANNELS)])
        self.assertEnded(book, "MAX_CONNECTIONS_REACHED", f"spice console already has {MAX_SPICE_CHANNELS} channels")
        self.assertEqual((book.of(Unredeem), book.of(Dial)), ([], []))
        below = Playbook(TO_SPICE_ADMIT + [GuardAdmit(False, channels=MAX_SPICE_CHANNELS - 1)])
        self.assertEqual(below.last()[-1], Dial(TARGET))

    def test_admitBeforeGuard(self) -> None:
        """When an admit arrives before the guard was started (VNC), it changes nothing."""
        self.assertEqual(Playbook(TO_HANDSHAKING[:3] + [GuardAdmit(True)]).last(), [])


class EndingTests(SessionTestsMixin, SynchronousTestCase):
    """
    Every way a console ends: one outcome, every lease given back once.
    """

    def test_tokenErrors(self) -> None:
        """When the token is missing, invalid, expired or used, the console ends with that error and no slot was taken."""
        book = self.play([Opened(None)])
        self.assertEnded(book, "INVALID_TOKEN", "setup failed: INVALID_TOKEN")
        for code in (ErrorCode.INVALID_TOKEN, ErrorCode.TOKEN_EXPIRED, ErrorCode.TOKEN_ALREADY_USED):
            refused = error(code)
            book = self.play([Opened(TOKEN), SetupFailed(refused)])
            self.assertEnded(book, code.name, f"setup failed: {code.name}")
            self.assertEqual(book.of(CloseClient), [CloseClient(refused, None)])
            self.assertEqual(book.of(Acquire), [])

    def test_tlsRequired(self) -> None:
        """When TLS is required and missing, UNAUTHORIZED with the TLS message, and the token is not even redeemed."""
        book = self.play([Opened(TOKEN, tls_ok=False)])
        self.assertEnded(book, "UNAUTHORIZED", "setup failed: UNAUTHORIZED")
        self.assertEqual(book.of(CloseClient)[0].error.message, REQUIRE_TLS_MESSAGE)
        self.assertEqual(book.of(Redeem), [])

    def test_refusedAtHandshake(self) -> None:
        """When the opening handshake is refused (a foreign origin), the console ends with the adapter's reason, before it opened."""
        book = self.play([SetupFailed(error(ErrorCode.UNAUTHORIZED), "origin not allowed"), ClientClosed(None)])
        self.assertEnded(book, "UNAUTHORIZED", "origin not allowed")
        self.assertIsInstance(book.session.state, Ended)

    def test_vmNotFoundAndHostRefused(self) -> None:
        """When the VM is not found or its host not allowed, the console ends with that error before any slot or dial."""
        for prefix in ([Opened(TOKEN), Redeemed(REDEMPTION)], TO_HANDSHAKING[:3]):
            for code in (ErrorCode.VM_NOT_FOUND, ErrorCode.UNAUTHORIZED):
                book = self.play(prefix + [SetupFailed(error(code))])
                self.assertEnded(book, code.name, f"setup failed: {code.name}")
                self.assertEqual((book.of(Dial), book.of(Acquire)), ([], []))

    def test_limitReachedGivesTokenBack(self) -> None:
        """When no slot is free (4007), the console ends and its token's redemption is given back, before the outcome."""
        book = self.play(TO_HANDSHAKING[:4] + [SetupFailed(error(ErrorCode.MAX_CONNECTIONS_REACHED))])
        self.assertEqual(book.last()[0], Unredeem(TOKEN))
        self.assertEnded(book, "MAX_CONNECTIONS_REACHED", "setup failed: MAX_CONNECTIONS_REACHED")

    def test_limitReachedLaterSpiceChannel(self) -> None:
        """When a later SPICE channel (not a first use) finds no slot, nothing is given back: its token was not spent by it."""
        book = self.play([Opened(TOKEN), Redeemed(JOINED), Located(TARGET), SetupFailed(error(ErrorCode.MAX_CONNECTIONS_REACHED))])
        self.assertEqual(book.of(Unredeem), [])

    def test_setupErrorsOnTheWay(self) -> None:
        """When a store fails unexpectedly or the set-up is cancelled, the adapter's reason is the outcome's."""
        for code, reason in ((ErrorCode.INTERNAL_ERROR, "internal error during setup"),
                             (ErrorCode.CONNECTION_FAILED, "setup cancelled")):  # fmt: skip
            book = self.play([Opened(TOKEN), SetupFailed(error(code), reason)])
            self.assertEnded(book, code.name, reason)

    def test_backendRefused(self) -> None:
        """When the VM refuses the connection, CONNECTION_FAILED with the failure's kind, the VM's lookup forgotten, the lease given back."""
        book = self.play(TO_HANDSHAKING + [BackendFailed("ConnectionRefusedError")], leases=1)
        self.assertEnded(book, "CONNECTION_FAILED", "backend connect failed: ConnectionRefusedError")
        self.assertEqual(book.last()[:3], [ForgetLocated(), StopIO(), ReleaseLease(LEASE)])

    def test_backendLost(self) -> None:
        """When the VM closes during the handshake it is CONNECTION_FAILED; while relaying it is a clean 1000."""
        book = self.play(TO_HANDSHAKING + [BackendConnected(BACKEND), BackendLost()], leases=1)
        self.assertEnded(book, "CONNECTION_FAILED", "backend closed during handshake")
        book = self.play(TO_RELAYING + [BackendLost()], leases=1)
        self.assertEqual(book.outcome(), (None, "backend closed", 1000))
        self.assertEqual(book.of(CloseClient), [CloseClient(None, 1000)])
        self.assertEqual(book.of(ForgetLocated), [])

    def test_guardFailure(self) -> None:
        """When the guard fails, refuses or crashes, the console ends with its error; a failure or refusal forgets the VM's lookup."""
        failed = GuardFailed(error(ErrorCode.UNAUTHORIZED), "bad password")
        book = self.play(TO_HANDSHAKING + [BackendConnected(BACKEND), failed], leases=1)
        self.assertEnded(book, "UNAUTHORIZED", "guard: bad password")
        self.assertEqual(len(book.of(ForgetLocated)), 1)
        book = self.play(TO_SPICE_ADMIT + [GuardRefused(error(ErrorCode.BAD_REQUEST))])
        self.assertEnded(book, "BAD_REQUEST", "guard refused: BAD_REQUEST")
        self.assertEqual(len(book.of(ForgetLocated)), 1)
        book = self.play(TO_HANDSHAKING + [GuardCrashed()], leases=1)
        self.assertEnded(book, "INTERNAL_ERROR", "guard error")
        self.assertEqual(book.of(ForgetLocated), [])

    def test_clientGoneInEachState(self) -> None:
        """When the browser goes away in any state, the console ends with no error, nothing is sent to it, and any lease is given back."""
        gone = ClientClosed(1001)
        states = (([Opened(TOKEN)], 0), (TO_HANDSHAKING[:3], 0), (TO_SPICE_ADMIT, 0), (TO_HANDSHAKING, 1),
                  (TO_RELAYING, 1))  # fmt: skip
        for prefix, leases in states:
            book = self.play(prefix + [gone], leases=leases)
            self.assertEnded(book, None, "client closed (code 1001)")
            self.assertEqual(book.of(CloseClient), [])
            self.assertIsInstance(book.session.state, Ended)

    def test_idle(self) -> None:
        """When the idle timer fires early it re-arms for the rest; once the console was silent the whole period, IDLE_TIMEOUT."""
        book = Playbook(TO_RELAYING + [TimerFired("idle", silent=IDLE - 10)])
        self.assertEqual(book.last(), [StartIdleTimer(10)])
        book = self.play(TO_RELAYING + [TimerFired("idle", silent=IDLE)], leases=1)
        self.assertEnded(book, "IDLE_TIMEOUT", "idle timeout")

    def test_connectionTimeout(self) -> None:
        """When the connection timer fires before relaying (even before the WebSocket opened), CONNECTION_FAILED; once relaying it changes nothing."""
        book = self.play([TimerFired("connect")])
        self.assertEnded(book, "CONNECTION_FAILED", "connection timeout")
        book = self.play([Opened(TOKEN), TimerFired("connect")])
        self.assertEnded(book, "CONNECTION_FAILED", "connection timeout")
        book = self.play(TO_HANDSHAKING + [TimerFired("connect")], leases=1)
        self.assertEnded(book, "CONNECTION_FAILED", "connection timeout")
        self.assertEqual(Playbook(TO_RELAYING + [TimerFired("connect")]).last(), [])

    def test_terminateShutdownRevoked(self) -> None:
        """When the console is terminated (4010), the proxy shuts down (1001) or its credential is revoked (4010), it ends so."""
        book = self.play(TO_RELAYING + [Terminate()], leases=1)
        self.assertEnded(book, "SESSION_TERMINATED", "terminated")
        book = self.play(TO_RELAYING + [Shutdown()], leases=1)
        self.assertEqual(book.of(CloseClient), [CloseClient(None, CLOSE_GOING_AWAY)])
        self.assertEqual(book.outcome(), (None, "shutdown", CLOSE_GOING_AWAY))
        book = self.play(TO_HANDSHAKING + [Revoked()], leases=1)
        self.assertEnded(book, "SESSION_TERMINATED", "revoked")

    def test_whyTheBrowserReads(self) -> None:
        """When a console is closed with 4010, the JSON error text the browser reads says why: an administrator by default, a revoked key, or a revoked share link (named in the log reason too)."""
        cases = [
            (Terminate(), "Console ended by an administrator", "terminated"),
            (Terminate("Ended for maintenance"), "Ended for maintenance", "terminated"),
            (Revoked(), "Your access to this VM was revoked", "revoked"),
            (Revoked(SHARE_REVOKED), "Share link revoked", "revoked: share link"),
        ]
        for event, text, reason in cases:
            book = self.play(TO_RELAYING + [event], leases=1)
            [close] = book.of(CloseClient)
            self.assertEqual((close.error.code, close.error.code.close_code, close.error.message, close.code),
                             (ErrorCode.SESSION_TERMINATED, 4010, text, None), event)  # fmt: skip
            self.assertEqual(book.of(RecordOutcome)[0].error.message, text)
            self.assertEnded(book, "SESSION_TERMINATED", reason)

    def test_endingOrder(self) -> None:
        """When a console ends, it stops everything, gives the lease back, records the outcome, then closes the browser's side."""
        book = self.play(TO_RELAYING + [Terminate()], leases=1)
        self.assertEqual([type(o) for o in book.last()], [StopIO, ReleaseLease, RecordOutcome, CloseClient])


class BrowserMisbehaviourTests(SessionTestsMixin, SynchronousTestCase):
    """
    The endings a browser causes (the channel's reasons, kept for the logs).
    """

    def test_handshakeNotCompleted(self) -> None:
        """When the browser goes away before the WebSocket opened, the reason says the handshake was not completed."""
        book = self.play([ClientClosed(None)])
        self.assertEnded(book, None, "websocket handshake not completed")

    def test_textMessage(self) -> None:
        """When the browser sends text, BAD_REQUEST "text message", in any live state, lease given back."""
        for prefix, leases in (([Opened(TOKEN)], 0), (TO_HANDSHAKING, 1), (TO_RELAYING, 1)):
            book = self.play(prefix + [TextMessage()], leases=leases)
            self.assertEnded(book, "BAD_REQUEST", "text message")

    def test_protocolError(self) -> None:
        """When the browser breaks framing, the console closes with the WebSocket code and no error message."""
        book = self.play(TO_RELAYING + [ProtocolError(1009, "message too big")], leases=1)
        self.assertEqual(book.of(CloseClient), [CloseClient(None, 1009)])
        self.assertEnded(book, None, "websocket protocol error: message too big")

    def test_setupOverflow(self) -> None:
        """When the browser sends too much before the guard exists, BAD_REQUEST "setup buffer overflow"; once relaying it means nothing."""
        book = self.play([Opened(TOKEN), SetupOverflow()])
        self.assertEnded(book, "BAD_REQUEST", "setup buffer overflow")
        self.assertEqual(Playbook(TO_RELAYING + [SetupOverflow()]).last(), [])

    def test_policyViolated(self) -> None:
        """When a policy stage cannot pass what a side sent, BAD_REQUEST (4012) with that side's message."""
        for side, message in (("browser", "Message not allowed on this console"),
                              ("VM", "The VM sent what the console's policy cannot pass")):  # fmt: skip
            book = self.play(TO_RELAYING + [PolicyViolated(side, "too long")], leases=1)
            self.assertEnded(book, "BAD_REQUEST", f"policy, from the {side}: too long")
            self.assertEqual(book.of(CloseClient)[0].error.message, message)

    def test_ownerEnded(self) -> None:
        """When a joined SPICE channel's console ends, the channel leaves it and closes with its error, or 1000 by default."""
        start = TO_SPICE_ADMIT + [GuardAdmit(False), BackendConnected(BACKEND), GuardEstablished()]
        book = self.play(start + [OwnerEnded(None, "backend closed", None)])
        self.assertEqual(book.of(CloseClient), [CloseClient(None, 1000)])
        self.assertEqual(len(book.of(LeaveConsole)), 1)
        terminated = error(ErrorCode.SESSION_TERMINATED)
        book = self.play(start + [OwnerEnded(terminated, "terminated", None)])
        self.assertEqual(book.of(CloseClient), [CloseClient(terminated, 1000)])
        book = self.play(TO_SPICE_ADMIT + [GuardAdmit(False, console_here=False), OwnerEnded(None, "shutdown", 1001)])
        self.assertEqual(book.outcome(), (None, "console ended: shutdown", 1001))


class LateArrivalTests(SessionTestsMixin, SynchronousTestCase):
    """
    What arrives after the end is a transition, not an error.
    """

    def test_leaseGrantedAfterEnd(self) -> None:
        """When a lease is granted after the browser went away, it is given back at once, and the outcome stays the only one."""
        book = self.play(TO_HANDSHAKING[:4] + [ClientClosed(1000), Admitted(LEASE)], leases=1)
        self.assertEqual(book.last(), [ReleaseLease(LEASE)])

    def test_leaseGrantedAfterTerminate(self) -> None:
        """When a SPICE main channel's lease is granted after it was terminated, it is given back at once and nothing is dialled."""
        start = TO_HANDSHAKING[:3] + [Located(TARGET, spice=True), GuardAdmit(True)]
        book = self.play(start + [Terminate(), Admitted(LEASE)], leases=1)
        self.assertEqual((book.last(), book.of(Dial), book.of(Register)), ([ReleaseLease(LEASE)], [], []))

    def test_setupAnswersAfterEnd(self) -> None:
        """When the token store, the locator or the host policy answers after the console ended, nothing more happens."""
        for late in (Redeemed(REDEMPTION), VmFound(VM), Located(TARGET), GuardAdmit(True)):
            book = self.play([Opened(TOKEN), ClientClosed(1000), late])
            self.assertEqual(book.last(), [])

    def test_backendConnectedAfterEnd(self) -> None:
        """When the VM connection completes after the console ended, it is dropped."""
        book = self.play(TO_HANDSHAKING + [Terminate(), BackendConnected(BACKEND)], leases=1)
        self.assertEqual(book.last(), [DropBackend(BACKEND)])

    def test_everythingAfterEnd(self) -> None:
        """When any further input arrives after the end (a second close, timers, terminate, shutdown, the guard), no second outcome or release follows."""
        late = [ClientClosed(1000), TimerFired("idle", IDLE), TimerFired("connect"), Terminate(), Shutdown(), Revoked(),
                BackendLost(), BackendFailed("x"), GuardEstablished(), GuardFailed(error(ErrorCode.BAD_REQUEST), "x"),
                GuardRefused(error(ErrorCode.BAD_REQUEST)), GuardCrashed(), TextMessage(), SetupOverflow(),
                ProtocolError(1002, "x"), PolicyViolated("VM", "x"), OwnerEnded(None, "x", None),
                SetupFailed(error(ErrorCode.INTERNAL_ERROR))]  # fmt: skip
        book = self.play(TO_RELAYING + [Terminate()] + late, leases=1)
        self.assertIsInstance(book.session.state, Ended)
        self.assertEqual(book.steps[len(TO_RELAYING) + 1 :], [[]] * len(late))

    def test_closingWaitsForClient(self) -> None:
        """When the console closes the browser's side, it is closing until the browser's close arrives, then ended."""
        book = Playbook(TO_RELAYING + [Shutdown()])
        self.assertIsInstance(book.session.state, Closing)
        book.session.handle(ClientClosed(1001))
        self.assertIsInstance(book.session.state, Ended)
