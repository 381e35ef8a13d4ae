"""
The listening port's guard against slow and numerous clients (issue #11).

Every connection is "pending" until it is an open console (the server has
written C{HTTP/1.1 101}): a pending connection has an absolute deadline for
its request (C{server.request_timeout}, from its first byte of TLS or HTTP
to the first byte of the answer; a keep-alive connection gets a fresh one
when its next request starts), however slowly it trickles bytes in; and
there are at most C{server.max_pending_connections} pending connections in
all and C{server.max_pending_per_client} from one client address.  Past a
cap the I{oldest} pending connection (of that address, or of all) is
aborted to make room: a flood of slow clients sheds its own connections and
a fresh client is still served, instead of being refused while the flood
holds every slot (and every file descriptor).

L{GuardFactory} wraps the listening factory (L{vaporproxy.ws.switch}), inside
TLS and the PROXY-header wrapper, so it sees plain bytes and, for a
C{haproxy:} endpoint, the client address the header gives (a connection is
counted against its address once its first byte arrives).

A console WebSocket leaves the wrapper as soon as the port switch has read
its request line (L{GuardedProtocol.step_aside}): its protocol writes to the
transport itself (one direct send for the 101 answer and the VM's greeting,
instead of a buffered write through the guard) and tells the guard what it
answers (L{GuardedProtocol.saw}) and when it closes
(L{GuardedProtocol.lost}), so deadline and caps hold as before.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, Optional

from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from vaporproxy.timers import timers_for

log = Logger(namespace="vaporproxy.guard")

#: Seconds between two log lines about shed connections.
LOG_EVERY = 10.0

#: The status line that makes a connection an open console.
_SWITCHING = b"HTTP/1.1 101 "
_INTERIM = b"HTTP/1.1 1"


def abort(transport: Any) -> None:
    """
    Abort C{transport} at once; a protocol wrapper without
    C{abortConnection} (the PROXY-header wrapper) is seen through to the
    transport under it.
    """
    while getattr(transport, "abortConnection", None) is None and getattr(transport, "transport", None) is not None:
        transport = transport.transport
    if getattr(transport, "abortConnection", None) is not None:
        transport.abortConnection()
    else:
        transport.loseConnection()


class GuardedProtocol(ProtocolWrapper):
    """
    One connection: pending (counted, with a deadline) until it is an open
    console.
    """

    pending = True
    client: Optional[str] = None
    _timer: Optional[IDelayedCall] = None
    _answered = False
    #: Out of the transport's path (L{step_aside}), still counting the connection.
    _aside = False

    def makeConnection(self, transport: Any) -> None:
        self._arm()
        super().makeConnection(transport)

    def _arm(self) -> None:
        self._disarm()
        factory: GuardFactory = self.factory  # type: ignore[assignment]
        self._timer = factory.timers.callLater(factory.request_timeout, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self.pending:
            log.debug("request deadline passed; connection from {client} closed", client=self.client or "?")
            self.shed()

    def shed(self) -> None:
        """
        Drop this connection at once (its descriptor is freed now).
        """
        self.factory.forget(self)
        abort(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self.pending:
            if self.client is None:
                self.factory.place(self)
            if self._answered:
                # The next request of a keep-alive connection: a fresh deadline.
                self._answered = False
                self._arm()
        self.wrappedProtocol.dataReceived(data)

    def saw(self, data: bytes) -> None:
        """
        C{data} is being written to the client (by the wrapped protocol, or
        by one that took the guard's place through L{step_aside}).
        """
        if not self.pending:
            return
        if data.startswith(_SWITCHING):
            self.pending = False
            self._disarm()
            self.factory.forget(self)
            if self._aside:
                self.factory.unregisterProtocol(self)
            else:
                self._step_out()
        elif not self._answered and not data.startswith(_INTERIM):
            # The answer has begun (a "100 Continue" is not one: the body is still to come).
            self._answered = True
            self._disarm()

    def _leave_path(self, protocol: Any) -> bool:
        """
        Put C{protocol} in the guard's place on the transport; C{False}
        for a transport the guard does not know (it then stays in the path).
        """
        transport = self.transport
        if isinstance(transport, ProtocolWrapper):
            if transport.wrappedProtocol is self:
                transport.wrappedProtocol = protocol
        elif getattr(transport, "protocol", None) is self:
            transport.protocol = protocol
        else:
            return False
        # Whatever still holds the guard (a timer, a producer) reaches the protocol.
        self.dataReceived = protocol.dataReceived  # type: ignore[method-assign]
        self.connectionLost = protocol.connectionLost  # type: ignore[method-assign]
        return True

    def _step_out(self) -> None:
        """
        An open console is no business of the guard's: put the wrapped
        protocol in the guard's place on the transport, and give it the
        transport itself, so the relay's bytes (and the bridge's direct
        writes to the socket) no longer pass through the guard.
        """
        protocol = self.wrappedProtocol
        if not self._leave_path(protocol):
            return  # an unknown transport: stay in the path
        protocol.transport = self.transport
        self.factory.unregisterProtocol(self)

    def step_aside(self, protocol: Any) -> Any:
        """
        The port switch hands the connection to a console WebSocket's
        C{protocol}: it takes the guard's place on the transport at once
        (answered here, for its C{makeConnection}; C{None} when the guard
        must stay in the path), and the guard, still counting the
        connection as pending with its deadline, learns the rest from
        C{protocol}: what it writes (L{saw}) and its end (L{lost}).
        """
        if not self._leave_path(protocol):
            return None
        self._aside = True
        return self.transport

    def lost(self) -> None:
        """
        The connection of a protocol that took the guard's place
        (L{step_aside}) is closed: no deadline, no slot.
        """
        if self.pending:  # (an open console was let go at its 101)
            self._disarm()
            self.factory.unregisterProtocol(self)

    def write(self, data: bytes) -> None:
        transport = self.transport
        self.saw(data)
        transport.write(data)

    def writeSequence(self, data: Any) -> None:
        data = list(data)
        transport = self.transport
        if data:
            self.saw(data[0])
        transport.writeSequence(data)

    def connectionLost(self, reason: Any) -> None:
        self._disarm()
        super().connectionLost(reason)


class GuardFactory(WrappingFactory):
    """
    Wraps the listening factory: deadlines and caps for pending connections
    (see the module docstring).  L{set_limits} applies a reloaded config.
    """

    protocol = GuardedProtocol
    noisy = False

    def __init__(self, wrapped: Any, clock: IReactorTime, *, request_timeout: float = 30.0,
                 max_pending: int = 512, max_pending_per_client: int = 128):  # fmt: skip
        super().__init__(wrapped)
        self.clock = clock
        self.timers = timers_for(clock)
        self.set_limits(request_timeout, max_pending, max_pending_per_client)
        #: Pending connections, oldest first (values unused).
        self._pending: "OrderedDict[GuardedProtocol, None]" = OrderedDict()
        #: Pending connections by client address, oldest first.
        self._by_client: Dict[str, "OrderedDict[GuardedProtocol, None]"] = {}
        #: Connections shed by a cap (for metrics and tests).
        self.shed_count = 0
        self._quiet_until = 0.0

    def set_limits(self, request_timeout: float, max_pending: int, max_pending_per_client: int) -> None:
        self.request_timeout = float(request_timeout)
        self.max_pending = int(max_pending)
        self.max_pending_per_client = int(max_pending_per_client)

    def logPrefix(self) -> str:
        prefix = getattr(self.wrappedFactory, "logPrefix", None)
        return prefix() if prefix is not None else self.wrappedFactory.__class__.__name__

    def pending_count(self, client: Optional[str] = None) -> int:
        if client is None:
            return len(self._pending)
        return len(self._by_client.get(client, ()))

    def buildProtocol(self, addr: IAddress) -> Any:
        while self.max_pending > 0 and len(self._pending) >= self.max_pending:
            self._shed_oldest(self._pending, "server.max_pending_connections")
        protocol = super().buildProtocol(addr)
        if protocol is not None:
            self._pending[protocol] = None
        return protocol

    def place(self, protocol: GuardedProtocol) -> None:
        """
        Count C{protocol} against its client address (its first byte has
        come, so a PROXY header has been read).
        """
        peer = protocol.transport.getPeer() if protocol.transport is not None else None
        client = str(getattr(peer, "host", None) or "local")
        protocol.client = client
        if protocol not in self._pending:
            return
        mine = self._by_client.get(client)
        while mine and 0 < self.max_pending_per_client <= len(mine):
            self._shed_oldest(mine, "server.max_pending_per_client")
        # (Shedding the last one forgets the address's queue: take it anew.)
        self._by_client.setdefault(client, OrderedDict())[protocol] = None

    def _shed_oldest(self, queue: "OrderedDict[GuardedProtocol, None]", cap: str) -> None:
        oldest = next(iter(queue))
        self.shed_count += 1
        now = self.clock.seconds()
        if now >= self._quiet_until:
            # At most one line per LOG_EVERY seconds, however hard the flood.
            self._quiet_until = now + LOG_EVERY
            log.warn("{cap} reached: oldest pending connections closed ({count} so far; last from {client})",
                     cap=cap, count=self.shed_count, client=oldest.client or "?")  # fmt: skip
        oldest.shed()

    def forget(self, protocol: GuardedProtocol) -> None:
        """
        C{protocol} is no longer pending (an open console, closed or shed).
        """
        self._pending.pop(protocol, None)
        if protocol.client is not None:
            mine = self._by_client.get(protocol.client)
            if mine is not None:
                mine.pop(protocol, None)
                if not mine:
                    del self._by_client[protocol.client]

    def unregisterProtocol(self, protocol: Any) -> None:
        self.forget(protocol)
        super().unregisterProtocol(protocol)
