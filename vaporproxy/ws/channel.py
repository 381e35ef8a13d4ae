"""
One console WebSocket (browser side) and its lifecycle: open, token
redeemed, VM located, host checked, admitted, backend dialled (in
L{vaporproxy.relay.backend.dial}), guard handshake, relaying, closed.

The class is assembled from parts, one job each: Autobahn's internals
(L{vaporproxy.ws.autobahn_compat}), the byte path
(L{vaporproxy.ws.relay_path}), the guard's sink (L{vaporproxy.ws.guard_sink})
and, here, the lifecycle.  The factory is L{vaporproxy.ws.factory}.

Every way out goes through one method, L{ConsoleWebSocketProtocol._end}:
it records exactly one outcome (L{vaporproxy.console.outcome}), releases
the lease exactly once, stops both timers, tears down the backend and
closes the WebSocket (errors go out as the JSON text message then a
4000+n close frame, SPEC.md).  The same lifecycle as an I/O-free machine,
proven by playbooks, is L{vaporproxy.console.session}.

Flow control (DESIGN.md rule 3): once relaying, L{vaporproxy.relay.flow}
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
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from vaporproxy.console.outcome import build_outcome, record_outcome
from vaporproxy.console.registry import ConsoleRecord
from vaporproxy.errors import CLOSE_GOING_AWAY, ConsoleError, ErrorCode
from vaporproxy.http.request import client_ip_from, origin_allowed, request_secure, vm_ref_from_path
from vaporproxy.interfaces import Redemption
from vaporproxy.relay.backend import BackendProtocol
from vaporproxy.relay.flow import Flow
from vaporproxy.relay.pipeline import Pipeline
from vaporproxy.ws.autobahn_compat import STATE_CONNECTING, STATE_OPEN, FastServerProtocol
from vaporproxy.ws.frames import ClientFrameParser
from vaporproxy.ws.guard_sink import MAX_SPICE_CHANNELS, GuardSink
from vaporproxy.ws.relay_path import RelayPath
from vaporproxy.ws.setup_path import REQUIRE_TLS_MESSAGE, SetupPath
from vaporproxy.ws.stage_path import StagePath

__all__ = ["MAX_SPICE_CHANNELS", "REQUIRE_TLS_MESSAGE", "ConsoleWebSocketProtocol"]

log = Logger(namespace="vaporproxy.bridge")

_OPEN = STATE_OPEN
_CONNECTING = STATE_CONNECTING


def _cancel(call: Optional[IDelayedCall]) -> None:
    if call is not None and call.active():
        call.cancel()


# ---------------------------------------------------------------------------
# The browser side
# ---------------------------------------------------------------------------


class ConsoleWebSocketProtocol(SetupPath, RelayPath, GuardSink, StagePath, FastServerProtocol):
    """
    One console WebSocket, and the sink of its protocol guard.
    """

    factory: Any

    # Class defaults, so that every attribute exists before connectionMade.
    _finished = False
    _opened = False
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
    _held_size = 0
    _token: Optional[str] = None
    #: Whether the client's request came over TLS (L{request_secure}).
    _secure = False
    _vm_ref: Optional[str] = None
    _client_ip: Optional[str] = None
    _redemption: Optional[Redemption] = None
    _guard: Any = None
    _record: Optional[ConsoleRecord] = None
    _lease: Any = None
    _backend: Optional[BackendProtocol] = None
    #: The connector of the VM connection being made.
    _connecting: Any = None
    _connect_timer: Optional[IDelayedCall] = None
    _idle_timer: Optional[IDelayedCall] = None
    _spice_attached = False
    _located_forgotten = False
    _target: Any = None
    _console_type: Optional[str] = None
    #: The relay's frame parser, once it took over from Autobahn's.
    _parser: Optional[ClientFrameParser] = None
    #: The plain TCP transport of the VM that L{send_now} may write to.
    _backend_direct: Any = None

    # -- Twisted / Autobahn events ----------------------------------------

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.autobahn_connection_lost(reason)
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
        if not self._finished:
            return
        self._parser = None
        self._drop_guard()
        self._record = None
        self._ws_direct = self._backend_direct = None
        self._backend_write = None
        self.is_closed = self.is_open = None

    def connectionMade(self) -> None:
        factory = self.factory
        self._reactor = factory.reactor
        self._seconds = factory.reactor.seconds
        self._settings = factory.config
        self._console = factory.config.console
        # 32 random hex digits, as uuid4().hex without building a UUID.
        self.console_id = os.urandom(16).hex()
        self._started_at = self.last_activity = self._seconds()
        self._held: List[bytes] = []
        self._to_server: List[bytes] = []
        self.autobahn_connection_made()
        self._keep_handshake()
        if self._console.connection_timeout > 0:
            self._connect_timer = self._reactor.callLater(
                self._console.connection_timeout, self._connection_timed_out
            )

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
                self._end(ConsoleError(ErrorCode.UNAUTHORIZED), "origin not allowed")
                raise ConnectionDeny(403, "Origin not allowed")
            self._vm_ref = vm_ref_from_path(request.path)
            if self._vm_ref is None:
                self._end(ConsoleError(ErrorCode.BAD_REQUEST), "not a console path")
                raise ConnectionDeny(404, "Not found")
            tokens = request.params.get("token") or [None]
            self._token = tokens[0]
            self._client_ip = client_ip_from(peer_host, headers.get("x-forwarded-for"), server.trusted_proxies)
        finally:
            self._in_on_connect = False
        return "binary" if "binary" in request.protocols else None

    def onOpen(self) -> None:
        if self._finished:
            return
        self._opened = True
        # Reads go on while the token is redeemed and the VM dialled: what
        # the browser sends before the guard exists is held (at most
        # buffer_size), then the guard's handshake with the browser runs
        # alongside the dial (a VNC browser speaks only when spoken to).
        d = Deferred.fromCoroutine(self._setup())
        d.addErrback(self._setup_failed)

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        if self._opened:
            self._end(None, f"client closed (code {code})")
        else:
            self._end(None, "websocket handshake not completed")

    def _log_store_error(self, failure: Failure, what: str) -> None:
        log.failure(
            "console {console_id}: token store {what} failed",
            failure,
            console_id=self.console_id,
            what=what,
        )

    # -- timers ------------------------------------------------------------

    def _connection_timed_out(self) -> None:
        self._connect_timer = None
        if not self.relaying:
            self._end(ConsoleError(ErrorCode.CONNECTION_FAILED), "connection timeout")

    def _idle_check(self) -> None:
        """
        Fired C{idle_timeout} after the last re-arm: close if the console
        has been silent that long, else re-arm for the rest of the period.
        """
        self._idle_timer = None
        if self._finished:
            return
        idle = self._console.idle_timeout
        last = self._record.last_activity if self._record is not None else self.last_activity
        silent = self._seconds() - last
        if silent >= idle:
            self._end(ConsoleError(ErrorCode.IDLE_TIMEOUT), "idle timeout")
        else:
            self._idle_timer = self._reactor.callLater(idle - silent, self._idle_check)

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

    def terminate(self) -> None:
        """
        This console's VM had its consoles terminated (C{DELETE}): 4010.
        """
        self._end(ConsoleError(ErrorCode.SESSION_TERMINATED), "terminated")

    def shutdown(self) -> None:
        """
        The proxy is shutting down: close with 1001.
        """
        self._end(None, "shutdown", CLOSE_GOING_AWAY)

    # -- the one way out ---------------------------------------------------

    def _end(self, error: Optional[ConsoleError], reason: str, close_code: Optional[int] = None) -> None:
        """
        End this WebSocket: record the outcome (once), give the lease back
        (once), stop timers and the backend, close the WebSocket.

        @param error: the error to report to the client, or C{None}.
        @param reason: log-only description.
        @param close_code: for a close without error (1000, 1001), the
            close code to send; C{None} to send none (the client closed).
        """
        if self._finished:
            return
        if error is not None and error.code is ErrorCode.CONNECTION_FAILED:
            self._forget_located()
        self._finished = True
        self.relaying = False
        now = self._seconds() if self._started_at else 0.0
        self._stop_io()
        record = self._record
        if record is not None and record.owner is not self:
            record.leave(self)
        else:
            self._end_console(record, error, reason, close_code, now)
        self._close_client(error, close_code)

    def _stop_io(self) -> None:
        """
        Stop the timers, the guard, the dial, the relay and the backend.
        """
        _cancel(self._connect_timer)
        _cancel(self._idle_timer)
        self._connect_timer = self._idle_timer = None
        self._drop_guard()
        self._held = []
        if self._connecting is not None:
            connecting, self._connecting = self._connecting, None
            try:
                connecting.stopConnecting()
            except Exception:
                pass  # connected or failed meanwhile
        if self._flow is not None:
            flow, self._flow = self._flow, None
            flow.stop()
        self._stop_stages()
        if self._pipeline is not None:
            pipeline, self._pipeline = self._pipeline, None
            pipeline.close()
        if self._backend is not None:
            self._backend.transport.loseConnection()

    def _end_console(
        self, record: Optional[ConsoleRecord], error: Optional[ConsoleError], reason: str,
        close_code: Optional[int], now: float,
    ) -> None:  # fmt: skip
        """
        This WebSocket owns its console: unregister it, give the lease back
        (once), detach the SPICE session, record the one outcome, and end
        the channels that joined it.
        """
        others: List[ConsoleWebSocketProtocol] = []
        sent, received = self.bytes_sent, self.bytes_received
        if record is not None:
            self.factory.registry.remove(record)
            others = [c for c in record.channels if c is not self]
            sent, received = record.bytes_sent, record.bytes_received
        lease, self._lease = self._lease, None
        if lease is not None:
            try:
                lease.release()
            except Exception:
                log.failure("console {console_id}: lease release failed", console_id=self.console_id)
        if self._spice_attached and self._token is not None:
            self._spice_attached = False
            d = self.factory.token_store.detach_spice_session(self._token)
            d.addErrback(self._log_store_error, "detach_spice_session")
        self._record_outcome(error, reason, sent, received, now)
        self._finish_recording(record, error, sent)
        for other in others:
            other._end(error, f"console ended: {reason}", close_code if close_code else 1000)

    def _close_client(self, error: Optional[ConsoleError], close_code: Optional[int]) -> None:
        """
        Tell the browser (the error as JSON then its 4000+n code, or the
        plain close code), or drop a WebSocket that never opened.
        """
        if self.state == _OPEN:
            if error is not None:
                self.sendMessage(error.to_json().encode("utf-8"), isBinary=False)
                self.sendClose(error.code.close_code, error.code.name)
            elif close_code is not None:
                # sendClose() refuses 1001 (an application may not "go
                # away"); the proxy shutting down is exactly that.  The
                # reason is log-only: the client gets the code alone.
                self.sendCloseFrame(code=close_code, isReply=False)
        elif self.state == _CONNECTING and not self._in_on_connect and self.transport is not None:
            self.dropConnection(abort=True)
        self._resume_reading()

    def _record_outcome(
        self, error: Optional[ConsoleError], reason: str, sent: int, received: int, now: float
    ) -> None:
        grant = self._redemption.grant if self._redemption is not None else None
        outcome = build_outcome(self.console_id, grant, error, reason, sent, received, self._started_at, now)
        counted_here = not (self._record is not None and self._record.remote)
        record_outcome(
            outcome,
            self.factory.observer,
            vm_ref=self._vm_ref,
            token=self._token,
            client_ip=self._client_ip,
            counted_here=counted_here,
        )
        if counted_here:
            self._audit_closed(outcome, sent, received)
