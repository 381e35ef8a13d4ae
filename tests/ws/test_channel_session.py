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
from tests.ws.test_bridge import Harness, PassthroughGuard, error_of


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
