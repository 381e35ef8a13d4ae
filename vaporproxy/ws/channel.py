"""
The console bridge: one browser WebSocket relayed to one VM's VNC or SPICE
TCP port.

L{ConsoleBridgeFactory} is an Autobahn L{WebSocketServerFactory} (mounted
through L{autobahn.twisted.resource.WebSocketResource} by the HTTP API).
Each WebSocket is a L{ConsoleWebSocketProtocol}; its VM side is a
L{BackendProtocol} dialled with the injected reactor.

Lifecycle of one console (DESIGN.md rule 4)::

    open -> token redeemed -> VM located -> host checked -> admitted
         -> backend connecting -> guard handshake -> relaying -> closed

Every way out goes through one method, L{ConsoleWebSocketProtocol._end}:
it records exactly one L{Outcome}, releases the lease exactly once, stops
both timers, tears down the backend and closes the WebSocket (errors go out
as the JSON text message then a 4000+n close frame, SPEC.md).

Flow control (DESIGN.md rule 3): once relaying, the two transports are
registered as streaming producers of each other, with C{buffer_size} as the
high-water mark, so a browser that stops reading pauses reads from the VM.

The relay's hot path (issue #3): once relaying, the browser's frames are
read by L{vaporproxy.ws.frames.ClientFrameParser} instead of Autobahn's
general parser (control frames still go to Autobahn's handling: pong,
auto-ping, closing handshake), and on plain TCP both directions write to
the socket at once when nothing is buffered (L{send_now}); what the kernel
does not take is buffered by the transport, under the same high-water mark.

SPICE (DESIGN.md rule 7): the WebSocket that consumes the token is the main
channel and owns the console (and its lease); later WebSockets presenting
the same token join that console without a lease once the SPICE guard has
checked their session id.
"""

from __future__ import annotations

import os
import struct
from typing import Any, Callable, Dict, List, Optional

from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from vaporproxy.config import Config, ConfigError
from vaporproxy.console.outcome import build_outcome, record_outcome
from vaporproxy.console.registry import ConsoleRecord, ConsoleRegistry
from vaporproxy.errors import CLOSE_GOING_AWAY, ConsoleError, ErrorCode
from vaporproxy.http.request import client_ip_from, origin_allowed, request_secure, vm_ref_from_path
from vaporproxy.interfaces import Redemption
from vaporproxy.relay.backend import BackendProtocol, dial
from vaporproxy.relay.fastwrite import high_water
from vaporproxy.relay.flow import Flow
from vaporproxy.relay.pipeline import Pipeline, build, stages_for
from vaporproxy.vm.libvirt import dial_host, select_console
from vaporproxy.ws.autobahn_compat import (
    STATE_CLOSED,
    STATE_CONNECTING,
    STATE_OPEN,
    FastServerFactory,
    FastServerProtocol,
)
from vaporproxy.ws.frames import ClientFrameParser, direct_writer, send_now

__all__ = [
    "MAX_SPICE_CHANNELS",
    "ConsoleBridgeFactory",
    "ConsoleWebSocketProtocol",
]

log = Logger(namespace="vaporproxy.bridge")

#: Autobahn keep-alive and closing-handshake settings (seconds).
AUTO_PING_INTERVAL = 30.0
AUTO_PING_TIMEOUT = 30.0
CLOSE_HANDSHAKE_TIMEOUT = 5.0

#: The largest opening handshake (request line and headers) accepted: as
#: twisted.web's request line plus headers (C{HTTPChannel.MAX_LENGTH} and
#: C{totalHeadersSize}).
MAX_HANDSHAKE_SIZE = 2 * 16384

#: The most WebSockets (channels, the main one included) one SPICE console
#: may have in this process: spice-html5 opens 4 (6 with sound), usbredir
#: adds more.  Later channels join without a lease, so without this cap one
#: token could open any number of VM connections while its console lives.
#: Channels of a console whose main channel is in another process are
#: capped the same way, per token and session, in this process.
MAX_SPICE_CHANNELS = 16

#: What a console WebSocket in clear is told when C{console.enable_tls} is
#: on (UNAUTHORIZED, 4008).
REQUIRE_TLS_MESSAGE = "console connections require TLS"

_OPEN = STATE_OPEN
_CONNECTING = STATE_CONNECTING

_HEADER_SHORT = struct.Struct("!BB").pack
_HEADER_MEDIUM = struct.Struct("!BBH").pack
_HEADER_LONG = struct.Struct("!BBQ").pack


def _cancel(call: Optional[IDelayedCall]) -> None:
    if call is not None and call.active():
        call.cancel()


# ---------------------------------------------------------------------------
# The browser side
# ---------------------------------------------------------------------------


class ConsoleWebSocketProtocol(FastServerProtocol):
    """
    One console WebSocket, and the sink of its protocol guard.
    """

    factory: "ConsoleBridgeFactory"

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

    def dataReceived(self, data: bytes) -> None:
        """
        Bytes from the browser: through the relay's frame parser once
        relaying, else through Autobahn.
        """
        parser = self._parser
        if parser is not None:
            parser.feed(data)
            return
        if self._opened and self.parser_between_messages():
            # The WebSocket is open and Autobahn's parser is between
            # messages (what it holds is at most part of the next frame
            # header): ours takes over, for the guard's handshake too.
            parser = self._parser = ClientFrameParser(
                self._console.max_message_size,
                self._relay_data,
                self.control_frame,
                self._relay_text,
                self._relay_error,
            )
            held = self.take_unparsed()
            parser.feed(held + data if held else data)
            return
        if self.state == _CONNECTING and self.handshake_buffered() + len(data) > MAX_HANDSHAKE_SIZE:
            # Autobahn buffers an opening handshake without a bound; this is
            # twisted.web's (whose parsing the listening port's switch skips).
            self.clear_handshake()
            self.failHandshake("Request header fields too large", 431)
            return
        self.autobahn_feed(data)

    # -- the relay parser's callbacks ---------------------------------------

    def _relay_data(self, payload: bytes) -> None:
        if self._finished:
            return
        if not self.relaying:
            # The guard's handshake (or held until the guard exists).
            self._setup_message(payload, True)
            self.traffic_seen()
            return
        self.bytes_received += len(payload)
        self.last_activity = self._seconds()
        pipeline = self._pipeline
        if pipeline is not None:
            payload = pipeline.to_vm(payload)
            if not payload:
                self.traffic_seen()
                return
        direct = self._backend_direct
        if direct is not None:
            send_now(direct, (payload,))
        else:
            self._backend_write(payload)
        self.traffic_seen()

    def _relay_text(self) -> None:
        if not self._finished:
            self._end(ConsoleError(ErrorCode.BAD_REQUEST, "Console streams are binary"), "text message")

    def _relay_error(self, code: int, reason: str) -> None:
        """
        The browser broke the protocol (1002) or a size cap (1009): close
        with that code and drop the connection, whose framing is lost.
        """
        self._end(None, f"websocket protocol error: {reason}", code)
        if self.state != STATE_CLOSED:
            self.dropConnection(abort=False)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.relaying and isBinary:
            # Hot path.
            self.bytes_received += len(payload)
            self.last_activity = self._seconds()
            if self._pipeline is not None:
                payload = self._pipeline.to_vm(payload)
            if payload:
                self._backend_write(payload)
            return
        self._setup_message(payload, isBinary)

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        if self._opened:
            self._end(None, f"client closed (code {code})")
        else:
            self._end(None, "websocket handshake not completed")

    # -- setup -------------------------------------------------------------

    async def _setup(self) -> None:
        """
        Redeem the token, find and check the console, then start the guard
        (VNC: admit and dial at once; SPICE: wait for the guard's admit).
        """
        if self._console.enable_tls and not self._secure:
            # console.enable_tls: consoles only over TLS (the connection
            # itself, or a trusted proxy's X-Forwarded-Proto: https); the
            # token is not redeemed.
            raise ConsoleError(ErrorCode.UNAUTHORIZED, REQUIRE_TLS_MESSAGE)
        token = self._token
        if not token:
            raise ConsoleError(ErrorCode.INVALID_TOKEN)
        factory = self.factory
        redemption = await factory.token_store.redeem(token, self._vm_ref, self._client_ip)
        if self._finished:
            return
        self._redemption = redemption
        grant = redemption.grant
        self._console_type = grant.console_type
        vm = await factory.locator.locate(grant.vm_uuid)
        if self._finished:
            return
        graphics = select_console(vm, grant.console_type, grant.display)
        host = dial_host(vm, graphics)
        address = await factory.host_policy.resolve(host)
        if self._finished:
            return
        self._target = (address, graphics.port)
        if graphics.type == "vnc":
            if not await self._admit_owner():
                return
            vnc_tls = factory.vnc_tls.get(vm.hypervisor)
            if vnc_tls is None:
                self._guard = factory.vnc_guard(self, graphics.password)
            else:
                self._guard = factory.vnc_guard(self, graphics.password, tls=vnc_tls.for_host(host))
            self._guard_call("start")
            # The 101 and the guard's greeting leave now, before the dial.
            self.uncork()
            self._feed_held()
            self._dial()
        else:
            expected = None if redemption.first else redemption.spice_session_id
            self._guard = factory.spice_guard(self, graphics.password, expected)
            self._guard_call("start")
            self._feed_held()
            if not self._finished and self._connecting is None and self._backend is None:
                # The link message is needed before admission.
                self._resume_reading()

    async def _admit_owner(self) -> bool:
        """
        Take a lease and register this WebSocket as a console; C{False} when
        the console ended meanwhile (the lease is then given back here).
        """
        grant = self._redemption.grant  # type: ignore[union-attr]
        try:
            lease = await self.factory.limiter.acquire(grant.vm_uuid, self.console_id)
        except ConsoleError as e:
            if e.code is ErrorCode.MAX_CONNECTIONS_REACHED:
                self._unspend()
            raise
        if self._finished:
            lease.release()
            return False
        self._lease = lease
        self._record = ConsoleRecord(
            self.console_id, grant.vm_uuid, grant.console_type, grant.user, self._started_at, self
        )
        self.factory.registry.add(self._record)
        return True

    def _unspend(self) -> None:
        """
        Refused for lack of a slot (4007): the token is not spent, the
        browser may retry until it expires (SPEC.md "Hostile clients"), with
        a store that can give a redemption back (C{unredeem}).
        """
        unredeem = getattr(self.factory.token_store, "unredeem", None)
        if unredeem is None or self._token is None or not self._redemption.first:  # type: ignore[union-attr]
            return
        d = unredeem(self._token)
        d.addErrback(self._log_store_error, "unredeem")

    def _setup_failed(self, failure: Failure) -> None:
        if failure.check(ConsoleError):
            error = failure.value
            self._end(error, f"setup failed: {error.code.name}")
        elif failure.check(CancelledError):
            self._end(ConsoleError(ErrorCode.CONNECTION_FAILED), "setup cancelled")
        else:
            log.failure("console {console_id} setup failed", failure, console_id=self.console_id)
            self._end(ConsoleError(ErrorCode.INTERNAL_ERROR), "internal error during setup")

    def _setup_message(self, payload: bytes, isBinary: bool) -> None:
        if self._finished:
            return
        if not isBinary:
            self._end(ConsoleError(ErrorCode.BAD_REQUEST, "Console streams are binary"), "text message")
            return
        self.bytes_received += len(payload)
        self.last_activity = self._seconds()
        if self._guard is None:
            self._held.append(payload)
            self._held_size += len(payload)
            if self._held_size > self._console.buffer_size:
                self._end(
                    ConsoleError(ErrorCode.BAD_REQUEST, "Too much data before the console was ready"),
                    "setup buffer overflow",
                )
            return
        self._guard_call("client_data", payload)

    def _feed_held(self) -> None:
        held, self._held, self._held_size = self._held, [], 0
        for chunk in held:
            if self._finished:
                return
            self._guard_call("client_data", chunk)

    def _drop_guard(self) -> None:
        """
        Done with the guard: tell it (C{close}, when it has one) so that it
        stops its parsers, and forget it.
        """
        guard, self._guard = self._guard, None
        close = getattr(guard, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                log.failure("console {console_id}: guard close failed", console_id=self.console_id)

    def _guard_call(self, method: str, *args: Any) -> None:
        if self._finished or self._guard is None:
            return
        try:
            getattr(self._guard, method)(*args)
        except ConsoleError as e:
            self._forget_located()
            self._end(e, f"guard refused: {e.code.name}")
        except Exception:
            log.failure("console {console_id}: guard error", console_id=self.console_id)
            self._end(ConsoleError(ErrorCode.INTERNAL_ERROR), "guard error")

    def _dial(self) -> None:
        if self._finished:
            return
        # The connection timer (connectionMade) ends the console at the
        # deadline, the dial included; the connector needs a timeout of its
        # own only without one (one timer fewer per console).
        timeout: Optional[int] = None
        if self._connect_timer is None:
            remaining = self._console.connection_timeout - (self._seconds() - self._started_at)
            timeout = max(1, int(remaining + 0.999))
        self._connecting = dial(self._reactor, self._target, self, timeout)

    def dial_failed(self, failure: Failure) -> None:
        self._connecting = None
        if self._finished:
            # Stopped by _end (or the console ended meanwhile).
            return
        self._end(
            ConsoleError(ErrorCode.CONNECTION_FAILED),
            f"backend connect failed: {failure.type.__name__}",
        )

    def backend_connected(self, backend: BackendProtocol) -> None:
        self._connecting = None
        if self._finished:
            backend.transport.abortConnection()
            return
        self._backend = backend
        self._backend_direct = direct_writer(backend.transport)
        high_water(backend.transport, self._console.buffer_size)
        if self._to_server:
            backend.transport.writeSequence(self._to_server)
            self._to_server = []
        self._resume_reading()
        self._guard_call("server_connected")

    def backend_setup_data(self, data: bytes) -> None:
        self._guard_call("server_data", data)

    def relay_from_vm(self, data: bytes) -> None:
        """
        Hot path: the VM's bytes while relaying, as one binary message.
        """
        self.bytes_sent += len(data)
        self.last_activity = self._seconds()
        pipeline = self._pipeline
        if pipeline is not None:
            data = pipeline.to_browser(data)
            if not data:
                return
        self._send_binary(data)

    def backend_lost(self, backend: BackendProtocol, reason: Optional[Failure] = None) -> None:
        if self._finished:
            return
        if self.relaying:
            self._end(None, "backend closed", 1000)
        else:
            if getattr(self._guard, "server_lost", None) is not None:
                # The RFB guard fails with why (e.g. the TLS handshake failed).
                self._guard_call("server_lost", reason)
            self._end(ConsoleError(ErrorCode.CONNECTION_FAILED), "backend closed during handshake")

    # -- the guard's sink --------------------------------------------------

    def send_to_client(self, data: bytes) -> None:
        if self._finished or not data:
            return
        self.bytes_sent += len(data)
        self._send_binary(data)

    def send_to_server(self, data: bytes) -> None:
        if self._finished or not data:
            return
        if self._backend is None:
            self._to_server.append(data)
        elif self._backend_direct is not None:
            send_now(self._backend_direct, (data,))
        else:
            self._backend.transport.write(data)

    def start_tls(self, creator: Any) -> None:
        """
        VeNCrypt: TLS on the VM connection from here on (the guard sends
        nothing more until the VM has spoken inside it).
        """
        if self._finished or self._backend is None:
            return
        # From now on every byte to the VM goes through the TLS layer.
        self._backend_direct = None
        self._backend.transport.startTLS(creator)

    def admit(self, is_main: bool) -> None:
        """
        SPICE: the link message was read; the main channel takes a lease,
        a later channel joins its console; then dial.
        """
        if self._finished or self._redemption is None:
            return
        if is_main != self._redemption.first:
            # The SPICE guard's code for a link that does not match the
            # token's use (a second main channel, a first use not main).
            self._end(ConsoleError(ErrorCode.TOKEN_ALREADY_USED), "spice channel does not match the token's use")
            return
        self._pause_reading()
        if is_main:
            d = Deferred.fromCoroutine(self._admit_and_dial())
            d.addErrback(self._setup_failed)
        elif self._channel_cap_reached():
            self._end(
                ConsoleError(ErrorCode.MAX_CONNECTIONS_REACHED, "Too many channels for this console"),
                f"spice console already has {MAX_SPICE_CHANNELS} channels",
            )
        else:
            self._join()
            self._dial()

    def _channel_cap_reached(self) -> bool:
        """
        Whether the SPICE console this later channel would join already has
        L{MAX_SPICE_CHANNELS} channels in this process.
        """
        session_id = self._redemption.spice_session_id  # type: ignore[union-attr]
        if session_id is None:
            return False
        vm_uuid = self._redemption.grant.vm_uuid  # type: ignore[union-attr]
        return self.factory.registry.spice_channels(vm_uuid, session_id) >= MAX_SPICE_CHANNELS

    async def _admit_and_dial(self) -> None:
        if await self._admit_owner():
            self._dial()

    def _join(self) -> None:
        grant = self._redemption.grant  # type: ignore[union-attr]
        session_id = self._redemption.spice_session_id  # type: ignore[union-attr]
        record = None
        if session_id is not None:
            record = self.factory.registry.find_spice(grant.vm_uuid, session_id)
        if record is not None:
            record.join(self)
            self._record = record
        else:
            # The main channel lives on another node: this channel stands
            # for the console here (without a lease: limits count consoles).
            self._record = ConsoleRecord(
                self.console_id, grant.vm_uuid, grant.console_type, grant.user, self._started_at, self
            )
            self._record.spice_session_id = session_id
            self._record.remote = True
            self.factory.registry.add(self._record)

    def spice_session(self, session_id: int) -> None:
        if self._finished or self._record is None or self._token is None:
            return
        self._record.spice_session_id = session_id
        self._spice_attached = True
        d = self.factory.token_store.attach_spice_session(self._token, session_id)
        d.addErrback(self._log_store_error, "attach_spice_session")

    def _log_store_error(self, failure: Failure, what: str) -> None:
        log.failure(
            "console {console_id}: token store {what} failed",
            failure,
            console_id=self.console_id,
            what=what,
        )

    def established(self) -> None:
        """
        The guard's handshake is over: relay raw bytes with flow control.
        """
        if self._finished or self._backend is None:
            return
        self._drop_guard()
        _cancel(self._connect_timer)
        self._connect_timer = None
        ws_transport = self.transport
        backend_transport = self._backend.transport
        self._flow = Flow(ws_transport, backend_transport, self._console.buffer_size)
        # The guard was the only stage; now the console's own, if any.
        grant = self._redemption.grant if self._redemption is not None else None
        self._pipeline = build(self.factory.stages_for(grant, self._console))
        self._backend_write = backend_transport.write
        self._ws_direct = direct_writer(ws_transport)
        self._backend_direct = direct_writer(backend_transport)
        self.relaying = True
        self._resume_reading()
        if self._record is not None and self._record.owner is self:
            idle = self._console.idle_timeout
            if idle > 0:
                self._idle_timer = self._reactor.callLater(idle, self._idle_check)
            if self._record.remote:
                return  # a channel of a console counted by another process
            try:
                self.factory.observer.console_opened(self._console_type or "unknown")
            except Exception:
                log.failure("observer.console_opened failed")

    def fail(self, error: ConsoleError, reason: str) -> None:
        self._forget_located()
        self._end(error, f"guard: {reason}")

    def _forget_located(self) -> None:
        """
        The VM did not answer as located (connection failed, or its console
        failed the guard's handshake): drop the locator's cached lookup of
        it (C{invalidate}, when the locator has one), so that the next
        console asks the hypervisor again.
        """
        if self._located_forgotten or self._redemption is None:
            return
        self._located_forgotten = True
        invalidate = getattr(self.factory.locator, "invalidate", None)
        if invalidate is None:
            return
        try:
            invalidate(self._redemption.grant.vm_uuid)
        except Exception:
            log.failure("console {console_id}: locator invalidate failed", console_id=self.console_id)

    # -- hot path output ---------------------------------------------------

    def _send_binary(self, data: bytes) -> None:
        """
        Send C{data} as one binary WebSocket message: the frame header and
        the payload written straight to the transport (server frames are
        not masked), without Autobahn's per-message machinery.
        """
        if self.state != _OPEN:
            return
        n = len(data)
        if n < 126:
            header = _HEADER_SHORT(0x82, n)
        elif n < 0x10000:
            header = _HEADER_MEDIUM(0x82, 126, n)
        else:
            header = _HEADER_LONG(0x82, 127, n)
        cork = self._cork
        if cork is not None:
            cork.append(header)
            cork.append(data)
            return
        direct = self._ws_direct
        if direct is not None:
            send_now(direct, (header, data))
        else:
            self.transport.writeSequence((header, data))

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
        if self._pipeline is not None:
            pipeline, self._pipeline = self._pipeline, None
            pipeline.close()
        if self._backend is not None:
            self._backend.transport.loseConnection()

        record = self._record
        if record is not None and record.owner is not self:
            record.leave(self)
        else:
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
            for other in others:
                other._end(error, f"console ended: {reason}", close_code if close_code else 1000)

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
        record_outcome(
            outcome,
            self.factory.observer,
            vm_ref=self._vm_ref,
            token=self._token,
            client_ip=self._client_ip,
            counted_here=not (self._record is not None and self._record.remote),
        )


# ---------------------------------------------------------------------------
# The factory
# ---------------------------------------------------------------------------


def _rfb_guard(sink: Any, password: Optional[str], tls: Any = None) -> Any:
    from vaporproxy.guards.rfb import RFBGuard

    return RFBGuard(sink, password, tls=tls)


def _spice_guard(sink: Any, password: Optional[str], expected_session_id: Optional[int]) -> Any:
    from vaporproxy.guards.spice import SpiceGuard

    return SpiceGuard(sink, password, expected_session_id)


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
        self.vnc_guard: Callable[..., Any] = _rfb_guard
        self.spice_guard: Callable[..., Any] = _spice_guard
        self.config = config
        from vaporproxy.guards.rfb import vnc_tls_by_uri

        # Raises ConfigError at start-up when a certificate file is unusable.
        self.vnc_tls: Dict[str, Any] = vnc_tls_by_uri(config.hypervisors)
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
        except ConfigError as e:
            log.error("vnc_tls not reloaded, keeping the previous settings: {error}", error=str(e))
