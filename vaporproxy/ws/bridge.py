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

import txaio
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import FrameHeader, WebSocketProtocol
from autobahn.twisted.util import create_transport_details, peer2str
from autobahn.util import _is_tls_error, _maybe_tls_reason
from autobahn.wamp.types import TransportDetails
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.logger import Logger
from zope.interface import implementer
from twisted.python.failure import Failure

from vaporproxy.config import Config, ConfigError
from vaporproxy.vm.dial import dial, spice_tls_by_uri
from vaporproxy.vm.target import console_target, dial_host, select_console
from vaporproxy.errors import CLOSE_GOING_AWAY, ConsoleError, ErrorCode
from vaporproxy.interfaces import Outcome, Redemption
from vaporproxy.stores.tokens import token_log_id
from vaporproxy.http.request import client_ip_from, origin_allowed, request_secure, vm_ref_from_path
from vaporproxy.relay.fastwrite import high_water, write_buffered
from vaporproxy.timestamps import iso_utc
from vaporproxy.relay.policy import PolicyViolation
from vaporproxy.ws.frames import ClientFrameParser, direct_writer, send_now

__all__ = [
    "MAX_SPICE_CHANNELS",
    "BackendProtocol",
    "ConsoleBridgeFactory",
    "ConsoleRecord",
    "ConsoleRegistry",
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

#: SPICE's inputs channel (keyboard, mouse): refused on view-only consoles.
SPICE_CHANNEL_INPUTS = 3

#: What a console WebSocket in clear is told when C{console.enable_tls} is
#: on (UNAUTHORIZED, 4008).
REQUIRE_TLS_MESSAGE = "console connections require TLS"

_PING = 9

_OPEN = WebSocketProtocol.STATE_OPEN
_CONNECTING = WebSocketProtocol.STATE_CONNECTING

_HEADER_SHORT = struct.Struct("!BB").pack
_HEADER_MEDIUM = struct.Struct("!BBH").pack
_HEADER_LONG = struct.Struct("!BBQ").pack


# ---------------------------------------------------------------------------
# Small pure helpers
# ---------------------------------------------------------------------------


class _ReactorTimer:
    """
    Autobahn's batched timer interface over an injected reactor, so that
    Autobahn's own timeouts (opening and closing handshakes, auto-ping) run
    on the reactor we were given instead of txaio's global one.
    """

    def __init__(self, reactor: IReactorTime):
        self._reactor = reactor

    def call_later(self, delay: float, fun: Callable, *args: Any, **kwargs: Any) -> "_Call":
        return _Call(self._reactor.callLater(delay, fun, *args, **kwargs))


class _Call:
    """
    A delayed call whose C{cancel} may be called after it ran.
    """

    __slots__ = ("_call",)

    def __init__(self, call: IDelayedCall):
        self._call = call

    def cancel(self) -> None:
        if self._call.active():
            self._call.cancel()


def _autobahn_debug() -> bool:
    """
    Whether txaio's global log level (which Autobahn's loggers follow)
    lets debug lines through.
    """
    return txaio.get_global_log_level() in ("debug", "trace")


def _cancel(call: Optional[IDelayedCall]) -> None:
    if call is not None and call.active():
        call.cancel()


# ---------------------------------------------------------------------------
# The registry of live consoles
# ---------------------------------------------------------------------------


class ConsoleRecord:
    """
    One live console of this process: its owner WebSocket (the VNC
    WebSocket or the SPICE main channel) and any SPICE channels that joined
    it.  Byte counters live on the channels (hot path); the record sums
    them.
    """

    def __init__(
        self,
        console_id: str,
        vm_id: str,
        console_type: str,
        user: str,
        started_at: float,
        owner: "ConsoleWebSocketProtocol",
    ):
        self.console_id = console_id
        self.vm_id = vm_id
        self.type = console_type
        self.user = user
        self.started_at = started_at
        self.owner = owner
        self.channels: List[ConsoleWebSocketProtocol] = [owner]
        self.spice_session_id: Optional[int] = None
        #: Shown by stats and the control room (set by the owner at admission).
        self.vm_name: Optional[str] = None
        self.mode = "control"
        self.client: Optional[str] = None
        #: SPICE channels whose main channel lives in another process: a
        #: part of a console counted there, not a console of this process.
        self.remote = False
        self._ended_sent = 0
        self._ended_received = 0
        self._ended_last = started_at

    @property
    def bytes_sent(self) -> int:
        return self._ended_sent + sum(c._bytes_sent for c in self.channels)

    @property
    def bytes_received(self) -> int:
        return self._ended_received + sum(c._bytes_received for c in self.channels)

    @property
    def last_activity(self) -> float:
        return max([self._ended_last] + [c._last_activity for c in self.channels])

    def join(self, channel: "ConsoleWebSocketProtocol") -> None:
        self.channels.append(channel)

    def leave(self, channel: "ConsoleWebSocketProtocol") -> None:
        """
        C{channel} ended: keep its bytes in the totals.
        """
        if channel in self.channels:
            self.channels.remove(channel)
            self._ended_sent += channel._bytes_sent
            self._ended_received += channel._bytes_received
            self._ended_last = max(self._ended_last, channel._last_activity)

    def as_dict(self, now: float) -> Dict[str, Any]:
        return {
            "console_id": self.console_id,
            "vm_id": self.vm_id,
            "vm_name": self.vm_name,
            "mode": self.mode,
            "client": self.client,
            "type": self.type,
            "user": self.user,
            "channels": len(self.channels),
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "started_at": iso_utc(self.started_at),
            "duration_s": round(max(0.0, now - self.started_at), 3),
            "last_activity": iso_utc(self.last_activity),
        }


class ConsoleRegistry:
    """
    The live consoles of this process (stats, DELETE, shutdown).
    """

    def __init__(self, clock: IReactorTime):
        self._clock = clock
        self._records: Dict[str, ConsoleRecord] = {}

    def add(self, record: ConsoleRecord) -> None:
        self._records[record.console_id] = record

    def remove(self, record: ConsoleRecord) -> None:
        self._records.pop(record.console_id, None)

    def consoles(self) -> List[ConsoleRecord]:
        """
        The consoles of this process (not the SPICE channels of consoles
        whose main channel lives in another process).
        """
        return [r for r in self._records.values() if not r.remote]

    def count_by_vm(self) -> Dict[str, int]:
        counts: Dict[str, int] = {}
        for record in self.consoles():
            counts[record.vm_id] = counts.get(record.vm_id, 0) + 1
        return counts

    def spice_channels(self, vm_id: str, session_id: int) -> int:
        """
        How many WebSockets of this process belong to the SPICE console of
        C{vm_id} with C{session_id} (its main channel if here, the channels
        that joined it, and channels of it whose main channel is in another
        process).
        """
        return sum(
            len(r.channels)
            for r in self._records.values()
            if r.vm_id == vm_id and r.spice_session_id == session_id
        )

    def find_spice(self, vm_id: str, session_id: int) -> Optional[ConsoleRecord]:
        for record in self._records.values():
            if record.vm_id == vm_id and record.spice_session_id == session_id:
                return record
        return None

    def terminate_vm(self, vm_uuid: str) -> int:
        """
        Close every channel of every console of C{vm_uuid} with 4010
        SESSION_TERMINATED (channels of remote consoles too); answer how
        many consoles of this process.
        """
        records = [r for r in self._records.values() if r.vm_id == vm_uuid]
        for record in records:
            record.owner._end(ConsoleError(ErrorCode.SESSION_TERMINATED), "terminated")
        return sum(1 for r in records if not r.remote)

    def close_all(self) -> int:
        """
        Close every console with 1001 (the proxy is shutting down).
        """
        records = list(self._records.values())
        for record in records:
            record.owner._end(None, "shutdown", CLOSE_GOING_AWAY)
        return len(records)


# ---------------------------------------------------------------------------
# The VM side
# ---------------------------------------------------------------------------


@implementer(IPushProducer)
class _DrainWatch:
    """
    The browser's transport's producer: the VM's transport (paused while
    the browser's buffer is over C{buffer_size}), and a call when that
    buffer has drained.
    """

    __slots__ = ("_backend", "_drained")

    def __init__(self, backend: Any, drained: Callable[[], None]):
        self._backend = backend
        self._drained = drained

    def pauseProducing(self) -> None:
        self._backend.pauseProducing()

    def resumeProducing(self) -> None:
        self._backend.resumeProducing()
        self._drained()

    def stopProducing(self) -> None:
        self._backend.stopProducing()


class BackendProtocol(Protocol):
    """
    The TCP connection to the VM's VNC or SPICE server for one WebSocket.
    """

    def __init__(self, console: "ConsoleWebSocketProtocol"):
        self.console = console

    def connectionMade(self) -> None:
        self.console._backend_connected(self)

    def dataReceived(self, data: bytes) -> None:
        console = self.console
        if console._relaying:
            # Hot path: no logging, no lookups beyond attributes.
            console._bytes_sent += len(data)
            console._last_activity = console._seconds()
            console._send_binary(data)
        else:
            console._setup_server_data(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        # The console and this protocol refer to each other; this side is
        # done with it (no reference cycle left for the garbage collector).
        console, self.console = self.console, None
        if console is not None:
            console._backend_lost(self, reason)


class _BackendFactory(ClientFactory):
    """
    The VM connection's factory, given to C{reactor.connectTCP} directly
    (no endpoint: no Deferred plumbing and no wrapping protocol between the
    socket and L{BackendProtocol} on every read).
    """

    #: One factory per console: no "Starting/Stopping factory" log lines.
    noisy = False

    def __init__(self, console: "ConsoleWebSocketProtocol"):
        self.console = console

    def buildProtocol(self, addr: Any) -> BackendProtocol:
        return BackendProtocol(self.console)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        console, self.console = self.console, None
        if console is not None:
            console._dial_failed(reason)

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        """
        The VM connection is over (its protocol was told first): let go of
        the console, and of the transport, which Twisted's connector and
        transport otherwise keep in a reference cycle.
        """
        self.console = None
        connector.transport = None


# ---------------------------------------------------------------------------
# The browser side
# ---------------------------------------------------------------------------


class ConsoleWebSocketProtocol(WebSocketServerProtocol):
    """
    One console WebSocket, and the sink of its protocol guard.
    """

    factory: "ConsoleBridgeFactory"

    #: Autobahn's _connectionMade copies every option in CONFIG_ATTRS from
    #: the factory and pformats the list for a debug line, which is
    #: evaluated even when debug logging is off (about a tenth of a
    #: console's set-up cost).  connectionMade copies them instead, the same
    #: way, and Autobahn is given nothing to copy or format.
    CONFIG_ATTRS: tuple = ()
    _OPTIONS_FROM_FACTORY = tuple(WebSocketServerProtocol.CONFIG_ATTRS)

    # Class defaults, so that every attribute exists before connectionMade.
    _finished = False
    _opened = False
    _relaying = False
    _in_on_connect = False
    _reads_paused = False
    _producers = False
    _bytes_sent = 0
    _bytes_received = 0
    _last_activity = 0.0
    _started_at = 0.0
    _held_size = 0
    _token: Optional[str] = None
    #: Whether the client's request came over TLS (L{request_secure}).
    _secure = False
    _vm_ref: Optional[str] = None
    _client_ip: Optional[str] = None
    _redemption: Optional[Redemption] = None
    #: The console's relay pipeline (L{vaporproxy.relay.pipeline}), or
    #: C{None}: bytes go straight.
    _pipeline: Any = None
    _throttle_timer: Optional[IDelayedCall] = None
    #: Reads from the browser stopped because it does not read its pongs.
    _pings_paused = False
    #: What the guard sent the browser, kept for a recording (which starts
    #: at the splice) while recording is on; C{None} otherwise.
    _handshake_copy: Optional[List[bytes]] = None
    #: The audit trail was told this console opened (so it is told it closed).
    _audited = False
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
    #: The plain TCP transports that L{send_now} may write to directly.
    _ws_direct: Any = None
    _backend_direct: Any = None
    #: The bytes for the client held while C{succeedHandshake} runs.
    _cork: Optional[List[bytes]] = None
    #: Whether L{transport_details} were built.
    _details_built = False

    # -- Twisted / Autobahn events ----------------------------------------

    def sendData(self, data: bytes, sync: bool = False, chopsize: Optional[int] = None) -> None:
        """
        Autobahn's C{sendData} (the opening handshake's answer, close
        frames, pings), written straight to a plain TCP socket when
        nothing is queued; Autobahn's own otherwise (queued, chopped or
        octet-logged writes, a non-TCP transport, debug on).
        """
        cork = self._cork
        if cork is not None:
            if not (sync or chopsize):
                cork.append(data)
                return
            # Autobahn's synchronous or chopped writes: what is corked
            # goes first, to keep the order.
            if cork:
                send_now(self._ws_direct, list(cork))
                cork.clear()
        direct = self._ws_direct
        if direct is None or sync or chopsize or self.send_queue or self.logOctets or _autobahn_debug():
            super().sendData(data, sync, chopsize)
            return
        send_now(direct, (data,))
        if self.state == _OPEN:
            self.trafficStats.outgoingOctetsWireLevel += len(data)
        elif self.state == _CONNECTING:
            self.trafficStats.preopenOutgoingOctetsWireLevel += len(data)

    # Autobahn's server-side _connectionMade and _connectionLost are the
    # base class's plus the factory's connection count, and a debug line
    # whose arguments (hltype() with click styling, str() of the Failure)
    # are computed even when debug logging is off: about 1.5% of a
    # console's set-up cost.  The same without the debug line, unless
    # txaio's (public) global log level asks for Autobahn's debug output.

    def _connectionMade(self) -> None:
        if _autobahn_debug():
            super()._connectionMade()
            return
        WebSocketProtocol._connectionMade(self)
        self.factory.countConnections += 1

    def _connectionLost(self, reason: Any) -> None:
        if _autobahn_debug():
            super()._connectionLost(reason)
            return
        WebSocketProtocol._connectionLost(self, reason)
        self.factory.countConnections -= 1

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Autobahn's Twisted adapter's C{connectionLost} (a TLS failure logged
        as an error, then the WebSocket's C{_connectionLost}) without its
        debug lines, whose arguments (hltype() with click styling) it
        computes even when debug logging is off.
        """
        if _autobahn_debug():
            super().connectionLost(reason)
        else:
            if _is_tls_error(reason.value):
                self.log.error(_maybe_tls_reason(reason.value))
            self._connectionLost(reason)
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

    def succeedHandshake(self, res: Any) -> None:
        """
        Autobahn's C{succeedHandshake} (the 101 answer, then C{onOpen}),
        with the bytes for the client corked until it returns: on plain TCP
        the 101 and whatever opening the WebSocket sends at once (the RFB
        guard's greeting when the token store and the locator answer
        without waiting) leave in one write instead of one each.
        """
        direct = self._ws_direct
        if direct is None or self.send_queue or self.logOctets or _autobahn_debug():
            super().succeedHandshake(res)
            return
        self._cork = []
        try:
            super().succeedHandshake(res)
        finally:
            self._uncork()

    def _uncork(self) -> None:
        """
        Send what was corked (L{succeedHandshake}) in one write; from now on
        bytes for the client leave as they come.
        """
        cork, self._cork = self._cork, None
        if cork:
            send_now(self._ws_direct, cork)

    def connectionMade(self) -> None:
        factory = self.factory
        options = factory._protocol_options
        if options is None:
            # Once per factory configuration: the options this class does
            # not set itself, as the factory has them (what the loop of
            # Autobahn's _connectionMade would copy on every connection).
            options = factory._protocol_options = {
                name: getattr(factory, name) for name in self._OPTIONS_FROM_FACTORY if not hasattr(self, name)
            }
        self.__dict__.update(options)
        self._reactor = factory.reactor
        self._seconds = factory.reactor.seconds
        self._settings = factory.config
        self._console = factory.config.console
        # 32 random hex digits, as uuid4().hex without building a UUID.
        self.console_id = os.urandom(16).hex()
        self._started_at = self._last_activity = self._seconds()
        self._held: List[bytes] = []
        self._to_server: List[bytes] = []
        # Plain TCP: the 101 answer and the guard's bytes go straight to the
        # socket too (one send instead of a write-readiness round trip).
        self._ws_direct = direct_writer(self.transport)
        if _autobahn_debug():
            super().connectionMade()
        else:
            # Autobahn's Twisted adapter's connectionMade, without its
            # closing debug line (hltype() computed even when debug is off).
            # The transport details are built on first use (transport_details).
            self.peer = peer2str(self.transport)
            try:
                self.transport.setTcpNoDelay(self.tcpNoDelay)
            except Exception:
                pass  # not TCP (e.g. a Unix socket)
            self._connectionMade()
        planner = getattr(self.factory, "planner", None)
        if planner is not None and planner.recordings is not None:
            self._handshake_copy = []
        if self._console.connection_timeout > 0:
            self._connect_timer = self._reactor.callLater(
                self._console.connection_timeout, self._connection_timed_out
            )

    @property
    def transport_details(self) -> Optional[TransportDetails]:
        """
        Autobahn's details of this connection (peer, TLS, ...), built on
        first use: nothing in vaporproxy reads them, and building them for
        every console (two system calls and a validated object) was a
        visible share of a console's set-up cost (issue #3).
        """
        if not self._details_built and self.transport is not None:
            details = create_transport_details(self.transport, self.is_server)
            details.channel_framing = TransportDetails.CHANNEL_FRAMING_WEBSOCKET
            self._transport_details = details
            self._details_built = True
        return self._transport_details

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
        if (
            self._opened
            and self.state == _OPEN
            and self.current_frame is None
            and not self.inside_message
        ):
            # The WebSocket is open and Autobahn's parser is between
            # messages (what it holds is at most part of the next frame
            # header): ours takes over, for the guard's handshake too.
            parser = self._parser = ClientFrameParser(
                self._console.max_message_size,
                self._relay_data,
                self._relay_control,
                self._relay_text,
                self._relay_error,
            )
            held, self.data = self.data, b""
            parser.feed(held + data if held else data)
            return
        if self.state == _CONNECTING and len(self.data) + len(data) > MAX_HANDSHAKE_SIZE:
            # Autobahn buffers an opening handshake without a bound; this is
            # twisted.web's (whose parsing the listening port's switch skips).
            self.data = b""
            self.failHandshake("Request header fields too large", 431)
            return
        self._dataReceived(data)

    # -- the relay parser's callbacks ---------------------------------------

    def _relay_data(self, payload: bytes) -> None:
        if self._finished:
            return
        if not self._relaying:
            # The guard's handshake (or held until the guard exists).
            self._setup_message(payload, True)
            if self.autoPingTimeoutCall and self.autoPingRestartOnAnyTraffic:
                self._cancelAutoPingTimeoutCall()
            return
        self._bytes_received += len(payload)
        self._last_activity = self._seconds()
        direct = self._backend_direct
        if direct is not None:
            send_now(direct, (payload,))
        else:
            self._backend_write(payload)
        if self.autoPingTimeoutCall and self.autoPingRestartOnAnyTraffic:
            # As Autobahn does on every data frame (autobahn-python #1327).
            self._cancelAutoPingTimeoutCall()

    def _relay_control(self, opcode: int, payload: bytes) -> None:
        """
        A whole close, ping or pong frame: handled by Autobahn exactly as
        its own parser would (pong, auto-ping bookkeeping, closing
        handshake).

        A ping from a browser whose outgoing buffer is at the high-water
        mark (it does not read its pongs) stops reads from it until that
        buffer drains: pongs count against C{buffer_size} like data, so a
        ping flood cannot grow the proxy's memory.  During the handshake,
        when nothing is relayed to drain, such a browser is closed.
        """
        if opcode == _PING and write_buffered(self.transport) >= self._console.buffer_size:
            if not self._producers:
                self._end(ConsoleError(ErrorCode.BAD_REQUEST, "Pings faster than the answers are read"),
                          "ping flood during the handshake")  # fmt: skip
                return
            self._pings_paused = True
            self.transport.pauseProducing()
        self.current_frame = FrameHeader(opcode, True, 0, len(payload), None)
        self.control_frame_data = [payload]
        try:
            self.processControlFrame()
        finally:
            self.current_frame = None

    def _relay_text(self) -> None:
        if not self._finished:
            self._end(ConsoleError(ErrorCode.BAD_REQUEST, "Console streams are binary"), "text message")

    def _relay_error(self, code: int, reason: str) -> None:
        """
        The browser broke the protocol (1002) or a size cap (1009): close
        with that code and drop the connection, whose framing is lost.
        """
        self._end(None, f"websocket protocol error: {reason}", code)
        if self.state != WebSocketProtocol.STATE_CLOSED:
            self.dropConnection(abort=False)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self._relaying and isBinary:
            # Hot path.
            self._bytes_received += len(payload)
            self._last_activity = self._seconds()
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
        self._target = console_target(vm, graphics, host, address, factory.locator)
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
            self._uncork()
            self._feed_held()
            self._dial()
        else:
            expected = None if redemption.first else redemption.spice_session_id
            planner = getattr(factory, "planner", None)
            hold = planner is not None and planner.holds_spice_input(grant)
            held = {"hold_after_ticket": True} if hold else {}
            self._guard = factory.spice_guard(self, graphics.password, expected, **held)
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
        lease = await self.factory.limiter.acquire(
            grant.vm_uuid, self.console_id, user=grant.user, client=self._client_ip
        )
        if self._finished:
            lease.release()
            return False
        self._lease = lease
        self._record = ConsoleRecord(
            self.console_id, grant.vm_uuid, grant.console_type, grant.user, self._started_at, self
        )
        self._record.vm_name, self._record.mode, self._record.client = grant.vm_name, grant.mode, self._client_ip
        self.factory.registry.add(self._record)
        return True

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
        self._bytes_received += len(payload)
        self._last_activity = self._seconds()
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
        # The host policy's answer (an address literal, or a socket path);
        # plain or TLS as the SPICE channel the guard has read says.
        tls = self.factory.spice_tls.get(self._target.hypervisor)
        channel = getattr(self._guard, "channel_type", None)
        self._connecting = dial(self._reactor, self._target, tls, _BackendFactory(self), timeout, channel)

    def _dial_failed(self, failure: Failure) -> None:
        self._connecting = None
        if self._finished:
            # Stopped by _end (or the console ended meanwhile).
            return
        self._end(
            ConsoleError(ErrorCode.CONNECTION_FAILED),
            f"backend connect failed: {failure.type.__name__}",
        )

    def _backend_connected(self, backend: BackendProtocol) -> None:
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

    def _setup_server_data(self, data: bytes) -> None:
        self._guard_call("server_data", data)

    def _backend_lost(self, backend: BackendProtocol, reason: Optional[Failure] = None) -> None:
        if self._finished:
            return
        if self._relaying:
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
        self._bytes_sent += len(data)
        copy = self._handshake_copy
        if copy is not None:
            copy.append(data)
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
        if self._redemption.grant.mode == "view" and getattr(self._guard, "channel_type", None) == SPICE_CHANNEL_INPUTS:
            self._end(
                ConsoleError(ErrorCode.UNAUTHORIZED, "A view-only console has no input channel"),
                "view-only console: inputs channel refused",
            )
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

    def established(self, client_rest: bytes = b"") -> None:
        """
        The guard's handshake is over: relay raw bytes with flow control,
        through the console's stages when it has any (then C{client_rest},
        what the browser sent that the guard held back, goes through them
        first).
        """
        if self._finished or self._backend is None:
            return
        guard = self._guard
        if getattr(guard, "channel_type", None) is not None:
            self._spice_channel = {
                "channel_type": guard.channel_type,
                "channel_id": guard.channel_id,
                "mini_header": guard.mini_header,
            }
        self._drop_guard()
        _cancel(self._connect_timer)
        self._connect_timer = None
        ws_transport = self.transport
        backend_transport = self._backend.transport
        size = self._console.buffer_size
        high_water(ws_transport, size)
        high_water(backend_transport, size)
        # Twisted Web's HTTPChannel stays registered on the transport that
        # Autobahn took over; replace it with the backend.
        try:
            ws_transport.unregisterProducer()
        except (RuntimeError, AttributeError):
            pass
        ws_transport.registerProducer(_DrainWatch(backend_transport, self._client_drained), True)
        backend_transport.registerProducer(ws_transport, True)
        self._producers = True
        self._backend_write = backend_transport.write
        self._ws_direct = direct_writer(ws_transport)
        self._backend_direct = direct_writer(backend_transport)
        self._relaying = True
        self._splice_stages()
        if client_rest and not self._finished:
            self._relay_data(client_rest)
        if self._finished:
            return
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
            self._audit_opened()

    # -- the relay pipeline (vaporproxy.relay.pipeline) --------------------

    def _splice_stages(self) -> None:
        """
        Put the console's stages between the two sides, if it has any: the
        parser's data callback and the VM protocol's C{dataReceived} are
        replaced by staged ones, so a console without stages pays nothing.
        """
        planner = getattr(self.factory, "planner", None)
        if planner is None or self._redemption is None:
            return
        grant = self._redemption.grant
        record = self._record
        recorder = None
        if record is not None:
            recorder = getattr(record, "recorder", None)
            if recorder is None and record.owner is self and planner.records(grant.vm_uuid, grant.vm_name):
                recorder = record.recorder = planner.recordings.start(
                    vm_id=grant.vm_uuid, vm_name=grant.vm_name, console_type=grant.console_type, user=grant.user
                )
                self.factory.observer.recording_started()
        guard_info = self._spice_info
        channel = recorder.open_channel(guard_info) if recorder is not None else 0
        handshake, self._handshake_copy = self._handshake_copy, None
        if recorder is not None and handshake:
            # The browser's side of the handshake (no secret: the proxy
            # offered it security None), so that a player can replay it.
            recorder.to_browser(channel, b"".join(handshake))
        pipeline = planner.plan(
            grant,
            grant.console_type,
            pause_vm=self._pause_vm,
            send_to_vm=self._send_to_vm_later,
            spice_main=bool(guard_info.get("channel_type") == 1),
            mini_header=bool(guard_info.get("mini_header", True)),
            recorder=recorder,
            channel=channel,
        )
        if pipeline is None:
            return
        self._pipeline = pipeline
        self._relay_data = self._relay_data_staged  # type: ignore[method-assign]
        if self._parser is not None:
            self._parser.set_data_callback(self._relay_data_staged)
        self._backend.dataReceived = self._backend_data_staged  # type: ignore[union-attr]

    def _relay_data_staged(self, payload: bytes) -> None:
        pipeline = self._pipeline
        if self._finished or pipeline is None:
            return
        try:
            passed = pipeline.to_vm(payload)
        except PolicyViolation as e:
            self._end(ConsoleError(ErrorCode.BAD_REQUEST, "Message not allowed on this console"), f"policy: {e}")
            return
        self._bytes_received += len(payload) - len(passed)
        if passed:
            type(self)._relay_data(self, passed)

    def _backend_data_staged(self, data: bytes) -> None:
        pipeline = self._pipeline
        if self._finished or pipeline is None:
            return
        try:
            passed = pipeline.to_browser(data)
        except PolicyViolation as e:
            self._end(ConsoleError(ErrorCode.BAD_REQUEST, "The VM sent what the console's policy cannot pass"),
                      f"policy, from the VM: {e}")  # fmt: skip
            return
        self._bytes_sent += len(data)
        self._last_activity = self._seconds()
        if passed:
            self._send_binary(passed)

    def _client_drained(self) -> None:
        """The browser read what was waiting for it: reads from it go on."""
        if self._pings_paused:
            self._pings_paused = False
            if not self._finished:
                self.transport.resumeProducing()

    def _send_to_vm_later(self, data: bytes) -> None:
        """A held message's time has come (paced update requests)."""
        if not self._finished and self._backend is not None:
            self._backend.transport.write(data)

    def _pause_vm(self, seconds: float) -> None:
        """Bandwidth: no reads from the VM for C{seconds} (never buffering)."""
        if self._finished or self._backend is None or self._throttle_timer is not None:
            return
        transport = self._backend.transport
        transport.pauseProducing()

        def resume() -> None:
            self._throttle_timer = None
            if not self._finished and self._backend is not None:
                transport.resumeProducing()

        self._throttle_timer = self._reactor.callLater(seconds, resume)

    @property
    def _spice_info(self) -> Dict[str, Any]:
        """The SPICE channel this WebSocket is (for stages and recordings)."""
        info = getattr(self, "_spice_channel", None)
        return info if info is not None else {}

    def _close_stages(self) -> None:
        pipeline, self._pipeline = self._pipeline, None
        _cancel(self._throttle_timer)
        self._throttle_timer = None
        if pipeline is not None:
            self.__dict__.pop("_relay_data", None)
            if self._backend is not None:
                self._backend.__dict__.pop("dataReceived", None)
            try:
                pipeline.close()
            except Exception:
                log.failure("console {console_id}: closing its stages failed", console_id=self.console_id)

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
        if not self._relaying:
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
        last = self._record.last_activity if self._record is not None else self._last_activity
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
        self._relaying = False
        now = self._seconds() if self._started_at else 0.0
        _cancel(self._connect_timer)
        _cancel(self._idle_timer)
        self._connect_timer = self._idle_timer = None
        self._drop_guard()
        self._close_stages()
        self._held = []
        if self._connecting is not None:
            connecting, self._connecting = self._connecting, None
            try:
                connecting.stopConnecting()
            except Exception:
                pass  # connected or failed meanwhile
        if self._producers:
            self._producers = False
            for transport in (self.transport, self._backend.transport if self._backend else None):
                try:
                    transport.unregisterProducer()
                except Exception:
                    pass
        if self._backend is not None:
            self._backend.transport.loseConnection()

        record = self._record
        if record is not None and record.owner is not self:
            record.leave(self)
        else:
            others: List[ConsoleWebSocketProtocol] = []
            sent, received = self._bytes_sent, self._bytes_received
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
            recorder = getattr(record, "recorder", None) if record is not None else None
            if recorder is not None:
                self._finish_recording(record, recorder, error, sent)
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

    def _finish_recording(self, record: Any, recorder: Any, error: Optional[ConsoleError], sent: int) -> None:
        record.recorder = None
        planner = self.factory.planner
        try:
            planner.recordings.finish(recorder, bytes_sent=sent, outcome=error.code.name if error else None)
            self.factory.observer.recording_finished(recorder.size)
        except Exception:
            log.failure("console {console_id}: finishing its recording failed", console_id=self.console_id)

    def _record_outcome(
        self, error: Optional[ConsoleError], reason: str, sent: int, received: int, now: float
    ) -> None:
        grant = self._redemption.grant if self._redemption is not None else None
        outcome = Outcome(
            console_id=self.console_id,
            vm_uuid=grant.vm_uuid if grant else None,
            console_type=grant.console_type if grant else None,
            user=grant.user if grant else None,
            bytes_sent=sent,
            bytes_received=received,
            started_at=self._started_at,
            duration_s=max(0.0, now - self._started_at),
            error=error.code.name if error is not None else None,
            reason=reason,
        )
        log.info(
            "console {console_id} closed: vm={vm_uuid} type={console_type} user={user}"
            " token={token_id} client={client_ip} error={error} reason={reason}"
            " sent={bytes_sent} received={bytes_received} duration={duration_s:.3f}s",
            console_id=outcome.console_id,
            vm_uuid=outcome.vm_uuid or self._vm_ref,
            console_type=outcome.console_type,
            user=outcome.user,
            token_id=token_log_id(self._token) if self._token else None,
            client_ip=self._client_ip,
            error=outcome.error,
            reason=reason,
            bytes_sent=sent,
            bytes_received=received,
            duration_s=outcome.duration_s,
        )
        if self._record is not None and self._record.remote:
            # A channel of a console counted by another process.
            return
        try:
            self.factory.observer.console_closed(outcome)
        except Exception:
            log.failure("observer.console_closed failed")
        if self._audited and grant is not None:
            recorder = getattr(self._record, "recorder", None)
            self.factory.audit.console_closed(
                console_id=self.console_id, user=grant.user, vm_uuid=grant.vm_uuid, vm_name=grant.vm_name,
                client=self._client_ip or "", console_type=grant.console_type, mode=grant.mode,
                bytes_to_client=sent, bytes_from_client=received, duration_s=outcome.duration_s,
                outcome=outcome.error, reason=reason, recording_id=recorder.id if recorder is not None else None,
            )  # fmt: skip

    def _audit_opened(self) -> None:
        """The audit trail's console_opened (when the factory has a trail)."""
        audit = getattr(self.factory, "audit", None)
        if audit is None or self._redemption is None:
            return
        grant = self._redemption.grant
        self._audited = True
        audit.console_opened(
            console_id=self.console_id, user=grant.user, vm_uuid=grant.vm_uuid, vm_name=grant.vm_name,
            client=self._client_ip or "", console_type=grant.console_type, mode=grant.mode,
        )  # fmt: skip


# ---------------------------------------------------------------------------
# The factory
# ---------------------------------------------------------------------------


def _rfb_guard(sink: Any, password: Optional[str], tls: Any = None) -> Any:
    from vaporproxy.guards.rfb import RFBGuard

    return RFBGuard(sink, password, tls=tls)


def _spice_guard(
    sink: Any, password: Optional[str], expected_session_id: Optional[int], hold_after_ticket: bool = False
) -> Any:
    from vaporproxy.guards.spice import SpiceGuard

    return SpiceGuard(sink, password, expected_session_id, hold_after_ticket)


_OPTION_NAMES = frozenset(WebSocketServerProtocol.CONFIG_ATTRS)


class ConsoleBridgeFactory(WebSocketServerFactory):
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
        # Autobahn schedules its own timeouts through txaio's global loop;
        # run them on the injected reactor instead (DESIGN.md rule 1).
        self._batched_timer = _ReactorTimer(reactor)
        self.token_store = token_store
        self.locator = locator
        self.limiter = limiter
        self.host_policy = host_policy
        self.registry = registry
        self.observer = observer
        self.vnc_guard: Callable[..., Any] = _rfb_guard
        self.spice_guard: Callable[..., Any] = _spice_guard
        self.config = config
        from vaporproxy.guards.rfb import vnc_tls_by_uri

        # Raises ConfigError at start-up when a certificate file is unusable.
        self.vnc_tls: Dict[str, Any] = vnc_tls_by_uri(config.hypervisors)
        self.spice_tls: Dict[str, Any] = spice_tls_by_uri(config.hypervisors)
        self._apply(config)

    #: The protocol options each connection copies (see
    #: L{ConsoleWebSocketProtocol.connectionMade}); rebuilt after every
    #: change of options.
    _protocol_options: Optional[Dict[str, Any]] = None

    def setProtocolOptions(self, *args: Any, **kwargs: Any) -> None:
        super().setProtocolOptions(*args, **kwargs)
        self._protocol_options = None

    def resetProtocolOptions(self) -> None:
        super().resetProtocolOptions()
        self._protocol_options = None

    def __setattr__(self, name: str, value: Any) -> None:
        # An option set directly on the factory (not through
        # setProtocolOptions) is seen by the next connection too.
        if name in _OPTION_NAMES:
            self.__dict__["_protocol_options"] = None
        object.__setattr__(self, name, value)

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
