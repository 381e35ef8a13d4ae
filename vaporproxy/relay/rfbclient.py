"""
The browser's RFB messages after the handshake, framed and filtered by
policy (SPEC.md "Access modes", "Clipboard policy"); sans-IO.

A view-only console lets through only what draws the screen:
SetPixelFormat (0), SetEncodings (2), FramebufferUpdateRequest (3),
EnableContinuousUpdates (150) and Fence (248).  Input (KeyEvent,
PointerEvent, QEMU's extended key event), clipboard (ClientCutText, plain
and extended), SetDesktopSize, XVP and QEMU's audio control are dropped.  A
message type this module does not know fails closed: L{PolicyViolation}
(the console closes with 4012 BAD_REQUEST), since the proxy could not tell
where the next message starts.

Clipboard to the VM: with C{to_vm} off every ClientCutText is dropped; a
transfer longer than C{max_size} is dropped either way.  The text of a
transfer is streamed (passed or skipped as it arrives), never buffered.

Framing must agree with the VM's: the PointerEvent of noVNC's
ExtendedMouseButtons extension is 7 bytes instead of 6 once the VM
confirmed the pseudo-encoding (-316).  The filter removes that
pseudo-encoding from SetEncodings, so the VM never confirms it and every
PointerEvent is 6 bytes on both sides (filtered consoles lose mouse buttons
8 and up: back/forward).
"""

from __future__ import annotations

import struct
from typing import Any, Callable, Optional

from vaporproxy.relay.policy import InputPolicy, PolicyViolation

__all__ = ["RFBClientFilter"]

#: ExtendedMouseButtons, as it appears in a SetEncodings message.
EXTENDED_MOUSE_BUTTONS = struct.pack("!i", -316)

#: The most encodings a SetEncodings may list (noVNC sends about 30).
MAX_ENCODINGS = 1024

#: Message types a view-only console passes.
VIEW_ALLOWED = frozenset({0, 2, 3, 150, 248})

_U16 = struct.Struct("!H").unpack_from
_S32 = struct.Struct("!i").unpack_from


def _size_fixed(size: int) -> Callable[[bytes], Optional[int]]:
    return lambda buf: size


def _size_set_encodings(buf: bytes) -> Optional[int]:
    if len(buf) < 4:
        return None
    count = _U16(buf, 2)[0]
    if count > MAX_ENCODINGS:
        raise PolicyViolation(f"SetEncodings lists {count} encodings (at most {MAX_ENCODINGS})")
    return 4 + 4 * count


def _size_fence(buf: bytes) -> Optional[int]:
    return 9 + buf[8] if len(buf) >= 9 else None


def _size_set_desktop_size(buf: bytes) -> Optional[int]:
    return 8 + 16 * buf[6] if len(buf) >= 8 else None


def _size_qemu(buf: bytes) -> Optional[int]:
    if len(buf) < 2:
        return None
    if buf[1] == 0:  # extended key event
        return 12
    if buf[1] == 1:  # audio: enable, disable (4 bytes) or set format (10)
        if len(buf) < 4:
            return None
        operation = _U16(buf, 2)[0]
        if operation in (0, 1):
            return 4
        if operation == 2:
            return 10
        raise PolicyViolation(f"unknown QEMU audio operation {operation}")
    raise PolicyViolation(f"unknown QEMU client message {buf[1]}")


#: Message type -> (kind, size of the whole message from its first bytes,
#: or None while more are needed).  ClientCutText (6) is streamed apart.
_MESSAGES = {
    0: ("screen", _size_fixed(20)),
    2: ("screen", _size_set_encodings),
    3: ("screen", _size_fixed(10)),
    4: ("input", _size_fixed(8)),
    5: ("input", _size_fixed(6)),
    150: ("screen", _size_fixed(10)),
    248: ("screen", _size_fence),
    250: ("input", _size_fixed(4)),
    251: ("input", _size_set_desktop_size),
    255: ("input", _size_qemu),
}


class RFBClientFilter:
    """
    Frames the browser's stream and keeps what C{policy} allows.

    @param on_drop: called with C{"input"} or C{"clipboard"} for each
        dropped message (metrics).
    @param pacer: an L{vaporproxy.relay.pacing.UpdatePacer} that decides
        when each FramebufferUpdateRequest reaches the VM
        (C{min_update_interval}), or C{None}.
    """

    def __init__(
        self, policy: InputPolicy, on_drop: Optional[Callable[[str], None]] = None, pacer: Optional[Any] = None
    ):
        self.policy = policy
        self._on_drop = on_drop
        self._pacer = pacer
        self._buf = b""
        #: Text bytes of the current ClientCutText still to pass (> 0) or
        #: to skip (< 0).
        self._text = 0

    def feed(self, data: bytes) -> bytes:
        """
        Bytes from the browser, in any fragmentation; answer the bytes for
        the VM.

        @raise PolicyViolation: on a message type that cannot be framed.
        """
        out = []
        buf = self._buf + data if self._buf else data
        pos = 0
        end = len(buf)
        while pos < end:
            if self._text:
                pos = self._stream_text(buf, pos, end, out)
                continue
            used = self._message(buf, pos, out)
            if used == 0:
                break
            pos += used
        self._buf = buf[pos:]
        return b"".join(out)

    def _stream_text(self, buf: bytes, pos: int, end: int, out: list) -> int:
        take = min(abs(self._text), end - pos)
        if self._text > 0:
            out.append(buf[pos : pos + take])
            self._text -= take
        else:
            self._text += take
        return pos + take

    def _message(self, buf: bytes, pos: int, out: list) -> int:
        """
        Handle the message at C{buf[pos:]}; answer the bytes used (0: more
        are needed).
        """
        kind_size = _MESSAGES.get(buf[pos])
        if kind_size is None:
            if buf[pos] == 6:
                return self._cut_text(buf, pos, out)
            raise PolicyViolation(f"unknown RFB client message type {buf[pos]}")
        kind, size_of = kind_size
        size = size_of(buf[pos : pos + 12] if buf[pos] != 2 else buf[pos : pos + 4])
        if size is None or len(buf) - pos < size:
            return 0
        message = buf[pos : pos + size]
        if kind == "input" and self.policy.view_only:
            self._dropped("input")
        elif buf[pos] == 2:
            out.append(_without_extended_mouse(message))
        elif buf[pos] == 3 and self._pacer is not None:
            paced = self._pacer.offer(message)
            if paced is not None:
                out.append(paced)
        else:
            out.append(message)
        return size

    def _cut_text(self, buf: bytes, pos: int, out: list) -> int:
        if len(buf) - pos < 8:
            return 0
        length = abs(_S32(buf, pos + 4)[0])
        policy = self.policy
        if policy.view_only or not policy.clipboard_to_vm or length > policy.clipboard_max:
            self._dropped("clipboard")
            self._text = -length
        else:
            out.append(buf[pos : pos + 8])
            self._text = length
        return 8

    def _dropped(self, kind: str) -> None:
        if self._on_drop is not None:
            self._on_drop(kind)


def _without_extended_mouse(message: bytes) -> bytes:
    """
    A SetEncodings message without the ExtendedMouseButtons pseudo-encoding.
    """
    encodings = [message[i : i + 4] for i in range(4, len(message), 4)]
    kept = [e for e in encodings if e != EXTENDED_MOUSE_BUTTONS]
    if len(kept) == len(encodings):
        return message
    return message[:2] + struct.pack("!H", len(kept)) + b"".join(kept)
