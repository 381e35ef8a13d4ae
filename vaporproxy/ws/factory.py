"""
The console WebSocket factory: the collaborators and the configuration of
the moment, and the guards each console gets.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from twisted.logger import Logger

from vaporproxy.config import Config, ConfigError
from vaporproxy.console.registry import ConsoleRegistry
from vaporproxy.relay.pipeline import stages_for
from vaporproxy.vm.dial import spice_tls_by_uri
from vaporproxy.ws.autobahn_compat import FastServerFactory
from vaporproxy.ws.channel import ConsoleWebSocketProtocol

__all__ = ["ConsoleBridgeFactory"]

log = Logger(namespace="vaporproxy.bridge")

#: Autobahn keep-alive and closing-handshake settings (seconds).
AUTO_PING_INTERVAL = 30.0
AUTO_PING_TIMEOUT = 30.0
CLOSE_HANDSHAKE_TIMEOUT = 5.0


def _rfb_guard(sink: Any, password: Optional[str], tls: Any = None) -> Any:
    from vaporproxy.guards.rfb import RFBGuard

    return RFBGuard(sink, password, tls=tls)


def _spice_guard(
    sink: Any, password: Optional[str], expected_session_id: Optional[int], hold_after_ticket: bool = False
) -> Any:
    from vaporproxy.guards.spice import SpiceGuard

    return SpiceGuard(sink, password, expected_session_id, hold_after_ticket)


class ConsoleBridgeFactory(FastServerFactory):
    """
    The console WebSocket factory: holds the collaborators and the current
    configuration; every connection takes the configuration of the moment
    it was accepted.

    @ivar vnc_guard: C{(sink, password[, tls=]) -> guard}; L{vaporproxy.guards.rfb.RFBGuard}.
    @ivar vnc_tls: C{{hypervisor URI: L{vaporproxy.guards.rfb.VncTLS}}} from the
        hypervisors' C{vnc_tls} sections (VeNCrypt towards their VMs).
    @ivar spice_guard: C{(sink, password, expected_session_id) -> guard};
        L{vaporproxy.guards.spice.SpiceGuard}.
    """

    protocol = ConsoleWebSocketProtocol

    def __init__(
        self,
        *,
        config: Config,
        token_store: Any,
        locator: Any,
        limiter: Any,
        host_policy: Any,
        registry: ConsoleRegistry,
        observer: Any,
        reactor: Any,
    ):
        super().__init__(server="vaporproxy", reactor=reactor)
        self.use_reactor(reactor)
        self.token_store = token_store
        self.locator = locator
        self.limiter = limiter
        self.host_policy = host_policy
        self.registry = registry
        self.observer = observer
        #: C{(grant, policy) -> stages} spliced in once a console relays.
        self.stages_for: Callable[..., Any] = stages_for
        #: The console policy's stages (L{vaporproxy.relay.planner.StagePlanner}),
        #: and the audit trail, when the service has them.
        self.planner: Any = None
        self.audit: Any = None
        self.vnc_guard: Callable[..., Any] = _rfb_guard
        self.spice_guard: Callable[..., Any] = _spice_guard
        self.config = config
        from vaporproxy.guards.rfb import vnc_tls_by_uri

        # Raises ConfigError at start-up when a certificate file is unusable.
        self.vnc_tls: Dict[str, Any] = vnc_tls_by_uri(config.hypervisors)
        self.spice_tls: Dict[str, Any] = spice_tls_by_uri(config.hypervisors)
        self._apply(config)

    def _apply(self, config: Config) -> None:
        console = config.console
        self.setProtocolOptions(
            maxFramePayloadSize=console.max_message_size,
            maxMessagePayloadSize=console.max_message_size,
            openHandshakeTimeout=console.connection_timeout,
            closeHandshakeTimeout=CLOSE_HANDSHAKE_TIMEOUT,
            autoPingInterval=AUTO_PING_INTERVAL,
            autoPingTimeout=AUTO_PING_TIMEOUT,
            perMessageCompressionAccept=lambda offers: None,
            # A GET without Upgrade is refused (426), not answered with
            # Autobahn's status page (its version, and a 303 to any
            # ?redirect= URL).
            webStatus=False,
        )

    def reload(self, config: Config) -> None:
        """
        Use C{config} (console limits, origins, trusted proxies) for new
        connections; live consoles keep theirs.
        """
        self.config = config
        self._apply(config)
        from vaporproxy.guards.rfb import vnc_tls_by_uri

        try:
            # Re-read, so renewed certificates are picked up on SIGHUP.
            self.vnc_tls = vnc_tls_by_uri(config.hypervisors)
            self.spice_tls = spice_tls_by_uri(config.hypervisors)
        except ConfigError as e:
            log.error("vnc_tls not reloaded, keeping the previous settings: {error}", error=str(e))
