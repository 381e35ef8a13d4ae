"""
Playbooks for L{vaporproxy.console.session}: input sequences replayed on a
session, the outputs compared; every way a console ends yields exactly one
outcome and gives back every lease it was granted.
"""

from __future__ import annotations

from typing import Any, List, Sequence

from twisted.trial.unittest import SynchronousTestCase

from vaporproxy.console.session import (
    Acquire,
    Admitted,
    BackendConnected,
    BackendFailed,
    BackendLost,
    ClientClosed,
    CloseClient,
    Closing,
    Dial,
    Ended,
    GuardEstablished,
    GuardAdmit,
    GuardFailed,
    JoinConsole,
    Locate,
    Located,
    Opened,
    OwnerEnded,
    ProtocolError,
    PolicyRevoked,
    RecordOutcome,
    Redeem,
    Redeemed,
    ReleaseLease,
    Relaying,
    Session,
    SetupFailed,
    SetupOverflow,
    Shutdown,
    SplicePipeline,
    StartGuard,
    StartIdleTimer,
    StopBackend,
    Terminate,
    TextMessage,
    TimerFired,
    Unredeem,
)
from vaporproxy.errors import CLOSE_GOING_AWAY, ConsoleError, ErrorCode
from vaporproxy.interfaces import Grant, Redemption

TOKEN = "ab" * 32
VM_UUID = "6f1b2a3c-1111-4222-8333-944455556666"
GRANT = Grant(vm_ref=VM_UUID, vm_uuid=VM_UUID, console_type="vnc", display=0, user="alice")
REDEMPTION = Redemption(grant=GRANT, first=True)
TARGET = ("127.0.0.1", 5901)
LEASE = "lease-1"
IDLE = 600.0

#: The inputs that bring a console to each state.
TO_HANDSHAKING = [Opened(TOKEN), Redeemed(REDEMPTION), Located(TARGET), Admitted(LEASE)]
TO_RELAYING = TO_HANDSHAKING + [BackendConnected(), GuardEstablished()]


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


class SessionTestsMixin:
    def play(self, inputs: Sequence[Any], leases: int = 0) -> Playbook:
        """Replay C{inputs}; assert one outcome and C{leases} releases."""
        book = Playbook(inputs)
        self.assertEqual(len(book.of(RecordOutcome)), 1, book.outputs)  # type: ignore[attr-defined]
        self.assertEqual(len(book.of(ReleaseLease)), leases, book.outputs)  # type: ignore[attr-defined]
        return book


class HappyPathTests(SynchronousTestCase):
    """
    A console sets up, hands over to the guard and relays.
    """

    def test_setupOutputs(self) -> None:
        """When a console sets up, it redeems, locates, takes a slot, then starts the guard and dials; on established it splices its pipeline and arms the idle timer."""
        book = Playbook(TO_RELAYING)
        self.assertEqual(
            book.steps,
            [
                [Redeem(TOKEN)],
                [Locate(REDEMPTION)],
                [Acquire(GRANT.vm_uuid)],
                [StartGuard(), Dial(TARGET)],
                [],
                [SplicePipeline(), StartIdleTimer(IDLE)],
            ],
        )
        self.assertIsInstance(book.session.state, Relaying)

    def test_establishedBeforeBackend(self) -> None:
        """When the guard says established before the VM is connected, the session keeps handshaking."""
        book = Playbook(TO_HANDSHAKING + [GuardEstablished()])
        self.assertEqual(book.last(), [])
        self.assertNotIsInstance(book.session.state, Relaying)


class SpiceTests(SessionTestsMixin, SynchronousTestCase):
    """
    SPICE: the guard reads the link message before the console is admitted.
    """

    def test_mainChannel(self) -> None:
        """When a SPICE main channel sets up, the guard starts first, the slot is taken on its admit, then the VM is dialled."""
        book = Playbook([Opened(TOKEN), Redeemed(REDEMPTION), Located(TARGET, spice=True), GuardAdmit(True), Admitted(LEASE)])
        self.assertEqual(book.steps[2:], [[StartGuard()], [Acquire(GRANT.vm_uuid)], [Dial(TARGET)]])

    def test_laterChannelJoins(self) -> None:
        """When a later channel of a live SPICE console is admitted, it joins without a lease and its end releases none."""
        joined = Redemption(grant=GRANT, first=False, spice_session_id=7)
        book = self.play(
            [Opened(TOKEN), Redeemed(joined), Located(TARGET, spice=True), GuardAdmit(False), BackendConnected(),
             GuardEstablished(), ClientClosed(1000)],
        )  # fmt: skip
        self.assertEqual(book.steps[3], [JoinConsole(), Dial(TARGET)])
        self.assertEqual(book.of(Acquire), [])

    def test_linkDoesNotMatchToken(self) -> None:
        """When the link's kind does not match the token's use (a second main channel), TOKEN_ALREADY_USED and no slot."""
        joined = Redemption(grant=GRANT, first=False, spice_session_id=7)
        book = self.play([Opened(TOKEN), Redeemed(joined), Located(TARGET, spice=True), GuardAdmit(True)])
        [outcome] = book.of(RecordOutcome)
        self.assertEqual(outcome.error, "TOKEN_ALREADY_USED")
        self.assertEqual(book.of(Acquire), [])


class EndingTests(SessionTestsMixin, SynchronousTestCase):
    """
    Every way a console ends: one outcome, every lease given back once.
    """

    def assertEnded(self, book: Playbook, code: Any, reason: str) -> None:
        [outcome] = book.of(RecordOutcome)
        self.assertEqual(outcome, RecordOutcome(code, reason))

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
        """When TLS is required and missing, UNAUTHORIZED and the token is not even redeemed."""
        book = self.play([Opened(TOKEN, tls_ok=False)])
        self.assertEnded(book, "UNAUTHORIZED", "console connections require TLS")
        self.assertEqual(book.of(Redeem), [])

    def test_vmNotFoundAndHostRefused(self) -> None:
        """When the VM is not found or its host not allowed, the console ends with that error before any slot or dial."""
        for code in (ErrorCode.VM_NOT_FOUND, ErrorCode.UNAUTHORIZED):
            book = self.play([Opened(TOKEN), Redeemed(REDEMPTION), SetupFailed(error(code))])
            self.assertEnded(book, code.name, f"setup failed: {code.name}")
            self.assertEqual(book.of(Dial), [])

    def test_limitReachedGivesTokenBack(self) -> None:
        """When no slot is free (4007), the console ends and its token's redemption is given back, before the outcome."""
        book = self.play(TO_HANDSHAKING[:3] + [SetupFailed(error(ErrorCode.MAX_CONNECTIONS_REACHED))])
        self.assertEqual(book.last()[0], Unredeem(TOKEN))
        self.assertEnded(book, "MAX_CONNECTIONS_REACHED", "setup failed: MAX_CONNECTIONS_REACHED")

    def test_limitReachedLaterSpiceChannel(self) -> None:
        """When a later SPICE channel (not a first use) finds no slot, nothing is given back: its token was not spent by it."""
        joined = Redemption(grant=GRANT, first=False, spice_session_id=7)
        book = self.play([Opened(TOKEN), Redeemed(joined), Located(TARGET), SetupFailed(error(ErrorCode.MAX_CONNECTIONS_REACHED))])
        self.assertEqual(book.of(Unredeem), [])

    def test_backendRefused(self) -> None:
        """When the VM refuses the connection, CONNECTION_FAILED, the backend is stopped and the lease given back."""
        book = self.play(TO_HANDSHAKING + [BackendFailed()], leases=1)
        self.assertEnded(book, "CONNECTION_FAILED", "backend connect failed")

    def test_backendLost(self) -> None:
        """When the VM closes during the handshake it is CONNECTION_FAILED; while relaying it is a clean 1000."""
        book = self.play(TO_HANDSHAKING + [BackendConnected(), BackendLost()], leases=1)
        self.assertEnded(book, "CONNECTION_FAILED", "backend closed during handshake")
        book = self.play(TO_RELAYING + [BackendLost()], leases=1)
        self.assertEnded(book, None, "backend closed")
        self.assertEqual(book.of(CloseClient), [CloseClient(None, 1000)])

    def test_guardFailure(self) -> None:
        """When the guard fails, its error ends the console."""
        failed = GuardFailed(error(ErrorCode.CONNECTION_FAILED), "bad version")
        book = self.play(TO_HANDSHAKING + [BackendConnected(), failed], leases=1)
        self.assertEnded(book, "CONNECTION_FAILED", "guard: bad version")

    def test_clientGoneInEachState(self) -> None:
        """When the browser goes away in any state, the console ends with no error, nothing is sent to it, and any lease is given back."""
        gone = ClientClosed(1001)
        for prefix, leases in (([Opened(TOKEN)], 0), (TO_HANDSHAKING, 1), (TO_RELAYING, 1)):
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
        """When the connection timer fires before relaying, CONNECTION_FAILED; once relaying it changes nothing."""
        book = self.play([Opened(TOKEN), TimerFired("connect")])
        self.assertEnded(book, "CONNECTION_FAILED", "connection timeout")
        book = self.play(TO_HANDSHAKING + [TimerFired("connect")], leases=1)
        self.assertEnded(book, "CONNECTION_FAILED", "connection timeout")
        self.assertEqual(Playbook(TO_RELAYING + [TimerFired("connect")]).last(), [])

    def test_terminateShutdownRevoked(self) -> None:
        """When the console is terminated (4010), the proxy shuts down (1001) or its policy is revoked (4010), it ends so."""
        book = self.play(TO_RELAYING + [Terminate()], leases=1)
        self.assertEnded(book, "SESSION_TERMINATED", "terminated")
        book = self.play(TO_RELAYING + [Shutdown()], leases=1)
        self.assertEqual(book.of(CloseClient), [CloseClient(None, CLOSE_GOING_AWAY)])
        book = self.play(TO_HANDSHAKING + [PolicyRevoked()], leases=1)
        self.assertEnded(book, "SESSION_TERMINATED", "policy revoked")


class BrowserMisbehaviourTests(SessionTestsMixin, SynchronousTestCase):
    """
    The endings a browser causes (the channel's reasons, kept for the logs).
    """

    def test_handshakeNotCompleted(self) -> None:
        """When the browser goes away before the WebSocket opened, the reason says the handshake was not completed."""
        book = self.play([ClientClosed(None)])
        self.assertEqual(book.of(RecordOutcome), [RecordOutcome(None, "websocket handshake not completed")])

    def test_textMessage(self) -> None:
        """When the browser sends text, BAD_REQUEST "text message", in any live state, lease given back."""
        book = self.play(TO_RELAYING + [TextMessage()], leases=1)
        self.assertEqual(book.of(RecordOutcome), [RecordOutcome("BAD_REQUEST", "text message")])

    def test_protocolError(self) -> None:
        """When the browser breaks framing, the console closes with the WebSocket code and no error message."""
        book = self.play(TO_RELAYING + [ProtocolError(1009, "message too big")], leases=1)
        self.assertEqual(book.of(CloseClient), [CloseClient(None, 1009)])
        self.assertEqual(book.of(RecordOutcome), [RecordOutcome(None, "websocket protocol error: message too big")])

    def test_setupOverflow(self) -> None:
        """When the browser sends too much before the guard exists, BAD_REQUEST "setup buffer overflow"; once relaying it means nothing."""
        book = self.play([Opened(TOKEN), SetupOverflow()])
        self.assertEqual(book.of(RecordOutcome), [RecordOutcome("BAD_REQUEST", "setup buffer overflow")])
        self.assertEqual(Playbook(TO_RELAYING + [SetupOverflow()]).last(), [])

    def test_ownerEnded(self) -> None:
        """When a joined SPICE channel's console ends, the channel ends with its reason and close code 1000 by default."""
        joined = Redemption(grant=GRANT, first=False, spice_session_id=7)
        start = [Opened(TOKEN), Redeemed(joined), Located(TARGET, spice=True), GuardAdmit(False), BackendConnected(), GuardEstablished()]
        book = self.play(start + [OwnerEnded(None, "backend closed", None)])
        self.assertEqual(book.of(RecordOutcome), [RecordOutcome(None, "console ended: backend closed")])
        self.assertEqual(book.of(CloseClient), [CloseClient(None, 1000)])


class LateArrivalTests(SessionTestsMixin, SynchronousTestCase):
    """
    What arrives after the end is a transition, not an error.
    """

    def test_leaseGrantedAfterEnd(self) -> None:
        """When a lease is granted after the browser went away, it is given back at once, and the outcome stays the only one."""
        book = self.play([Opened(TOKEN), Redeemed(REDEMPTION), Located(TARGET), ClientClosed(1000), Admitted(LEASE)], leases=1)
        self.assertEqual(book.last(), [ReleaseLease(LEASE)])

    def test_backendConnectedAfterEnd(self) -> None:
        """When the VM connection completes after the console ended, it is stopped."""
        book = self.play(TO_HANDSHAKING + [Terminate(), BackendConnected()], leases=1)
        self.assertEqual(book.last(), [StopBackend()])

    def test_everythingAfterEnd(self) -> None:
        """When any further input arrives after the end (a second close, timers, terminate, shutdown), no second outcome or release follows."""
        late = [ClientClosed(1000), TimerFired("idle", IDLE), TimerFired("connect"), Terminate(), Shutdown(),
                BackendLost(), GuardEstablished(), SetupFailed(error(ErrorCode.INTERNAL_ERROR))]  # fmt: skip
        book = self.play(TO_RELAYING + [Terminate()] + late, leases=1)
        self.assertIsInstance(book.session.state, Ended)

    def test_closingWaitsForClient(self) -> None:
        """When the console closes the browser's side, it is closing until the browser's close arrives, then ended."""
        book = Playbook(TO_RELAYING + [Shutdown()])
        self.assertIsInstance(book.session.state, Closing)
        book.session.handle(ClientClosed(1001))
        self.assertIsInstance(book.session.state, Ended)
