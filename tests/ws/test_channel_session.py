"""
Tests for L{vaporproxy.ws.channel} as the adapter of the console's session
(L{vaporproxy.console.session}): late arrivals handled by the machine on a
real channel, the executor dropping the outputs a nested ending made moot,
and the registry's inputs.  Over L{iosim} with the harness of
L{tests.ws.test_bridge}.
"""

from __future__ import annotations

from typing import Any, List, get_args

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from vaporproxy.console import events
from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.ws.channel import ConsoleWebSocketProtocol
from tests.ws.test_bridge import VM_UUID, Harness, PassthroughGuard, error_of


class AbortRecordingTransport(StringTransport):
    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class HeldTokenStore:
    """The harness's token store, whose C{redeem} waits until the test fires it."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.waiting: List[Any] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def redeem(self, token: str, vm_ref: str, client_ip: Any) -> Deferred:
        outer: Deferred = Deferred()
        self.waiting.append((self.inner.redeem(token, vm_ref, client_ip), outer))
        return outer

    def release_waiting(self) -> None:
        for inner, outer in self.waiting:
            inner.chainDeferred(outer)
        self.waiting = []


class FailingGuard(PassthroughGuard):
    """A guard that refuses as it starts."""

    def start(self) -> None:
        raise ConsoleError(ErrorCode.BAD_REQUEST, "no")


class LateArrivalTests(SynchronousTestCase):
    """
    What arrives after a console ended is a transition of its session.
    """

    def test_lateRedemptionGoesNowhere(self) -> None:
        """When the token store answers after the browser left, the VM is not looked up and nothing is admitted or dialled."""
        h = Harness()
        token = h.token()
        held = h.factory.token_store = HeldTokenStore(h.tokens)
        conn = h.open(token)
        self.assertEqual(len(held.waiting), 1)
        conn.client.dropConnection(abort=True)
        conn.pump.flush()
        [outcome] = h.observer.outcomes
        self.assertIsNone(outcome.error)
        self.assertTrue(outcome.reason.startswith("client closed"), outcome.reason)
        lookups = h.locator.lookups
        held.release_waiting()  # the redemption arrives now: nothing follows
        self.assertEqual((h.locator.lookups, h.limiter.leases, h.reactor.tcpClients), (lookups, [], []))
        self.assertEqual(len(h.observer.outcomes), 1)

    def test_lateVmConnectionAborted(self) -> None:
        """When the VM connection completes after the console was terminated, it is aborted, and the lease was given back once."""
        h = Harness()
        conn = h.open(h.token())
        self.assertEqual(h.registry.terminate_vm(conn.server._redemption.grant.vm_uuid), 1)
        conn.pump.flush()
        self.assertEqual(error_of(conn)["code"], "SESSION_TERMINATED")
        host, port, factory, timeout, bind = h.reactor.tcpClients.pop(0)
        backend = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = AbortRecordingTransport()
        backend.makeConnection(transport)
        self.assertTrue(transport.aborted)
        self.assertEqual([lease.releases for lease in h.limiter.leases], [1])
        self.assertEqual(len(h.observer.outcomes), 1)


class ExecutorTests(SynchronousTestCase):
    """
    The outputs of one input are for the state it produced.
    """

    def test_everyOutputHasAnEffect(self) -> None:
        """When the channel class is built, every kind of session output has its method (none is left undone)."""
        self.assertEqual(set(ConsoleWebSocketProtocol._effects), set(get_args(events.Output)))

    def test_guardRefusesAsItStarts(self) -> None:
        """When the guard refuses as it starts, the console ends with its error and the dial that was to follow is never made."""
        h = Harness()
        h.factory.vnc_guard = FailingGuard
        conn = h.open(h.token())
        self.assertEqual(error_of(conn)["code"], "BAD_REQUEST")
        self.assertEqual(conn.closed[0], 4012)
        self.assertEqual(h.reactor.tcpClients, [])
        self.assertEqual([lease.releases for lease in h.limiter.leases], [1])
        [outcome] = h.observer.outcomes
        self.assertEqual((outcome.error, outcome.reason), ("BAD_REQUEST", "guard refused: BAD_REQUEST"))


class RegistryInputTests(SynchronousTestCase):
    """
    The registry ends consoles through their channel's inputs.
    """

    def test_revoke(self) -> None:
        """When a relaying console's credential is revoked, it closes with 4010 and its JSON error, reason "revoked", lease given back once."""
        h = Harness()
        conn = h.open(h.token())
        conn.connect_backend()
        self.assertTrue(conn.server.relaying)
        [record] = h.registry.consoles()
        record.owner.revoke()
        conn.pump.flush()
        self.assertEqual(error_of(conn)["code"], "SESSION_TERMINATED")
        self.assertEqual(conn.closed[0], 4010)
        [outcome] = h.observer.outcomes
        self.assertEqual((outcome.error, outcome.reason), ("SESSION_TERMINATED", "revoked"))
        self.assertEqual([lease.releases for lease in h.limiter.leases], [1])
        self.assertEqual(h.registry.consoles(), [])
        record.owner.revoke()  # a second time: a late input, nothing more
        self.assertEqual(len(h.observer.outcomes), 1)

    def test_whyInTheErrorText(self) -> None:
        """When a console is closed with 4010, its JSON error text says why: the VM's consoles ended by an administrator (C{terminate_vm}), its access revoked, or its share link revoked."""
        cases = [
            (lambda h, record: h.registry.terminate_vm(VM_UUID), "Console ended by an administrator", "terminated"),
            (lambda h, record: record.owner.revoke(), "Your access to this VM was revoked", "revoked"),
            (lambda h, record: record.owner.revoke(events.SHARE_REVOKED), "Share link revoked", "revoked: share link"),
        ]
        for end, text, reason in cases:
            h = Harness()
            conn = h.open(h.token())
            conn.connect_backend()
            [record] = h.registry.consoles()
            end(h, record)
            conn.pump.flush()
            self.assertEqual((error_of(conn), conn.closed[0]),
                             ({"type": "error", "code": "SESSION_TERMINATED", "error": text}, 4010))  # fmt: skip
            [outcome] = h.observer.outcomes
            self.assertEqual((outcome.error, outcome.reason), ("SESSION_TERMINATED", reason))

    def test_shareIdInStats(self) -> None:
        """When a console is opened through a share link, its registry entry names the share (the user is the share's creator); other consoles name none."""
        h = Harness()
        shared = h.open(h.token(key_id="share:5ea1"))
        own = h.open(h.token(key_id="key:alice"))
        by_id = {r.console_id: r.as_dict(0.0) for r in h.registry.consoles()}
        self.assertEqual(
            (by_id[shared.server.console_id]["share_id"], by_id[shared.server.console_id]["user"],
             by_id[own.server.console_id]["share_id"]),
            ("5ea1", "alice", None),
        )  # fmt: skip
