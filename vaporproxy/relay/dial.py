"""
Dialling a VM's console: plain TCP, TLS from the first byte (SPICE
C{tlsPort}), a UNIX socket, or a socket libvirt hands over (no listener).

The bridge (and the guards) see the same plaintext stream either way: TLS
sits under the guard, so the SPICE guard reads the link messages and
injects the ticket as it does over plain TCP.

Which port a SPICE channel uses is known only once the guard has read its
link message (the channel type): the bridge dials after the guard's
C{admit}, passing the guard's C{channel_type}, and L{dial} asks the target
(C{ConsoleTarget.uses_tls}: libvirt's C{<channel mode>}, else
C{defaultMode}).  What the target is and where it is comes from
L{vaporproxy.vm.target}; this module only connects.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.tls import describe_connection_lost

log = Logger(namespace="vaporproxy.consoles")

#: The message of a TLS-only console when the hypervisor has no spice_tls.
NO_TLS_MESSAGE = "The console accepts only TLS and no spice_tls is configured for its host"


class _VMTLSProtocol(TLSMemoryBIOProtocol):
    """
    TLS towards a VM that logs why a handshake failed (an unverifiable
    certificate, a name mismatch, a VM that refused ours): the console
    itself ends with CONNECTION_FAILED (4006), which cannot say why.
    """

    def connectionLost(self, reason: Any) -> None:
        if not self._handshakeDone and self._tlsConnection is not None:
            # Twisted keeps the TLS error (or the failed verification) in
            # _reason and reports it in place of the transport's reason.
            log.warn(
                "TLS to the console at {where} failed: {why}",
                where=self.factory.where,
                why=describe_connection_lost(self._reason or reason),
            )
        super().connectionLost(reason)


class _VMTLSFactory(TLSMemoryBIOFactory):
    # Not Twisted's BufferingTLSTransport: the bridge writes whole WebSocket
    # payloads already, and holding them a reactor turn adds latency.
    protocol = _VMTLSProtocol
    noisy = False

    def __init__(self, creator: Any, factory: IProtocolFactory, where: str):
        super().__init__(creator, True, factory)
        self.where = where


class GraphicsHandOff:
    """
    The "connector" of a console that libvirt hands over as a connected
    socket (C{virDomainOpenGraphicsFD}): once the descriptor comes from the
    thread pool, the reactor adopts it and C{factory} gets its protocol as
    after a connect.
    """

    def __init__(self, reactor: Any, pending: Deferred, factory: Any):
        self._reactor = reactor
        self._factory = factory
        self._stopped = False
        pending.addCallbacks(self._adopt, self._failed)

    def _adopt(self, fd: int) -> None:
        try:
            if not self._stopped:
                # The reactor takes a duplicate: ours is closed below.
                self._reactor.adoptStreamConnection(fd, socket.AF_UNIX, self._factory)
        except Exception:
            self._failed(Failure())
        finally:
            os.close(fd)

    def _failed(self, failure: Failure) -> None:
        if not self._stopped:
            self._factory.clientConnectionFailed(self, failure)

    def stopConnecting(self) -> None:
        """Give up: a descriptor that comes later is closed unused."""
        self._stopped = True

    disconnect = stopConnecting


def dial(
    reactor: Any,
    target: Any,
    tls: Any,
    factory: IProtocolFactory,
    timeout: Optional[int] = None,
    channel_type: Optional[int] = None,
) -> Any:
    """
    Connect C{factory} to the console C{target}
    (L{vaporproxy.vm.target.ConsoleTarget}).

    @param tls: the hypervisor's loaded C{spice_tls} (from
        L{vaporproxy.vm.dial.spice_tls_by_uri}), or C{None}.
    @param timeout: the connect timeout in seconds, or C{None} for none
        (the bridge's own timer covers the dial).
    @param channel_type: the SPICE channel being opened (its link message
        type), for the per-channel choice of plain or TLS.
    @return: the connector (C{stopConnecting}, C{disconnect}); for a
        console with no listener a L{GraphicsHandOff}.
    @raise ConsoleError: NO_CONSOLE_AVAILABLE when the console needs TLS
        and C{tls} is C{None}, or lacks the port its mode needs.
    """
    g = target.graphics
    if target.hand_over or g.listen_type == "none":
        open_graphics = getattr(target.locator, "open_graphics", None)
        if open_graphics is None:
            raise ConsoleError(ErrorCode.NO_CONSOLE_AVAILABLE, "The console has no listener")
        return GraphicsHandOff(reactor, open_graphics(target), factory)
    if g.listen_type == "socket":
        return reactor.connectUNIX(target.address, factory, timeout=timeout)
    if g.type == "spice" and target.uses_tls(channel_type):
        if tls is None:
            raise ConsoleError(ErrorCode.NO_CONSOLE_AVAILABLE, NO_TLS_MESSAGE)
        where = f"{target.address}:{g.tls_port}"
        creator = tls.for_host(target.host or target.address).creator
        return reactor.connectTCP(target.address, g.tls_port, _VMTLSFactory(creator, factory, where), timeout=timeout)
    return reactor.connectTCP(target.address, g.port, factory, timeout=timeout)
