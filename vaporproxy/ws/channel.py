"""
One console WebSocket (browser side): the adapter of the console's state
machine (L{vaporproxy.console.session}, DESIGN.md rule 3, issue #8).

The machine is the lifecycle: open, token redeemed, VM located, host
checked, admitted, backend dialled, guard handshake, relaying, closed, and
every way out.  This class turns what happens into its inputs (Autobahn's
open and close, the browser's text messages and framing errors, the
timers, the registry's terminate, shutdown and revoke, and, through its
parts, the stores' answers, the VM connection's and the guard's events)
and carries out the outputs it answers (L{vaporproxy.ws.effects}).  It
checks no "finished" flag: an event that arrives late is a transition of
the machine (usually to nothing; a lease granted late is given back).

The class is assembled from parts, one job each: Autobahn's internals
(L{vaporproxy.ws.autobahn_compat}), the executor and the ending
(L{vaporproxy.ws.effects}), the set-up (L{vaporproxy.ws.setup_path}), the
byte path (L{vaporproxy.ws.relay_path}), the guard's sink and the splice
(L{vaporproxy.ws.guard_sink}) and the policy stages
(L{vaporproxy.ws.stage_path}).  The factory is L{vaporproxy.ws.factory}.

Every ending records exactly one outcome (L{vaporproxy.console.outcome}),
releases the lease exactly once, stops both timers, tears down the backend
and closes the WebSocket (errors go out as the JSON text message then a
4000+n close frame, SPEC.md): the machine's C{_finish} says so, the
playbooks prove it.

Flow control (DESIGN.md rule 5): once relaying, L{vaporproxy.relay.flow}
pauses each direction at C{buffer_size} and resumes at half.

SPICE (DESIGN.md rule 7): the WebSocket that consumes the token is the main
channel and owns the console (and its lease); later WebSockets presenting
the same token join that console without a lease once the SPICE guard has
checked their session id.
"""

from __future__ import annotations

import os
from typing import Any, List, Optional

from autobahn.websocket.types import ConnectionDeny
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from vaporproxy.console.events import (
    REVOKED, SHUTDOWN, TERMINATE, ClientClosed, Opened, OwnerEnded, Revoked, SetupFailed, Terminate,
)  # fmt: skip
from vaporproxy.console.registry import ConsoleRecord
from vaporproxy.console.session import Session
from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.http.request import client_ip_from, origin_allowed, request_secure, vm_ref_from_path
from vaporproxy.interfaces import Redemption
from vaporproxy.relay.backend import BackendProtocol
from vaporproxy.relay.flow import Flow
from vaporproxy.relay.pipeline import Pipeline
from vaporproxy.ws.autobahn_compat import FastServerProtocol
from vaporproxy.ws.effects import Effects
from vaporproxy.ws.frames import ClientFrameParser
from vaporproxy.ws.guard_sink import MAX_SPICE_CHANNELS, GuardSink
from vaporproxy.ws.relay_path import RelayPath
from vaporproxy.ws.setup_path import REQUIRE_TLS_MESSAGE, SetupPath
from vaporproxy.ws.stage_path import StagePath

__all__ = ["MAX_SPICE_CHANNELS", "REQUIRE_TLS_MESSAGE", "ConsoleWebSocketProtocol"]

log = Logger(namespace="vaporproxy.bridge")


class ConsoleWebSocketProtocol(Effects, SetupPath, RelayPath, GuardSink, StagePath, FastServerProtocol):
    """
    One console WebSocket, the adapter of its session, and the sink of its
    protocol guard.
    """

    factory: Any

    # Class defaults, so that every attribute exists before connectionMade.
    #: The console's lifecycle (L{vaporproxy.console.session.Session}).
    _session: Optional[Session] = None
    #: The WebSocket opened (the relay's frame parser may take over).
    _opened = False
    #: The byte route: the VM's bytes go to the browser as relayed bytes.
    relaying = False
    _in_on_connect = False
    _reads_paused = False
    #: The relay's stages, while relaying (C{None}: bytes go straight).
    _pipeline: Optional[Pipeline] = None
    #: The relay's flow control, while relaying.
    _flow: Optional[Flow] = None
    bytes_sent = 0
    bytes_received = 0
    last_activity = 0.0
    _started_at = 0.0
    #: What the browser sent before the guard existed (C{None} once the
    #: console ended: nothing more is held).
    _held: Optional[List[bytes]] = None
    _held_size = 0
    #: What the guard sent the VM before it was connected (made on first use).
    _to_server: Optional[List[bytes]] = None
    _token: Optional[str] = None
    #: Whether the client's request came over TLS (L{request_secure}).
    _secure = False
    _vm_ref: Optional[str] = None
    _client_ip: Optional[str] = None
    _redemption: Optional[Redemption] = None
    _guard: Any = None
    _record: Optional[ConsoleRecord] = None
    _backend: Optional[BackendProtocol] = None
    #: The connector of the VM connection being made.
    _connecting: Any = None
    _connect_timer: Optional[IDelayedCall] = None
    _idle_timer: Optional[IDelayedCall] = None
    _spice_attached = False
    _console_type: Optional[str] = None
    #: The relay's frame parser, once it took over from Autobahn's.
    _parser: Optional[ClientFrameParser] = None
    #: The plain TCP transport of the VM that L{send_now} may write to.
    _backend_direct: Any = None

    # -- Twisted / Autobahn events ----------------------------------------

    def connectionMade(self) -> None:
        factory = self.factory
        self._reactor = factory.reactor
        self._seconds = factory.reactor.seconds
        self._settings = factory.config
        self._console = console = factory.config.console
        self._session = Session(console.idle_timeout)
        # 32 random hex digits, as uuid4().hex without building a UUID.
        self.console_id = os.urandom(16).hex()
        self._started_at = self.last_activity = self._seconds()
        self._held = []
        self.autobahn_connection_made()
        self._keep_handshake()
        if console.connection_timeout > 0:
            self._connect_timer = factory.timers.callLater(console.connection_timeout, self._connection_timed_out)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.autobahn_connection_lost(reason)  # onClose: the session ends
        if self._session.live:
            self._input(ClientClosed(None))  # (should Autobahn not have said so)
        self._release()

    def _release(self) -> None:
        """
        The browser's connection is gone and the console has ended: drop
        the references that tie this console's objects into cycles (the
        relay parser's bound methods, the console record's owner, the
        guard, Autobahn's C{is_closed} resolved with this protocol), so
        that they are freed at once rather than by the cyclic garbage
        collector, whose passes over every console's leftovers were a
        visible share of a console's set-up cost (issue #3).
        """
        self._parser = None
        self._drop_guard()
        self._record = None
        self._ws_direct = self._backend_direct = None
        self._backend_write = None
        self.is_closed = self.is_open = None

    def onConnect(self, request: Any) -> Optional[str]:
        """
        Check the origin, pick the subprotocol, remember VM, token and
        client address.  Console errors are reported after the WebSocket
        opens; only a foreign origin or a wrong path is refused here.
        """
        self._in_on_connect = True
        try:
            headers = request.headers
            server = self._settings.server
            peer = self.transport.getPeer()
            peer_host = getattr(peer, "host", "") or ""
            self._secure = request_secure(
                self.transport, peer_host, headers.get("x-forwarded-proto"), server.trusted_proxies
            )
            if not origin_allowed(
                headers.get("origin"), headers.get("host"), server.allowed_origins, secure=self._secure
            ):
                self._input(SetupFailed(ConsoleError(ErrorCode.UNAUTHORIZED), "origin not allowed"))
                raise ConnectionDeny(403, "Origin not allowed")
            self._vm_ref = vm_ref_from_path(request.path)
            if self._vm_ref is None:
                self._input(SetupFailed(ConsoleError(ErrorCode.BAD_REQUEST), "not a console path"))
                raise ConnectionDeny(404, "Not found")
            tokens = request.params.get("token") or [None]
            self._token = tokens[0]
            self._client_ip = client_ip_from(peer_host, headers.get("x-forwarded-for"), server.trusted_proxies)
        finally:
            self._in_on_connect = False
        return "binary" if "binary" in request.protocols else None

    def onOpen(self) -> None:
        """
        Reads go on while the token is redeemed and the VM dialled: what
        the browser sends before the guard exists is held (at most
        buffer_size), then the guard's handshake with the browser runs
        alongside the dial (a VNC browser speaks only when spoken to).
        console.enable_tls: consoles only over TLS (the connection itself,
        or a trusted proxy's X-Forwarded-Proto: https).
        """
        self._opened = True
        self._answer(Opened(self._token, self._secure or not self._console.enable_tls))

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        self._input(ClientClosed(code))

    def _log_store_error(self, failure: Failure, what: str) -> None:
        log.failure(
            "console {console_id}: token store {what} failed",
            failure,
            console_id=self.console_id,
            what=what,
        )

    # -- reading control ---------------------------------------------------

    def _pause_reading(self) -> None:
        if not self._reads_paused and self.transport is not None:
            self._reads_paused = True
            self.transport.pauseProducing()

    def _resume_reading(self) -> None:
        if self._reads_paused and self.transport is not None:
            self._reads_paused = False
            self.transport.resumeProducing()

    # -- inputs from the registry ------------------------------------------

    def terminate(self, message: Optional[str] = None) -> None:
        """
        This console's VM had its consoles terminated (C{DELETE}): 4010;
        C{message} is what the browser reads (default: an administrator).
        """
        self._input(TERMINATE if message is None else Terminate(message))

    def shutdown(self) -> None:
        """The proxy is shutting down: close with 1001."""
        self._input(SHUTDOWN)

    def revoke(self, message: Optional[str] = None) -> None:
        """
        The credential or share that minted this console's token was
        revoked: 4010; C{message} is what the browser reads.
        """
        self._input(REVOKED if message is None else Revoked(message))

    def owner_ended(self, error: Optional[ConsoleError], reason: str, code: Optional[int]) -> None:
        """SPICE: the console this channel joined ended (its main channel)."""
        self._input(OwnerEnded(error, reason, code))
