"""
The VM side of a console: one TCP connection to the VM's VNC or SPICE
server, dialled in one place (L{dial}) so that other ways to reach a
console (TLS, UNIX sockets, libvirt's openGraphicsFD) change one function.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure

__all__ = ["BackendFactory", "BackendProtocol", "dial"]


class BackendProtocol(Protocol):
    """
    The connection to the VM for one WebSocket (C{console}: the channel,
    told C{backend_connected}, C{backend_data}, C{backend_lost}).
    """

    def __init__(self, console: Any):
        self.console = console

    def connectionMade(self) -> None:
        self.console.backend_connected(self)

    def dataReceived(self, data: bytes) -> None:
        console = self.console
        if console.relaying:
            # Hot path: no logging, no lookups beyond attributes.
            console.relay_from_vm(data)
        else:
            console.backend_setup_data(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        # The console and this protocol refer to each other; this side is
        # done with it (no reference cycle left for the garbage collector).
        console, self.console = self.console, None
        if console is not None:
            console.backend_lost(self, reason)


class BackendFactory(ClientFactory):
    """
    The VM connection's factory, given to C{reactor.connectTCP} directly
    (no endpoint: no Deferred plumbing and no wrapping protocol between the
    socket and L{BackendProtocol} on every read).
    """

    #: One factory per console: no "Starting/Stopping factory" log lines.
    noisy = False

    def __init__(self, console: Any):
        self.console = console

    def buildProtocol(self, addr: Any) -> BackendProtocol:
        return BackendProtocol(self.console)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        console, self.console = self.console, None
        if console is not None:
            console.dial_failed(reason)

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        """
        The VM connection is over (its protocol was told first): let go of
        the console, and of the transport, which Twisted's connector and
        transport otherwise keep in a reference cycle.
        """
        self.console = None
        connector.transport = None


def dial(reactor: Any, target: Any, console: Any, timeout: Optional[int], tls: Any = None,
         channel: Optional[int] = None) -> Any:  # fmt: skip
    """
    Connect to the VM console C{target} (L{vaporproxy.vm.target.ConsoleTarget}:
    an address literal or a socket path the host policy allowed, or
    libvirt's hand-over) for C{console}, over TLS when the SPICE C{channel}
    needs it; answer the connector (C{stopConnecting} cancels).
    """
    from vaporproxy.relay.dial import dial as dial_target

    return dial_target(reactor, target, tls, BackendFactory(console), timeout, channel)
