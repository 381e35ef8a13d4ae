"""
The VM's RFB messages after the handshake, framed so that clipboard
transfers from the VM can be dropped (SPEC.md "Clipboard policy":
C{from_vm} and C{max_size}); sans-IO.

Framing the VM's stream means framing every FramebufferUpdate rectangle,
and rectangles come in many encodings.  Two pieces keep that tractable:

  - L{restrict_encodings} rewrites the browser's SetEncodings so the VM
    only ever uses encodings this module frames (L{KEPT_ENCODINGS} says
    why each one is kept); everything else the browser offers is removed.
  - L{RFBServerFilter} frames the server messages and drops ServerCutText
    (plain, and extended: a negative length) when C{from_vm} is off or the
    transfer is longer than C{max_size}.  An extended transfer is
    measured as sent (flags and zlib data), as rfbclient measures the
    browser's.

The filter buffers only headers: rectangle data and clipboard text are
passed (or skipped) as they arrive, so memory stays bounded whatever the
VM sends.  A message type, encoding, Tight control byte or QEMU
sub-message it does not know fails closed with L{PolicyViolation} (the
console closes with 4012): past it, the proxy could not tell where the
next message starts, nor could it promise that no clipboard text gets
through.

Pixel sizes follow the pixel format the browser reads the stream with:
the ServerInit's, then each SetPixelFormat the browser sends (the client
side calls L{RFBServerFilter.set_pixel_format}).  An update the VM had
already started in the old format when a SetPixelFormat reached it would
be misframed; noVNC sets its format once, before its first update
request, so no update is in flight then.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, Dict, Generator, Optional, Tuple

from vaporproxy.relay.policy import PolicyViolation

__all__ = ["OutputPolicy", "RFBServerFilter", "restrict_encodings", "KEPT_ENCODINGS", "pixel_sizes"]

#: ExtendedClipboard, 0xC0A1E5CE, as the signed number SetEncodings carries.
EXTENDED_CLIPBOARD = 0xC0A1E5CE - 2**32

#: Encodings and pseudo-encodings the VM may use, and why each can be framed.
KEPT_ENCODINGS = {
    0: "Raw: w*h*bytes-per-pixel",
    1: "CopyRect: 4 bytes",
    2: "RRE: u32 count, a background pixel, count * (pixel + 8)",
    6: "Zlib: u32 length + data",
    7: "Tight: control byte; fill, JPEG, or basic (filter, palette, compact length)",
    16: "ZRLE: u32 length + data",
    -223: "DesktopSize: no data",
    -224: "LastRect: no data, ends the update",
    -239: "Cursor: w*h*bytes-per-pixel + ceil(w/8)*h mask",
    -240: "XCursor: 6 colour bytes + 2 * ceil(w/8)*h bitmaps (none when empty)",
    -258: "QEMUExtendedKeyEvent: no data",
    -259: "QEMU audio: no data (then message 255)",
    -261: "QEMU LED state: 1 byte",
    -307: "DesktopName: u32 length + name",
    -308: "ExtendedDesktopSize: 4 + 16 * screens",
    -309: "XVP: no rectangle (message 250, 4 bytes)",
    -312: "Fence: no rectangle (message 248, 9 + length)",
    -313: "ContinuousUpdates: no rectangle (message 150, 1 byte)",
    EXTENDED_CLIPBOARD: "ExtendedClipboard: no rectangle (message 3, negative length)",
}
for _level in range(10):
    KEPT_ENCODINGS[-32 + _level] = "JPEG quality level: no rectangle"
    KEPT_ENCODINGS[-256 + _level] = "compression level: no rectangle"
del _level

#: The most encodings a SetEncodings may list (as in rfbclient).
MAX_ENCODINGS = 1024

_U16 = struct.Struct("!H").unpack_from
_U32 = struct.Struct("!I").unpack_from
_S32 = struct.Struct("!i").unpack_from
_RECT = struct.Struct("!HHHHi").unpack_from
_PIXEL_FORMAT = struct.Struct("!BBBBHHH").unpack_from


def restrict_encodings(set_encodings_message: bytes) -> bytes:
    """
    The browser's SetEncodings message with only L{KEPT_ENCODINGS}, in the
    browser's order (the VM prefers the first it supports).

    @raise PolicyViolation: when the message is not one whole SetEncodings.
    """
    message = set_encodings_message
    if len(message) < 4 or message[0] != 2:
        raise PolicyViolation("not a SetEncodings message")
    count = _U16(message, 2)[0]
    if count > MAX_ENCODINGS or len(message) != 4 + 4 * count:
        raise PolicyViolation(f"SetEncodings of {len(message)} bytes lists {count} encodings")
    kept = [message[i : i + 4] for i in range(4, len(message), 4) if _S32(message, i)[0] in KEPT_ENCODINGS]
    if len(kept) == count:
        return message
    return message[:2] + struct.pack("!H", len(kept)) + b"".join(kept)


def pixel_sizes(pixel_format: bytes) -> Tuple[int, int]:
    """
    The bytes of one pixel, and of one Tight TPIXEL, in the 16-byte RFB
    PIXEL_FORMAT C{pixel_format}: a TPIXEL is 3 bytes when the format is
    true colour, 32 bits per pixel, depth 24 and 255 for every colour max
    (as the community RFB protocol's Tight, and noVNC, read it), else one pixel.

    @raise PolicyViolation: for a bits-per-pixel other than 8, 16 or 32.
    """
    bits, depth, _big_endian, true_colour, red, green, blue = _PIXEL_FORMAT(pixel_format)
    if bits not in (8, 16, 32):
        raise PolicyViolation(f"pixel format of {bits} bits per pixel")
    bpp = bits // 8
    packed = true_colour and bits == 32 and depth == 24 and red == green == blue == 255
    return bpp, (3 if packed else bpp)


@dataclass(frozen=True)
class OutputPolicy:
    """
    What a console's VM may send to the browser: the VM's clipboard
    (C{from_vm}) and the longest transfer (C{max_size}).  Apart from
    L{vaporproxy.relay.policy.InputPolicy}, which holds the browser's side
    and has no C{from_vm}.
    """

    clipboard_from_vm: bool = True
    clipboard_max: int = 64 * 1024

    @property
    def filters(self) -> bool:
        """
        Whether any ServerCutText can be dropped (else no filter is
        needed).  A finite C{max_size}, as by default, is enough.
        """
        return not self.clipboard_from_vm or self.clipboard_max < 2**31


# What the parser asks of the feeding loop: (what, how many bytes).
READ = 0  # header bytes, passed to the browser, and sent into the parser
HOLD = 1  # header bytes, sent into the parser, passed only if it says so
PASS = 2  # bytes passed to the browser as they arrive
SKIP = 3  # bytes dropped as they arrive

Parser = Generator[Tuple[int, int], Optional[bytes], None]


class RFBServerFilter:
    """
    Frames the VM's stream and drops ServerCutText by C{policy}.

    @param pixel_format: the ServerInit's 16-byte PIXEL_FORMAT.
    @param on_drop: called with C{"clipboard"} for each dropped transfer
        (metrics).
    """

    def __init__(
        self,
        policy: OutputPolicy,
        pixel_format: bytes,
        on_drop: Optional[Callable[[str], None]] = None,
    ):
        self.policy = policy
        self._on_drop = on_drop
        self.set_pixel_format(pixel_format)
        self._buf = b""
        self._out: list = []
        self._failed: Optional[str] = None
        #: Bytes of rectangle data or text still to pass (> 0) or skip (< 0).
        self._stream = 0
        #: Header bytes the parser waits for, and whether they are held.
        self._need = 0
        self._hold = False
        #: Rectangles framed so far, by encoding (which ones the VM uses).
        self.rectangles: Dict[int, int] = {}
        self._parser = self._messages()
        self._ask(next(self._parser))

    def set_pixel_format(self, pixel_format: bytes) -> None:
        """
        The browser sent SetPixelFormat (C{pixel_format}: its 16 bytes from
        offset 4): later updates use it.
        """
        self._bpp, self._tpixel = pixel_sizes(pixel_format)

    @property
    def at_message_boundary(self) -> bool:
        """Whether everything fed so far ends with a whole message."""
        return not self._buf and not self._stream and self._hold and self._need == 1

    def feed(self, data: bytes) -> bytes:
        """
        Bytes from the VM, in any fragmentation; answer the bytes for the
        browser.

        @raise PolicyViolation: on what cannot be framed; every later call
            raises it again.
        """
        if self._failed is not None:
            raise PolicyViolation(self._failed)
        out = self._out = []
        buf = self._buf + data if self._buf else data
        pos = 0
        end = len(buf)
        try:
            while pos < end:
                stream = self._stream
                if stream:
                    take = min(abs(stream), end - pos)
                    if stream > 0:
                        # A view, not a copy: the join below copies once.
                        out.append(buf if pos == 0 and take == end else memoryview(buf)[pos : pos + take])
                        self._stream -= take
                    else:
                        self._stream += take
                    pos += take
                    if self._stream:
                        break
                    self._ask(self._parser.send(None))
                    continue
                need = self._need
                if end - pos < need:
                    break
                chunk = buf[pos : pos + need]
                pos += need
                if not self._hold:
                    out.append(chunk)
                self._ask(self._parser.send(chunk))
        except PolicyViolation as e:
            self._failed = str(e)
            raise
        self._buf = buf[pos:]
        return b"".join(out)

    def _ask(self, request: Tuple[int, int]) -> None:
        """Set up the feeding loop for the parser's next request."""
        what, size = request
        while what >= PASS and size == 0:
            what, size = self._parser.send(None)
        if what >= PASS:
            self._stream = size if what == PASS else -size
        else:
            self._need = size
            self._hold = what == HOLD

    def _messages(self) -> Parser:
        """The parser: one server message after another, forever."""
        while True:
            first = yield HOLD, 1
            kind = first[0]
            if kind == 3:
                yield from self._cut_text(first)
                continue
            self._out.append(first)
            if kind == 0:
                header = yield READ, 3
                yield from self._update(_U16(header, 1)[0])
            elif kind == 1:
                header = yield READ, 5
                yield PASS, 6 * _U16(header, 3)[0]
            elif kind == 248:
                header = yield READ, 8
                yield PASS, header[7]
            elif kind == 250:
                yield READ, 3
            elif kind == 255:
                yield from self._qemu()
            elif kind not in (2, 150):
                raise PolicyViolation(f"unknown RFB server message type {kind}")

    def _cut_text(self, first: bytes) -> Parser:
        header = yield HOLD, 7
        length = abs(_S32(header, 3)[0])
        policy = self.policy
        if not policy.clipboard_from_vm or length > policy.clipboard_max:
            if self._on_drop is not None:
                self._on_drop("clipboard")
            yield SKIP, length
        else:
            self._out.append(first + header)
            yield PASS, length

    def _qemu(self) -> Parser:
        header = yield READ, 3
        if header[0] != 1:
            raise PolicyViolation(f"unknown QEMU server message {header[0]}")
        operation = _U16(header, 1)[0]
        if operation == 2:
            length = yield READ, 4
            yield PASS, _U32(length)[0]
        elif operation not in (0, 1):
            raise PolicyViolation(f"unknown QEMU audio operation {operation}")

    def _update(self, count: int) -> Parser:
        """A FramebufferUpdate's rectangles (LastRect may end it early)."""
        for _ in range(count):
            header = yield READ, 12
            _x, _y, width, height, encoding = _RECT(header)
            if encoding == -224:
                return
            framer = _RECTS.get(encoding)
            if framer is None:
                raise PolicyViolation(f"unknown RFB encoding {encoding}")
            self.rectangles[encoding] = self.rectangles.get(encoding, 0) + 1
            yield from framer(self, width, height)

    def _raw(self, width: int, height: int) -> Parser:
        yield PASS, width * height * self._bpp

    def _copy_rect(self, width: int, height: int) -> Parser:
        yield READ, 4

    def _rre(self, width: int, height: int) -> Parser:
        header = yield READ, 4 + self._bpp
        yield PASS, _U32(header)[0] * (self._bpp + 8)

    def _length_prefixed(self, width: int, height: int) -> Parser:
        header = yield READ, 4
        yield PASS, _U32(header)[0]

    def _no_data(self, width: int, height: int) -> Parser:
        yield PASS, 0

    def _cursor(self, width: int, height: int) -> Parser:
        yield PASS, width * height * self._bpp + (width + 7) // 8 * height

    def _x_cursor(self, width: int, height: int) -> Parser:
        yield PASS, (6 + 2 * ((width + 7) // 8) * height) if width and height else 0

    def _led_state(self, width: int, height: int) -> Parser:
        yield READ, 1

    def _extended_desktop_size(self, width: int, height: int) -> Parser:
        header = yield READ, 4
        yield PASS, 16 * header[0]

    def _tight(self, width: int, height: int) -> Parser:
        """
        A Tight rectangle, read as noVNC's core/decoders/tight.js reads it.
        """
        control = (yield READ, 1)[0] >> 4
        if control == 8:  # fill: one TPIXEL
            yield READ, self._tpixel
            return
        if control == 9:  # JPEG
            yield from self._compact_data()
            return
        if control & 8:  # 10 is PNG, which only TightPNG may send
            raise PolicyViolation(f"unknown Tight compression control {control}")
        tight_filter = (yield READ, 1)[0] if control & 4 else 0
        if tight_filter == 0:  # copy
            size = width * height * self._tpixel
        elif tight_filter == 1:  # palette
            colours = (yield READ, 1)[0] + 1
            yield PASS, colours * self._tpixel
            size = ((width + 7) // 8 if colours <= 2 else width) * height
        elif tight_filter == 2:  # gradient
            size = width * height * self._tpixel
        else:
            raise PolicyViolation(f"unknown Tight filter {tight_filter}")
        if size:
            yield from self._tight_data(size)

    def _tight_data(self, size: int) -> Parser:
        """
        Tight data of C{size} bytes before compression: sent as is under
        12 bytes, else compressed with a compact length.
        """
        if size < 12:
            yield PASS, size
        else:
            yield from self._compact_data()

    def _compact_data(self) -> Parser:
        """Data after a compact length: 7 bits a byte, then 8 in the third."""
        length = 0
        for shift in (0, 7, 14):
            byte = (yield READ, 1)[0]
            if shift == 14:
                length |= byte << 14
            else:
                length |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    break
        yield PASS, length


#: Rectangle encoding -> its framer.
_RECTS = {
    0: RFBServerFilter._raw,
    1: RFBServerFilter._copy_rect,
    2: RFBServerFilter._rre,
    6: RFBServerFilter._length_prefixed,
    7: RFBServerFilter._tight,
    16: RFBServerFilter._length_prefixed,
    -223: RFBServerFilter._no_data,
    -239: RFBServerFilter._cursor,
    -240: RFBServerFilter._x_cursor,
    -258: RFBServerFilter._no_data,
    -259: RFBServerFilter._no_data,
    -261: RFBServerFilter._led_state,
    -307: RFBServerFilter._length_prefixed,
    -308: RFBServerFilter._extended_desktop_size,
}
