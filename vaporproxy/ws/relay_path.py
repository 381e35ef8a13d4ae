"""
The byte path of a console WebSocket once it is open (issue #3's hot
path): the browser's frames read by L{ClientFrameParser} instead of
Autobahn's general parser (control frames still go to Autobahn), the VM's
bytes sent as binary frames written straight to the socket (L{send_now})
when nothing is buffered, and both directions through the console's
pipeline when it has stages (L{vaporproxy.relay.pipeline}).
"""

from __future__ import annotations

import struct
from typing import Any

from vaporproxy.relay.policy import PolicyViolation
from vaporproxy.console.events import TEXT_MESSAGE, ProtocolError
from vaporproxy.ws.autobahn_compat import STATE_CLOSED, STATE_CONNECTING, STATE_OPEN
from vaporproxy.relay.fastwrite import send_now
from vaporproxy.ws.frames import ClientFrameParser

__all__ = ["MAX_HANDSHAKE_SIZE", "RelayPath"]

#: The largest opening handshake (request line and headers) accepted: as
#: twisted.web's request line plus headers (C{HTTPChannel.MAX_LENGTH} and
#: C{totalHeadersSize}).
MAX_HANDSHAKE_SIZE = 2 * 16384

_OPEN = STATE_OPEN
_CONNECTING = STATE_CONNECTING

_HEADER_SHORT = struct.Struct("!BB").pack
_HEADER_MEDIUM = struct.Struct("!BBH").pack
_HEADER_LONG = struct.Struct("!BBQ").pack


class RelayPath:
    """
    The byte path of L{vaporproxy.ws.channel.ConsoleWebSocketProtocol}
    (a part of that class: it uses the console's attributes).
    """

    _parser: Any = None
    _pipeline: Any = None
    _backend_direct: Any = None

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

    def _relay_data(self, payload: bytes) -> None:
        if not self.relaying:
            # The guard's handshake (or held until the guard exists).
            self._setup_message(payload, True)
            self.traffic_seen()
            return
        self.bytes_received += len(payload)
        self.last_activity = self._seconds()
        pipeline = self._pipeline
        if pipeline is not None:
            try:
                payload = pipeline.to_vm(payload)
            except PolicyViolation as e:
                self._policy_violation(e, "browser")
                return
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
        self._input(TEXT_MESSAGE)

    def _relay_error(self, code: int, reason: str) -> None:
        """
        The browser broke the protocol (1002) or a size cap (1009): close
        with that code and drop the connection, whose framing is lost.
        """
        self._input(ProtocolError(code, reason))
        if self.state != STATE_CLOSED:
            self.dropConnection(abort=False)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.relaying and isBinary:
            # Hot path.
            self.bytes_received += len(payload)
            self.last_activity = self._seconds()
            if self._pipeline is not None:
                try:
                    payload = self._pipeline.to_vm(payload)
                except PolicyViolation as e:
                    self._policy_violation(e, "browser")
                    return
            if payload:
                self._backend_write(payload)
            return
        self._setup_message(payload, isBinary)

    def relay_from_vm(self, data: bytes) -> None:
        """
        Hot path: the VM's bytes while relaying, as one binary message.
        """
        self.bytes_sent += len(data)
        self.last_activity = self._seconds()
        pipeline = self._pipeline
        if pipeline is not None:
            try:
                data = pipeline.to_browser(data)
            except PolicyViolation as e:
                self._policy_violation(e, "VM")
                return
            if not data:
                return
        self._send_binary(data)

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
