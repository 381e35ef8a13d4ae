"""
The listening port's protocol switch (issue #3).

A console's WebSocket opens with C{GET .../console/ws?token=... HTTP/1.1}
on a fresh connection.  Through twisted.web that request is parsed twice:
once by twisted.web (an L{HTTPChannel}, a L{Request}, resource lookup),
and once more by Autobahn, to which
L{autobahn.twisted.resource.WebSocketResource} replays it.  L{SwitchFactory}
sits at the listening port instead and reads only the first request line of
each connection (at most C{max_line} bytes, for at most C{timeout} seconds):

  - a C{GET} of the console WebSocket path (C{ws_request_line}) goes
    straight to the WebSocket factory's protocol, which parses the opening
    handshake itself (Autobahn: origin, token, limits, client address and
    every other check happen in its C{onConnect} and after, as before);
  - anything else (other requests, a line that is too long, a client that
    is slow to send its first line) goes to the HTTP factory's protocol
    (twisted.web), with the bytes read so far replayed; that connection is
    twisted.web's from then on, keep-alive and later upgrades through
    L{WebSocketResource} included.

The switch is an ordinary protocol factory: an C{ssl:} endpoint wraps it in
L{twisted.protocols.tls.TLSMemoryBIOFactory}, a C{haproxy:} one in its
PROXY-header wrapper, and the switch sees the decrypted, unwrapped bytes.
Once it has decided, the chosen protocol takes the switch's place on the
transport (the way L{WebSocketResource} hands a connection over), so the
switch costs nothing after the first request line.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Pattern

from twisted.internet.interfaces import IAddress, IDelayedCall, IProtocol, IProtocolFactory, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.policies import ProtocolWrapper

from vaporproxy.timers import timers_for

__all__ = ["CONSOLE_WS_REQUEST_LINE", "MAX_REQUEST_LINE", "REQUEST_LINE_TIMEOUT", "SwitchFactory"]

#: The request line of a console WebSocket, as the switch hands it to the
#: WebSocket factory: C{GET}, the console WebSocket path with one VM id
#: segment without percent-escapes (the same paths as the HTTP API's own
#: direct WebSocket route; other spellings go through twisted.web, which
#: decodes them), an optional query, HTTP/1.1.
CONSOLE_WS_REQUEST_LINE = re.compile(
    rb"GET /api/v1/virtualization/virtualmachines/[^/%?# \t\r\n]+/console/ws(?:\?[^# \t\r\n]*)? HTTP/1\.1\r?\n"
)

#: The longest first line read before giving up and handing the bytes to
#: twisted.web (the length of one line it accepts: C{HTTPChannel.MAX_LENGTH}).
MAX_REQUEST_LINE = 16384

#: How long to wait for the first request line before handing the
#: connection to twisted.web, whose own timeouts then apply as they always
#: did (a browser's pre-connected socket may stay silent for a while).
REQUEST_LINE_TIMEOUT = 10.0


def _cancel(call: Optional[IDelayedCall]) -> None:
    if call is not None and call.active():
        call.cancel()


def _past_guard(transport: Any, protocol: Any) -> Any:
    """
    The transport a console WebSocket's C{protocol} writes to: the one
    under the connection guard (L{vaporproxy.http.guard}) when the guard
    can step aside and the protocol can tell it what it answers and when it
    closes (C{guarded_by}); C{transport} itself otherwise.  Writing past the
    guard lets the 101 answer leave in one direct send (measured with
    C{bench/setupcost.py}: see the README's Performance section).
    """
    step_aside = getattr(transport, "step_aside", None)
    guarded_by = getattr(protocol, "guarded_by", None)
    if step_aside is None or guarded_by is None:
        return transport
    under = step_aside(protocol)
    if under is None:
        return transport
    guarded_by(transport)
    return under


class _Switch(Protocol):
    """
    One connection until its first request line is read.
    """

    _timer: Optional[IDelayedCall] = None
    _buffer = b""
    _decided = False

    def __init__(self, factory: "SwitchFactory", addr: IAddress):
        self._factory = factory
        self._addr = addr

    def connectionMade(self) -> None:
        factory = self._factory
        self._timer = factory.timers.callLater(factory.timeout, self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        buffered = self._buffer
        if buffered:
            start = len(buffered)
            data = buffered + data
            self._buffer = b""
        else:
            start = 0
        factory = self._factory
        eol = data.find(b"\n", start)
        if eol < 0:
            if len(data) > factory.max_line:
                self._switch(factory.http_factory, data)
            else:
                self._buffer = data
            return
        if factory.ws_request_line.match(data, 0, eol + 1) is not None:
            self._switch(factory.ws_factory, data)
        else:
            self._switch(factory.http_factory, data)

    def _timed_out(self) -> None:
        self._timer = None
        if not self._decided:
            data, self._buffer = self._buffer, b""
            self._switch(self._factory.http_factory, data)

    def connectionLost(self, reason: Any = None) -> None:
        _cancel(self._timer)
        self._timer = None
        self._buffer = b""

    def _switch(self, factory: IProtocolFactory, data: bytes) -> None:
        """
        Hand the connection to a protocol of C{factory}, then C{data}.
        """
        self._decided = True
        _cancel(self._timer)
        self._timer = None
        transport = self.transport
        protocol = factory.buildProtocol(self._addr)
        if protocol is None:
            transport.loseConnection()
            return
        if factory is self._factory.ws_factory:
            # (The switch lets go of the guard: they would hold each other,
            # with the protocol's bound methods, past the console's end.)
            transport = self.transport = _past_guard(transport, protocol)
        self._replace(transport, protocol)
        protocol.makeConnection(transport)
        if data:
            protocol.dataReceived(data)

    def _replace(self, transport: Any, protocol: IProtocol) -> None:
        """
        Put C{protocol} in this switch's place: on the transport itself
        when it is a protocol wrapper (TLS, PROXY header) or a socket
        (C{protocol} attribute), as L{WebSocketResource} does; and, for
        whatever may still hold the switch, forward its two inbound events.
        """
        if isinstance(transport, ProtocolWrapper):
            if transport.wrappedProtocol is self:
                transport.wrappedProtocol = protocol
        elif getattr(transport, "protocol", None) is self:
            transport.protocol = protocol
        self.dataReceived = protocol.dataReceived  # type: ignore[method-assign]
        self.connectionLost = protocol.connectionLost  # type: ignore[method-assign]


class SwitchFactory(Factory):
    """
    The listening factory: console WebSocket upgrades to C{ws_factory},
    everything else to C{http_factory} (see the module docstring).

    @ivar http_factory: twisted.web's site (started and stopped with this
        factory; its name is the port's log prefix, as before).
    @ivar ws_factory: the console WebSocket factory
        (L{vaporproxy.ws.bridge.ConsoleBridgeFactory}).
    """

    noisy = False

    def __init__(
        self,
        http_factory: Any,
        ws_factory: Any,
        clock: IReactorTime,
        *,
        ws_request_line: Pattern[bytes] = CONSOLE_WS_REQUEST_LINE,
        max_line: int = MAX_REQUEST_LINE,
        timeout: float = REQUEST_LINE_TIMEOUT,
    ):
        self.http_factory = http_factory
        self.ws_factory = ws_factory
        self.clock = clock
        self.timers = timers_for(clock)
        self.ws_request_line = ws_request_line
        self.max_line = max_line
        self.timeout = timeout

    def logPrefix(self) -> str:
        prefix = getattr(self.http_factory, "logPrefix", None)
        return prefix() if prefix is not None else self.http_factory.__class__.__name__

    def doStart(self) -> None:
        self.http_factory.doStart()
        super().doStart()

    def doStop(self) -> None:
        super().doStop()
        self.http_factory.doStop()

    def buildProtocol(self, addr: IAddress) -> _Switch:
        return _Switch(self, addr)
