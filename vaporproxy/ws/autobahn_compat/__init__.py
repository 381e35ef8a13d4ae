"""
Every private Autobahn name vaporproxy uses, in one room (DESIGN.md rule 6),
and the Twisted internals outside the transports (the reactor's event
dispatch, L{vaporproxy.ws.autobahn_compat.event_loop}).

The console WebSocket is an Autobahn server protocol with a few of its
internals replaced or read for speed (issue #3).  They all live here, each
with why and what it measured, so that an Autobahn upgrade is checked in one
place: C{tests/ws/test_autobahn_compat.py} fails with a clear message when
the installed Autobahn lacks a name listed in L{RELIES_ON}.

Gains quoted are shares of one console's set-up cost (callgrind
instructions per set-up, 8 at a time) measured when each was introduced.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Dict, List, Optional

import txaio
from autobahn.twisted.util import create_transport_details, peer2str
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.util import _is_tls_error, _maybe_tls_reason
from autobahn.wamp.types import TransportDetails
from autobahn.websocket.protocol import FrameHeader, TrafficStats, WebSocketProtocol
from autobahn.websocket.utf8validator import Utf8Validator
from twisted.python.failure import Failure

from vaporproxy.relay.fastwrite import direct_writer, send_now
from vaporproxy.ws.autobahn_compat.handshake import fast_handshake, open_websocket
from vaporproxy.ws.autobahn_compat.timer import ReactorTimer
from vaporproxy.ws.per_connection import PerConnection

__all__ = [
    "READ_BY",
    "RELIES_ON",
    "STATE_CLOSED",
    "STATE_CONNECTING",
    "STATE_OPEN",
    "FastServerFactory",
    "FastServerProtocol",
    "ReactorTimer",
    "autobahn_debug",
    "with_options",
]

STATE_OPEN = WebSocketProtocol.STATE_OPEN
STATE_CONNECTING = WebSocketProtocol.STATE_CONNECTING
STATE_CLOSED = WebSocketProtocol.STATE_CLOSED

#: (module or class, attribute) pairs this module relies on: the contract
#: test checks each exists in the installed Autobahn.  Instance attributes
#: set by Autobahn at run time are listed as C{("instance", name)} and
#: checked on an open protocol; names Autobahn reads from a method's body
#: are listed as C{("read by", "module.Class.method", name)} in L{READ_BY}.
RELIES_ON = (
    ("autobahn.util", "_is_tls_error"),
    ("autobahn.util", "_maybe_tls_reason"),
    ("autobahn.twisted.util", "create_transport_details"),
    ("autobahn.twisted.util", "peer2str"),
    ("autobahn.websocket.protocol.WebSocketProtocol", "__init__"),
    ("autobahn.websocket.protocol.WebSocketProtocol", "_connectionMade"),
    ("autobahn.websocket.protocol.WebSocketProtocol", "_connectionLost"),
    ("autobahn.websocket.protocol.WebSocketProtocol", "_dataReceived"),
    ("autobahn.websocket.protocol.WebSocketProtocol", "_cancelAutoPingTimeoutCall"),
    ("autobahn.websocket.protocol.WebSocketProtocol", "processControlFrame"),
    ("autobahn.websocket.protocol.WebSocketServerProtocol", "succeedHandshake"),
    ("autobahn.websocket.protocol.WebSocketProtocol", "STATE_OPEN"),
    ("autobahn.websocket.protocol.WebSocketProtocol", "STATE_CONNECTING"),
    ("autobahn.websocket.protocol.WebSocketProtocol", "STATE_CLOSED"),
    ("autobahn.websocket.protocol.WebSocketServerProtocol", "CONFIG_ATTRS"),
    ("autobahn.twisted.websocket.WebSocketServerProtocol", "_connectionMade"),
    ("autobahn.twisted.websocket.WebSocketServerProtocol", "_connectionLost"),
    ("autobahn.twisted.websocket.WebSocketServerFactory", "setProtocolOptions"),
    ("autobahn.websocket.protocol.FrameHeader", "__init__"),
    ("autobahn.websocket.protocol", "TrafficStats"),
    ("autobahn.websocket.protocol.WebSocketProtocol", "SEND_STATE_GROUND"),
    ("autobahn.websocket.utf8validator", "Utf8Validator"),
    # The opening handshake's common case (L{fast_handshake}).
    ("autobahn.websocket.protocol", "_url_to_origin"),
    ("autobahn.websocket.protocol", "_is_same_origin"),
    ("autobahn.websocket.protocol.WebSocketProtocol", "_parseExtensionsHeader"),
    ("autobahn.websocket.protocol.WebSocketServerProtocol", "processHandshake"),
    ("autobahn.websocket.protocol.WebSocketServerProtocol", "failHandshake"),
    ("autobahn.websocket.protocol.WebSocketProtocol", "_WS_MAGIC"),
    ("autobahn.twisted.websocket.WebSocketAdapterProtocol", "_onOpen"),
    ("autobahn.websocket.protocol.WebSocketProtocol", "_sendAutoPing"),
    ("autobahn.websocket.protocol.WebSocketProtocol", "consumeData"),
    # The epoll reactor's dispatch (L{event_loop}; its instance attributes
    # C{_poller} and C{_selectables} and the copied loop's shape are checked
    # by tests/ws/test_event_loop.py).
    ("twisted.internet.epollreactor.EPollReactor", "_doReadOrWrite"),
    ("instance", "_wskey"),
    ("instance", "http_request_params"),
    ("instance", "websocket_protocols"),
    ("instance", "websocket_extensions"),
    ("instance", "_batched_timer"),
    ("instance", "_transport_details"),
    ("instance", "send_queue"),
    ("instance", "logOctets"),
    ("instance", "trafficStats"),
    ("instance", "current_frame"),
    ("instance", "inside_message"),
    ("instance", "data"),
    ("instance", "autoPingTimeoutCall"),
    ("instance", "autoPingRestartOnAnyTraffic"),
)


#: Attributes vaporproxy sets for an Autobahn method to read (the control
#: frame handed to C{processControlFrame}).
READ_BY = (
    ("autobahn.websocket.protocol.WebSocketProtocol.processControlFrame", "control_frame_data"),
    # What L{fast_handshake} sets in place of Autobahn's processHandshake.
    ("autobahn.websocket.protocol.WebSocketServerProtocol.succeedHandshake", "_wskey"),
    ("autobahn.websocket.protocol.WebSocketServerProtocol.succeedHandshake", "websocket_protocols"),
    ("autobahn.websocket.protocol.WebSocketServerProtocol.succeedHandshake", "websocket_extensions"),
)


def _queued(protocol: Any) -> bool:
    """Whether Autobahn queued writes (without making the queue: L{PerConnection})."""
    return bool(protocol.__dict__.get("send_queue"))


def autobahn_debug() -> bool:
    """
    Whether txaio's global log level (which Autobahn's loggers follow)
    lets debug lines through: then Autobahn's own code runs unchanged.
    """
    return txaio.get_global_log_level() in ("debug", "trace")


class FastServerProtocol(WebSocketServerProtocol):
    """
    Autobahn's server protocol with its per-connection overheads removed;
    behaviour is Autobahn's (with debug logging on, Autobahn's own code runs).
    """

    #: Autobahn's _connectionMade copies every option in CONFIG_ATTRS from
    #: the factory and pformats the list for a debug line, evaluated even
    #: when debug logging is off (about a tenth of a console's set-up
    #: cost).  L{autobahn_connection_made} copies them instead, once per
    #: factory configuration, and Autobahn is given nothing to copy.
    CONFIG_ATTRS: tuple = ()
    _OPTIONS_FROM_FACTORY = tuple(WebSocketServerProtocol.CONFIG_ATTRS)

    # Autobahn's initial per-connection state (WebSocketProtocol.__init__
    # and _connectionMade), as class defaults where every connection starts
    # with the same immutable value, and made on first use where it is an
    # object of its own (L{PerConnection}): about 55 attributes fewer on
    # each open console, whose attribute table then fits the next smaller
    # size (memory per console, issue 8).  The contract test compares this
    # with what Autobahn's own code sets.
    is_open = PerConnection(txaio.create_future)
    is_closed = PerConnection(txaio.create_future)
    _valid_events = ["message"]
    _results = PerConnection(lambda: {"message": None})
    #: (Empty until L{transport_details} builds them: Autobahn's _onOpen
    #: reads this one, which nothing writes to.)
    _transport_details: Optional[TransportDetails] = TransportDetails()
    _perMessageCompress = None
    trackedTimings = None
    state = WebSocketProtocol.STATE_CONNECTING
    send_state = WebSocketProtocol.SEND_STATE_GROUND
    data = b""
    send_queue = PerConnection(deque)
    triggered = False
    utf8validator = PerConnection(Utf8Validator)
    wasMaxFramePayloadSizeExceeded = wasMaxMessagePayloadSizeExceeded = False
    closedByMe = failedByMe = droppedByMe = wasClean = False
    wasNotCleanReason = None
    wasServerConnectionDropTimeout = wasOpenHandshakeTimeout = wasCloseHandshakeTimeout = False
    wasServingFlashSocketPolicyFile = False
    localCloseCode = localCloseReason = remoteCloseCode = remoteCloseReason = None
    openHandshakeTimeoutCall = closeHandshakeTimeoutCall = None
    autoPingTimeoutCall = autoPingPending = autoPingPendingCall = autoPingPendingSent = None
    autoPingPendingSeq = 0

    #: The plain TCP transport that L{send_now} may write to directly.
    _ws_direct: Any = None
    #: The bytes for the client held while C{succeedHandshake} runs.
    _cork: Optional[List[bytes]] = None
    #: Whether L{transport_details} were built.
    _details_built = False
    #: The connection guard that stepped aside for this protocol and still
    #: counts the connection as pending (L{vaporproxy.http.guard}).
    _connection_guard: Any = None

    def guarded_by(self, guard: Any) -> None:
        """
        The port switch put this protocol on the transport under the
        connection guard (L{vaporproxy.ws.switch}): the guard is told of
        every answer until the 101 (C{saw}) and of the connection's end
        (C{lost}), which it saw as a wrapper before.  Without the guard in
        the path, L{sendData}'s direct send and L{succeedHandshake}'s cork
        work again (the wrapper was not a TCP transport, so the 101 went
        through a buffered write and every relay write after it queued
        behind it): 3.50 M -> 3.25 M instructions per set-up (-7%),
        bench/setupcost.py, 2026-12-05.
        """
        self._connection_guard = guard

    def sendData(self, data: bytes, sync: bool = False, chopsize: Optional[int] = None) -> None:
        """
        Autobahn's C{sendData} (the 101 answer, close frames, pings) written
        straight to a plain TCP socket when nothing is queued (one send
        instead of a write-readiness round trip per console); Autobahn's
        own otherwise (queued, chopped or octet-logged writes, debug on).
        Measured 2026-12-04 with L{succeedHandshake}'s cork: without both,
        2.72 M instructions per set-up instead of 2.65 M (+2.6%).
        """
        guard = self._connection_guard
        if guard is not None:
            guard.saw(data)
            if not guard.pending:
                self._connection_guard = None
        cork = self._cork
        if cork is not None:
            if not (sync or chopsize):
                cork.append(data)
                return
            if cork:  # what is corked goes first, to keep the order
                send_now(self._ws_direct, list(cork))
                cork.clear()
        direct = self._ws_direct
        if direct is None or sync or chopsize or _queued(self) or self.logOctets or autobahn_debug():
            super().sendData(data, sync, chopsize)
            return
        send_now(direct, (data,))
        if self.state == STATE_OPEN:
            self.trafficStats.outgoingOctetsWireLevel += len(data)
        elif self.state == STATE_CONNECTING:
            self.trafficStats.preopenOutgoingOctetsWireLevel += len(data)

    # Autobahn's server-side _connectionMade and _connectionLost are the
    # base class's plus the factory's connection count, and a debug line
    # whose arguments (hltype() with click styling, str() of the Failure)
    # are computed even when debug logging is off: about 1.5% of a
    # console's set-up cost (re-measured 2026-12-04 on this layout: without
    # these two overrides 2.71 M instructions per set-up instead of 2.65 M,
    # +2.3%).

    def __init__(self) -> None:
        """Nothing to make: see the class defaults above."""

    def _connectionMade(self) -> None:
        if autobahn_debug():
            super()._connectionMade()
            return
        # WebSocketProtocol._connectionMade less what the class defaults
        # hold (and its options loop and debug line: nothing to copy).
        self.trafficStats = TrafficStats()
        if self.openHandshakeTimeout > 0:
            self.openHandshakeTimeoutCall = self.factory._batched_timer.call_later(
                self.openHandshakeTimeout, self.onOpenHandshakeTimeout
            )
        self.factory.countConnections += 1

    def _connectionLost(self, reason: Any) -> None:
        if autobahn_debug():
            super()._connectionLost(reason)
            return
        WebSocketProtocol._connectionLost(self, reason)
        self.factory.countConnections -= 1

    def connectionMade(self) -> None:
        self.autobahn_connection_made()

    def autobahn_connection_made(self) -> None:
        """
        Autobahn's Twisted adapter's C{connectionMade} without its closing
        debug line (hltype() computed even when debug is off); the factory's
        options are class attributes (L{FastServerFactory.buildProtocol}),
        transport details are built on first use (L{transport_details}).
        """
        # Plain TCP: the 101 answer and the guard's bytes go straight to the
        # socket too.
        self._ws_direct = direct_writer(self.transport)
        if autobahn_debug():
            WebSocketServerProtocol.connectionMade(self)
            return
        self.peer = peer2str(self.transport)
        try:
            self.transport.setTcpNoDelay(self.tcpNoDelay)
        except Exception:
            pass  # not TCP (e.g. a Unix socket)
        self._connectionMade()

    def autobahn_connection_lost(self, reason: Failure) -> None:
        """
        Autobahn's Twisted adapter's C{connectionLost} (a TLS failure logged
        as an error, then C{_connectionLost}) without its debug lines.
        """
        guard = self._connection_guard
        if guard is not None:
            self._connection_guard = None
            guard.lost()
        if autobahn_debug():
            WebSocketServerProtocol.connectionLost(self, reason)
            return
        if _is_tls_error(reason.value):
            self.log.error(_maybe_tls_reason(reason.value))
        self._connectionLost(reason)

    def processHandshake(self) -> None:
        """
        Autobahn's check of the opening handshake request, done by
        L{fast_handshake} for an ordinary request (the same state, the
        same answer) and by Autobahn's own method otherwise (every refusal
        is Autobahn's).  With it (and the deprecated Deferred.callbacks no
        longer read in setup_path), 2.711 M instructions per set-up
        instead of 2.848 M (-4.8%); with L{open_websocket} as well,
        2.670 M (bench/setupcost.py, 2026-12-06).
        """
        if autobahn_debug() or not fast_handshake(self):
            super().processHandshake()

    def succeedHandshake(self, res: Any) -> None:
        """
        Autobahn's C{succeedHandshake} (the 101 answer, then C{onOpen}) with
        the bytes for the client corked until it returns: on plain TCP the
        101 and the guard's greeting leave in one write instead of two.
        There the usual answer is built by L{open_websocket}.
        """
        if self._ws_direct is None or _queued(self) or self.logOctets or autobahn_debug():
            super().succeedHandshake(res)
        else:
            self._cork = []
            try:
                if not open_websocket(self, res):
                    super().succeedHandshake(res)
            finally:
                self.uncork()
        if self.state == STATE_OPEN:
            # Only the opening handshake reads what it parsed: an open
            # console does not keep the request's text (about 2 KB).
            d = self.__dict__
            for name in _HANDSHAKE_ONLY:
                d[name] = None

    def uncork(self) -> None:
        """
        Send what was corked in one write; from now on bytes for the client
        leave as they come.
        """
        cork, self._cork = self._cork, None
        if cork:
            send_now(self._ws_direct, cork)

    @property
    def transport_details(self) -> Optional[TransportDetails]:
        """
        Autobahn's details of this connection, built on first use: nothing
        in vaporproxy reads them, and building them for every console (two
        system calls and a validated object) was a visible share of a
        console's set-up cost (issue #3).
        """
        if not self._details_built and self.transport is not None:
            details = create_transport_details(self.transport, self.is_server)
            details.channel_framing = TransportDetails.CHANNEL_FRAMING_WEBSOCKET
            self._transport_details = details
            self._details_built = True
        return self._transport_details

    # -- what the relay's own frame parser needs of Autobahn's --------------

    def parser_between_messages(self) -> bool:
        """
        Whether the WebSocket is open and Autobahn's parser is between
        messages (what it holds is at most part of the next frame header),
        so that the relay's parser may take over.
        """
        return self.state == STATE_OPEN and self.current_frame is None and not self.inside_message

    def take_unparsed(self) -> bytes:
        """
        The bytes Autobahn's parser holds, now the relay's parser's.
        """
        held, self.data = self.data, b""
        return held

    def handshake_buffered(self) -> int:
        """
        How many bytes of opening handshake Autobahn holds (it holds any
        number; the caller caps it).
        """
        return len(self.data) if self.state == STATE_CONNECTING else 0

    def autobahn_feed(self, data: bytes) -> None:
        """
        Bytes for Autobahn's own parser (before the relay's takes over).
        """
        self._dataReceived(data)

    def clear_handshake(self) -> None:
        self.data = b""

    def control_frame(self, opcode: int, payload: bytes) -> None:
        """
        A whole close, ping or pong frame read by the relay's parser,
        handled by Autobahn exactly as its own parser would (pong, auto-ping
        bookkeeping, closing handshake): the relay skips Autobahn's
        per-frame parsing of data frames (issue #3, the relay hot path).
        """
        self.current_frame = FrameHeader(opcode, True, 0, len(payload), None)
        self.control_frame_data = [payload]
        try:
            self.processControlFrame()
        finally:
            self.current_frame = None

    def traffic_seen(self) -> None:
        """
        As Autobahn does on every data frame (autobahn-python #1327): any
        traffic restarts the auto-ping timeout.
        """
        if self.autoPingTimeoutCall and self.autoPingRestartOnAnyTraffic:
            self._cancelAutoPingTimeoutCall()


def with_options(protocol: type, factory: Any) -> type:
    """
    A subclass of C{protocol} (same name) whose class attributes are the
    options Autobahn's C{_connectionMade} would copy from C{factory} onto
    every connection (those C{protocol} does not set itself): a
    connection keeps the options of the moment it was accepted, as before,
    without 28 attributes of its own.
    """
    options: Dict[str, Any] = {
        name: getattr(factory, name) for name in protocol._OPTIONS_FROM_FACTORY if not hasattr(protocol, name)
    }
    for name, value in options.items():
        if hasattr(type(value), "__get__"):
            options[name] = staticmethod(value)  # (a function option is not a method)
    options.update(__module__=protocol.__module__, __qualname__=protocol.__qualname__)
    return type(protocol.__name__, (protocol,), options)


class FastServerFactory(WebSocketServerFactory):
    """
    Autobahn's server factory running Autobahn's timers on the injected
    reactor, its protocol options held by a protocol class
    (L{with_options}) instead of copied onto each connection.
    """

    #: C{protocol} with the current options (L{with_options}); made anew
    #: after every change of options.
    _protocol_class: Optional[type] = None

    def buildProtocol(self, addr: Any) -> Any:
        cls = self._protocol_class
        if cls is None or cls.__base__ is not self.protocol:
            if not issubclass(self.protocol, FastServerProtocol):
                return super().buildProtocol(addr)
            cls = self._protocol_class = with_options(self.protocol, self)
        protocol = cls()
        protocol.factory = self
        return protocol

    def use_reactor(self, reactor: Any) -> None:
        # Autobahn schedules its own timeouts through txaio's global loop;
        # run them on the injected reactor instead (DESIGN.md rule 1).
        self._batched_timer = ReactorTimer(reactor)
        self.timers = self._batched_timer.timers

    def setProtocolOptions(self, *args: Any, **kwargs: Any) -> None:
        super().setProtocolOptions(*args, **kwargs)
        self._protocol_class = None

    def resetProtocolOptions(self) -> None:
        super().resetProtocolOptions()
        self._protocol_class = None

    def __setattr__(self, name: str, value: Any) -> None:
        # An option set directly on the factory (not through
        # setProtocolOptions) is seen by the next connection too.
        if name in _OPTION_NAMES:
            self.__dict__["_protocol_class"] = None
        object.__setattr__(self, name, value)


#: What Autobahn keeps of the opening handshake that nothing reads once the
#: WebSocket is open (the request line, headers, query, key, origin, the
#: 101 answer).
_HANDSHAKE_ONLY = (
    "http_request_data", "http_status_line", "http_headers", "http_request_uri", "http_request_path",
    "http_request_params", "http_request_host", "websocket_origin", "_wskey", "http_response_data",
    "websocket_extensions",
)  # fmt: skip

_OPTION_NAMES = frozenset(WebSocketServerProtocol.CONFIG_ATTRS)
