"""
The relay's hot path for WebSocket frames (issue #3), sans-IO.

L{ClientFrameParser} reads the frames a browser sends once a console is
relaying: masked binary data frames (whole or fragmented into continuation
frames) are unmasked at C speed and handed on in one piece per read;
everything else is reported to the caller (control frames to be answered
by Autobahn, text frames to be refused, protocol errors to fail the
connection).  It is strict: RFC 6455 section 5 as it applies to a server
that negotiated no extension.

L{unmask} is the XOR unmasking with a 4-byte key; L{send_now} writes to a
plain TCP transport at once when its buffer is empty, the way a relay wants
to (one C{send} instead of registering for writability and waiting a
reactor turn), and falls back to the transport's own buffered C{write}.
"""

from __future__ import annotations

import os
from typing import Any, Callable, List, Optional, Tuple

# Re-exported: writing straight to a plain TCP socket reads Twisted's
# transport internals, so it lives with them (relay/fastwrite.py).
from vaporproxy.relay.fastwrite import direct_writer, send_now

__all__ = [
    "CLOSE_PROTOCOL_ERROR",
    "CLOSE_MESSAGE_TOO_BIG",
    "ClientFrameParser",
    "direct_writer",
    "send_now",
    "unmask",
]

#: Close codes for frames that fail the connection (RFC 6455 7.4.1).
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_MESSAGE_TOO_BIG = 1009

_OP_CONTINUATION = 0x0
_OP_TEXT = 0x1
_OP_BINARY = 0x2
_OP_CLOSE = 0x8
_OP_PING = 0x9
_OP_PONG = 0xA


# ---------------------------------------------------------------------------
# Unmasking
# ---------------------------------------------------------------------------

#: Below this many bytes, one big-integer XOR beats a call into C via cffi.
_SMALL = 128

_TABLES = [bytes(i ^ b for i in range(256)) for b in range(256)]


def _unmask_int(data: Any, mask: bytes) -> bytes:
    n = len(data)
    key = (mask * ((n >> 2) + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def _unmask_translate(data: Any, mask: bytes) -> bytearray:
    """
    Pure-Python fallback for large payloads: four strided C{translate}s.
    """
    data = bytes(data)
    out = bytearray(data)
    for i in range(4):
        out[i::4] = data[i::4].translate(_TABLES[mask[i]])
    return out


def _load_nvx() -> Any:
    """
    Autobahn's native XOR masker (C, SSE2), called directly: one masker per
    call, no Python wrapper objects.  C{None} when unavailable or when
    C{AUTOBAHN_USE_NVX} is set to a false value.
    """
    if os.environ.get("AUTOBAHN_USE_NVX", "").lower() in ("0", "false"):
        return None
    try:
        from _nvx_xormasker import ffi, lib  # type: ignore[import-not-found]
    except ImportError:
        return None
    new, process, free, from_buffer, null = (
        lib.nvx_xormask_new,
        lib.nvx_xormask_process,
        lib.nvx_xormask_free,
        ffi.from_buffer,
        ffi.NULL,
    )

    def unmask_native(data: Any, mask: bytes) -> bytearray:
        masker = new(mask)
        if masker == null:
            return bytearray(_unmask_translate(data, mask))
        try:
            buf = bytearray(data)
            process(masker, from_buffer(buf), len(buf))
        finally:
            free(masker)
        return buf

    return unmask_native


_unmask_large: Callable[[Any, bytes], bytearray] = _load_nvx() or _unmask_translate


def unmask(data: Any, mask: bytes) -> Any:
    """
    XOR C{data} (bytes-like) with the 4-byte C{mask} repeated from its
    first byte: C{bytes}, or a fresh C{bytearray} for large payloads (no
    copy to C{bytes} when the result is joined with others anyway).
    """
    if len(data) < _SMALL:
        return _unmask_int(data, mask)
    return _unmask_large(data, mask)


# ---------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------


class ClientFrameParser:
    """
    Parse client-to-server WebSocket frames in the relaying state.

    Callbacks (all called in stream order; C{on_data} is called at most
    once per L{feed} between other callbacks, with the payload of every
    data frame piece parsed so far joined):

      - C{on_data(payload)}: unmasked bytes of binary messages;
      - C{on_control(opcode, payload)}: a whole, unmasked close, ping or pong
        frame (after a close frame the parser reads nothing more);
      - C{on_text()}: a text message started (its payload is skipped);
      - C{on_error(code, reason)}: the stream broke the protocol (1002) or
        a size cap (1009); the parser reads nothing more.

    @ivar max_size: the cap on one frame's and one message's payload
        (0: none), as Autobahn's C{maxFramePayloadSize} and
        C{maxMessagePayloadSize}.
    """

    __slots__ = (
        "max_size",
        "_on_data",
        "_on_control",
        "_on_text",
        "_on_error",
        "_pending",
        "_remaining",
        "_mask",
        "_skip",
        "_in_message",
        "_message_text",
        "_message_size",
        "_frame_fin",
        "stopped",
    )

    def __init__(
        self,
        max_size: int,
        on_data: Callable[[bytes], Any],
        on_control: Callable[[int, bytes], Any],
        on_text: Callable[[], Any],
        on_error: Callable[[int, str], Any],
    ):
        self.max_size = max_size
        self._on_data = on_data
        self._on_control = on_control
        self._on_text = on_text
        self._on_error = on_error
        #: Bytes of an incomplete frame header (or control frame).
        self._pending = b""
        #: Payload bytes still to come in the current data frame.
        self._remaining = 0
        #: The current data frame's mask, rotated to the next byte's phase.
        self._mask = b""
        #: The current data frame belongs to a text message: drop it.
        self._skip = False
        self._in_message = False
        self._message_text = False
        self._message_size = 0
        self._frame_fin = True
        #: True once a close frame or an error was read.
        self.stopped = False

    def set_data_callback(self, on_data: Callable[[bytes], Any]) -> None:
        """Send data payloads to C{on_data} from now on (a console's stages)."""
        self._on_data = on_data

    @property
    def idle(self) -> bool:
        """
        Whether the parser is between messages with nothing buffered.
        """
        return not (self._pending or self._remaining or self._in_message)

    def feed(self, data: bytes) -> None:
        """
        Parse C{data}, the next bytes from the client.
        """
        if self.stopped:
            return
        if self._pending:
            data = self._pending + data
            self._pending = b""
        end = len(data)
        remaining = self._remaining
        if remaining:
            # The rest of a data frame, possibly the whole read.
            skip = self._skip
            mask = self._mask
            if remaining >= end:
                self._remaining = remaining = remaining - end
                if not skip:
                    self._mask = _rotate(mask, end)
                    self._on_data(bytes(unmask(data, mask)))
                if not remaining:
                    self._frame_done()
                return
            out: List[bytes] = [] if skip else [unmask(memoryview(data)[:remaining], mask)]
            self._remaining = 0
            self._frame_done()
            pos = remaining
        else:
            # Fast case: the read is exactly one small, whole binary frame.
            n = end - 6
            if 0 <= n < 126 and data[0] == 0x82 and data[1] == 0x80 + n and not self._in_message:
                if not 0 < self.max_size < n:
                    if n:
                        self._on_data(_unmask_int(data[6:], data[2:6]))
                    return
            pos = 0
            out = []
        self._parse(data, pos, end, out)

    def _parse(self, data: bytes, pos: int, end: int, out: List[bytes]) -> None:
        """Parse the frames of C{data[pos:end]}; C{out}: payload bytes not yet passed on."""
        view = memoryview(data)
        while pos < end:
            if end - pos < 2:
                self._pending = data[pos:]
                break
            b0 = data[pos]
            b1 = data[pos + 1]
            problem = _header_problem(b0, b1)
            if problem is not None:
                return self._fail(out, CLOSE_PROTOCOL_ERROR, problem)
            opcode = b0 & 0x0F
            if opcode >= 8:
                stop = pos + 6 + (b1 & 0x7F)
                if stop > end:
                    self._pending = data[pos:]
                    break
                self._control(data, view, pos, stop, opcode, out)
                if self.stopped:
                    return None
                pos = stop
                continue
            header, length, problem = _data_length(data, pos, end, b1 & 0x7F)
            if problem is not None:
                return self._fail(out, CLOSE_PROTOCOL_ERROR, problem)
            if not header:
                self._pending = data[pos:]
                break
            if not self._begin_frame(b0, opcode, length, out):
                return None
            mask = data[pos + header - 4 : pos + header]
            pos = self._payload(data, view, pos + header, end, mask, length, out)
        if out:
            self._on_data(b"".join(out))
        return None

    def _control(self, data: bytes, view: memoryview, pos: int, stop: int, opcode: int, out: List[bytes]) -> None:
        """A whole control frame: the data before it passed on first."""
        payload = _unmask_int(view[pos + 6 : stop], data[pos + 2 : pos + 6]) if stop > pos + 6 else b""
        if out:
            self._on_data(b"".join(out))
            out.clear()
        if opcode == _OP_CLOSE:
            self.stopped = True
        self._on_control(opcode, payload)

    def _begin_frame(self, b0: int, opcode: int, length: int, out: List[bytes]) -> bool:
        """
        A data frame's header: check it against the message it starts or
        continues and the size cap; C{False} when it failed the stream.
        """
        if opcode == _OP_CONTINUATION:
            if not self._in_message:
                self._fail(out, CLOSE_PROTOCOL_ERROR, "continuation frame outside a message")
                return False
            size = self._message_size + length
        elif opcode == _OP_BINARY or opcode == _OP_TEXT:
            if self._in_message:
                self._fail(out, CLOSE_PROTOCOL_ERROR, "new message inside a fragmented message")
                return False
            self._message_text = opcode == _OP_TEXT
            size = length
        else:
            self._fail(out, CLOSE_PROTOCOL_ERROR, f"reserved data opcode {opcode}")
            return False
        max_size = self.max_size
        if 0 < max_size < size:
            self._fail(out, CLOSE_MESSAGE_TOO_BIG, f"message of {size} bytes exceeds the cap of {max_size}")
            return False
        if opcode == _OP_TEXT:
            if out:
                self._on_data(b"".join(out))
                out.clear()
            self._on_text()
        self._in_message = True
        self._message_size = size
        self._frame_fin = bool(b0 & 0x80)
        return True

    def _payload(
        self, data: bytes, view: memoryview, pos: int, end: int, mask: bytes, length: int, out: List[bytes]
    ) -> int:
        """A data frame's payload from C{pos}, whole or its start; answer where parsing goes on."""
        skip = self._skip = self._message_text
        available = end - pos
        if length <= available:
            if length and not skip:
                out.append(unmask(view[pos : pos + length], mask))
            self._frame_done()
            return pos + length
        if available and not skip:
            out.append(unmask(view[pos:end], mask))
        self._remaining = length - available
        self._mask = _rotate(mask, available)
        return end

    def _frame_done(self) -> None:
        if self._frame_fin:
            self._in_message = False
            self._message_text = False
            self._message_size = 0
        self._skip = False

    def _fail(self, out: List[bytes], code: int, reason: str) -> None:
        if out:
            self._on_data(b"".join(out))
        self.stopped = True
        self._pending = b""
        self._on_error(code, reason)


def _rotate(mask: bytes, n: int) -> bytes:
    """
    C{mask} as it applies to the byte C{n} positions further on.
    """
    k = n & 3
    return mask[k:] + mask[:k] if k else mask


def _header_problem(b0: int, b1: int) -> Optional[str]:
    """What is wrong with a frame's first two bytes, if anything."""
    if b0 & 0x70:
        return "RSV bits set without an extension"
    if not b1 & 0x80:
        return "unmasked client frame"
    opcode = b0 & 0x0F
    if opcode < 8:
        return None
    length = b1 & 0x7F
    if opcode > _OP_PONG:
        return f"reserved control opcode {opcode}"
    if not b0 & 0x80:
        return "fragmented control frame"
    if length > 125:
        return "control frame longer than 125 bytes"
    if opcode == _OP_CLOSE and length == 1:
        return "close frame with a 1-byte payload"
    return None


def _data_length(data: bytes, pos: int, end: int, length: int) -> Tuple[int, int, Optional[str]]:
    """
    A data frame's header size and payload length (header size 0: the
    header is not all there yet), or what is wrong with its length.
    """
    if length == 126:
        if end - pos < 8:
            return 0, 0, None
        length = (data[pos + 2] << 8) | data[pos + 3]
        if length < 126:
            return 0, 0, "frame length not minimally encoded"
        return 8, length, None
    if length == 127:
        if end - pos < 14:
            return 0, 0, None
        length = int.from_bytes(data[pos + 2 : pos + 10], "big")
        if length >> 63:
            return 0, 0, "frame length above 2**63"
        if length < 0x10000:
            return 0, 0, "frame length not minimally encoded"
        return 14, length, None
    if end - pos < 6:
        return 0, 0, None
    return 6, length, None
