"""
L{vaporproxy.relay.rfbserver} framing a real QEMU's VNC stream.

A plain QEMU (no password, SeaBIOS on a std VGA showing a smooth colour
boot splash, reset now and then over QMP so the screen changes mode and
redraws; VNC with C{lossy=on,non-adaptive=on} so that Tight uses JPEG and
the gradient filter too) is dialled by a small blocking
RFB client: version 3.8, security None, shared ClientInit, then
SetPixelFormat and a SetEncodings restricted by L{restrict_encodings}, then
update requests for a few seconds.  The bytes received are fed, in the
pieces they arrived in and byte at a time, to an L{RFBServerFilter} that
lets the clipboard through: the output must equal the input, end at a
message boundary, and have framed rectangles of the encoding QEMU chose.
With C{from_vm} off, the extended-clipboard capabilities QEMU 7 sends when
offered ExtendedClipboard are the only bytes dropped.

A real clipboard transfer comes from QEMU too: a second VNC client sets
QEMU's clipboard, and QEMU tells the watcher (extended clipboard: notify,
then the zlib text on request); the filter passes it, drops it with
C{from_vm} off, or drops only the text over C{max_size}.  The blocking client runs in set-up, outside the code
under test, which is pure.
"""

from __future__ import annotations

import os
import socket
import struct
import time
import zlib
from collections import Counter
from functools import partial
from typing import Callable, List, Tuple

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.qemu_fixture import QemuProcess, start_diskless_qemu
from tests.support import recv_exactly
from vaporproxy.relay import rfbserver
from vaporproxy.relay.rfbserver import EXTENDED_CLIPBOARD, OutputPolicy, RFBServerFilter, restrict_encodings

#: noVNC's SetPixelFormat (32 bits, depth 24) and a 16-bit 565 one.
PF_32 = struct.pack("!BBBBHHHBBBxxx", 32, 24, 0, 1, 255, 255, 255, 0, 8, 16)
PF_16 = struct.pack("!BBBBHHHBBBxxx", 16, 16, 0, 1, 31, 63, 31, 11, 5, 0)
#: An 8-bit colour map: QEMU answers with SetColourMapEntries.
PF_8_MAP = struct.pack("!BBBBHHHBBBxxx", 8, 8, 0, 0, 0, 0, 0, 0, 0, 0)

#: noVNC's encodings (quality 6, compression 2) and QEMU's audio ack.
NOVNC_ENCODINGS = [
    1, 7, -260, 16, 21, 5, 2, 6, 0, -26, -254, -223, -224, -258, -261, -308, -309, -312, -313,
    -307, EXTENDED_CLIPBOARD, -316, 0x574D5664, -239, -259,
]

#: How long to ask for updates, and the quiet that ends a capture.
CAPTURE_SECONDS = 3.0
QUIET_SECONDS = 0.7


def set_encodings(encodings: List[int]) -> bytes:
    return struct.pack("!BxH", 2, len(encodings)) + b"".join(struct.pack("!i", e) for e in encodings)


def splash_bmp(width: int = 640, height: int = 480) -> bytes:
    """
    A 24-bit BMP of smooth colour gradients: Tight sends such a picture
    as JPEG, or through its gradient filter.
    """
    pad = b"\0" * ((4 - width * 3 % 4) % 4)
    rows = []
    for y in range(height - 1, -1, -1):
        rows.append(
            b"".join(bytes((x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height))) for x in range(width))
            + pad
        )
    data = b"".join(rows)
    header = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, len(data), 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54 + len(data), 0, 0, 54) + header + data


def start_plain_qemu(testcase: SynchronousTestCase) -> QemuProcess:
    """
    QEMU with VNC (no password, lossy encodings allowed) on 127.0.0.1, a
    boot splash and QMP, killed at clean-up.
    """

    def display(workdir: str) -> List[str]:
        splash = os.path.join(workdir, "splash.bmp")
        with open(splash, "wb") as f:
            f.write(splash_bmp())
        return ["-vnc", "127.0.0.1:10,to=90,lossy=on,non-adaptive=on",
                "-boot", "menu=on,splash=%s,splash-time=3000" % (splash,)]  # fmt: skip

    return start_diskless_qemu(testcase, display, lambda *a: QemuProcess(*a, spice_port=0))


def handshake(sock: socket.socket) -> bytes:
    """
    RFB 3.8 with security None and a shared ClientInit; answer the
    ServerInit's pixel format.
    """
    version = recv_exactly(sock, 12)
    assert version.startswith(b"RFB 003."), version
    sock.sendall(b"RFB 003.008\n")
    count = recv_exactly(sock, 1)[0]
    types = recv_exactly(sock, count)
    assert 1 in types, types
    sock.sendall(b"\x01")
    assert recv_exactly(sock, 4) == b"\0\0\0\0"
    sock.sendall(b"\x01")
    server_init = recv_exactly(sock, 24)
    recv_exactly(sock, struct.unpack_from("!I", server_init, 20)[0])
    return server_init[4:20]


def announces_more(held: bytes) -> bool:
    """
    Whether C{held} (bytes the filter kept back at the end of a capture)
    is shorter than the smallest server message its first bytes announce:
    a FramebufferUpdate's rectangle headers, SetColourMapEntries' colours,
    ServerCutText's text (read here without the filter).
    """
    if not held:
        return True
    kind = held[0]
    if kind == 0:
        return len(held) < 4 or len(held) < 4 + 12 * struct.unpack_from("!H", held, 2)[0]
    if kind == 1:
        return len(held) < 6 or len(held) < 6 + 6 * struct.unpack_from("!H", held, 4)[0]
    if kind == 3:
        return len(held) < 8 or len(held) < 8 + abs(struct.unpack_from("!i", held, 4)[0])
    return False


def at_boundary(pixel_format: bytes, server_format: bytes, pieces: List[bytes]) -> bool:
    """Whether C{pieces} end where a message ends (the filter's reading)."""
    f = RFBServerFilter(OutputPolicy(), server_format)
    f.set_pixel_format(pixel_format)
    f.feed(b"".join(pieces))
    return f.at_message_boundary


def capture(
    qemu: QemuProcess, pixel_format: bytes, encodings: bytes, complete: Callable[[bytes, List[bytes]], bool]
) -> Tuple[bytes, List[bytes]]:
    """
    Connect, set C{pixel_format} and C{encodings}, ask for updates (a full
    one every few requests) while resetting the VM twice, then read until
    the VM is quiet and C{complete(server_format, pieces)} (a loaded host's
    QEMU may pause mid-message for longer than the quiet time: up to two
    more quiet times are waited for the rest); answer the ServerInit's
    pixel format and the pieces received after the handshake.
    """
    pieces: List[bytes] = []
    with socket.create_connection(("127.0.0.1", qemu.vnc_port), timeout=10) as sock:
        server_format = handshake(sock)
        sock.sendall(struct.pack("!Bxxx", 0) + pixel_format + encodings)
        sock.settimeout(0.05)
        start = time.monotonic()
        resets = [0.8, 1.8]
        requests = 0
        while time.monotonic() - start < CAPTURE_SECONDS:
            if resets and time.monotonic() - start > resets[0]:
                resets.pop(0)
                qemu.qmp("system_reset")
            incremental = 0 if requests % 4 == 0 else 1
            sock.sendall(struct.pack("!BBHHHH", 3, incremental, 0, 0, 2048, 2048))
            requests += 1
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                raise EOFError("VNC server closed")
            pieces.append(chunk)
        sock.settimeout(QUIET_SECONDS)
        waits = 0
        while True:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                waits += 1
                if waits > 2 or complete(server_format, pieces):
                    break
                continue
            if not chunk:
                break
            pieces.append(chunk)
    return server_format, pieces


def drain(sock: socket.socket, quiet: float = QUIET_SECONDS) -> bytes:
    """What C{sock} receives until it has been quiet for C{quiet} seconds."""
    sock.settimeout(quiet)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        pass
    return data


def capture_clipboard(qemu: QemuProcess, text: bytes) -> Tuple[bytes, bytes]:
    """
    Connect a watcher offering ExtendedClipboard and ask for one update;
    connect a second client that sets QEMU's clipboard to C{text} with a
    plain ClientCutText; have the watcher request the text.  Answer the
    ServerInit's pixel format and the watcher's stream: an update, QEMU's
    clipboard capabilities, its notify and its provide (zlib) messages.
    """
    with socket.create_connection(("127.0.0.1", qemu.vnc_port), timeout=10) as watcher:
        server_format = handshake(watcher)
        encodings = restrict_encodings(set_encodings([16, 0, -258, EXTENDED_CLIPBOARD]))
        update_request = struct.pack("!BBHHHH", 3, 0, 0, 0, 2048, 2048)
        watcher.sendall(struct.pack("!Bxxx", 0) + PF_32 + encodings + update_request)
        with socket.create_connection(("127.0.0.1", qemu.vnc_port), timeout=10) as other:
            handshake(other)
            stream = drain(watcher)
            other.sendall(struct.pack("!BxxxI", 6, len(text)) + text)
            stream += drain(watcher)
            request_text = struct.pack("!Bxxxi", 6, -4) + struct.pack("!I", 1 << 25 | 1)
            watcher.sendall(request_text)
            stream += drain(watcher)
    return server_format, stream


def cut_texts(stream: bytes) -> List[Tuple[int, int]]:
    """
    Where the extended ServerCutText messages of C{stream} start and end,
    found by their header (a test of the filter must not use the filter).
    """
    found = []
    at = stream.find(b"\x03\x00\x00\x00\xff\xff\xff")
    while at >= 0:
        end = at + 8 - struct.unpack_from("!i", stream, at + 4)[0]
        found.append((at, end))
        at = stream.find(b"\x03\x00\x00\x00\xff\xff\xff", end)
    return found


def without_clipboard_caps(stream: bytes, encodings: List[int]) -> bytes:
    """
    C{stream} without the extended-clipboard capabilities QEMU sends (a
    ServerCutText with a negative length) when the client offers
    ExtendedClipboard.
    """
    if EXTENDED_CLIPBOARD not in encodings:
        return stream
    at = stream.find(b"\x03\x00\x00\x00\xff\xff\xff")
    assert at >= 0, "no extended clipboard capabilities from QEMU"
    length = -struct.unpack_from("!i", stream, at + 4)[0]
    return stream[:at] + stream[at + 8 + length :]


def count_tight_modes(testcase: SynchronousTestCase) -> Counter:
    """
    Count the Tight rectangles framed during C{testcase} by mode (fill,
    jpeg, copy, palette, gradient), by wrapping the Tight framer.
    """
    counts: Counter = Counter()
    original: Callable = rfbserver._RECTS[7]

    def counting(self, width, height):
        framer = original(self, width, height)
        request = next(framer)
        control = yield request
        mode = control[0] >> 4
        try:
            request = framer.send(control)
            if mode & 12 == 4:
                chosen = yield request
                counts[("copy", "palette", "gradient")[chosen[0]]] += 1
                request = framer.send(chosen)
            else:
                counts["fill" if mode == 8 else "jpeg" if mode == 9 else "copy"] += 1
            while True:
                request = framer.send((yield request))
        except StopIteration:
            return

    rfbserver._RECTS[7] = counting
    testcase.addCleanup(rfbserver._RECTS.__setitem__, 7, original)
    return counts


class RFBServerFilterQemuTests(SynchronousTestCase):
    """
    The filter frames what a real QEMU sends, with every encoding it picks.
    """

    def setUp(self) -> None:
        self.qemu = start_plain_qemu(self)

    def frame(self, pixel_format: bytes, encodings: List[int], expected_encoding: int) -> bytes:
        """
        Capture QEMU's stream with C{pixel_format} and C{encodings} and
        check the filter frames it; answer the stream.
        """
        restricted = restrict_encodings(set_encodings(encodings))
        server_format, pieces = capture(self.qemu, pixel_format, restricted, partial(at_boundary, pixel_format))
        captured = b"".join(pieces)
        f = RFBServerFilter(OutputPolicy(), server_format)
        f.set_pixel_format(pixel_format)
        stream = b"".join(f.feed(p) for p in pieces)
        # A capture can end inside a message (on a loaded host QEMU has
        # sent an update's header and paused past the quiet times): the
        # filter holds that message's start, which must be shorter than
        # the smallest message its first bytes announce; the checks below
        # use the stream up to it.
        held = captured[len(stream) :]
        self.assertEqual(stream + held, captured)
        self.assertTrue(announces_more(held), held[:32])
        self.assertEqual(f.at_message_boundary, not held)
        self.assertGreater(len(stream), 2000)
        self.assertGreater(f.rectangles.get(expected_encoding, 0), 0)
        self.assertIn(-258, f.rectangles)
        prefix = stream[:100000]
        f = RFBServerFilter(OutputPolicy(), server_format)
        f.set_pixel_format(pixel_format)
        self.assertEqual(b"".join(f.feed(prefix[i : i + 1]) for i in range(len(prefix))), prefix)
        drops = []
        dropping = RFBServerFilter(OutputPolicy(clipboard_from_vm=False), server_format, drops.append)
        dropping.set_pixel_format(pixel_format)
        self.assertEqual(dropping.feed(stream), without_clipboard_caps(stream, encodings))
        self.assertEqual(drops, ["clipboard"] if EXTENDED_CLIPBOARD in encodings else [])
        self.assertTrue(dropping.at_message_boundary)
        return stream

    def test_tight(self):
        """
        When noVNC's encodings are restricted, QEMU picks Tight, JPEG among its modes, and its whole stream is framed and passed unchanged.
        """
        modes = count_tight_modes(self)
        self.frame(PF_32, NOVNC_ENCODINGS, 7)
        self.assertGreater(modes["jpeg"], 0, modes)
        self.assertGreater(modes["copy"], 0, modes)

    def test_tightGradient(self):
        """
        When no JPEG quality is offered and compression is at its highest, QEMU's Tight uses the gradient filter and the stream is framed and passed unchanged.
        """
        modes = count_tight_modes(self)
        self.frame(PF_32, [e for e in NOVNC_ENCODINGS if e not in (-26, -254)] + [-247], 7)
        self.assertGreater(modes["gradient"], 0, modes)

    def test_tight16(self):
        """
        When the browser asks for 16-bit pixels, QEMU's Tight stream (two-byte TPIXELs) is framed and passed unchanged.
        """
        self.frame(PF_16, NOVNC_ENCODINGS, 7)

    def test_colourMap(self):
        """
        When the browser asks for an 8-bit colour map, QEMU's SetColourMapEntries and one-byte Tight pixels are framed and passed unchanged.
        """
        stream = self.frame(PF_8_MAP, NOVNC_ENCODINGS, 7)
        self.assertEqual(stream[:1], b"\x01")

    def test_zrle(self):
        """
        When Tight is not offered, QEMU picks ZRLE and its whole stream is framed and passed unchanged.
        """
        self.frame(PF_32, [e for e in NOVNC_ENCODINGS if e != 7], 16)

    def test_zlib(self):
        """
        When only Zlib and Raw are offered, QEMU picks Zlib and its whole stream is framed and passed unchanged.
        """
        self.frame(PF_32, [6, 0, -223, -258, -261, -308], 6)

    def test_raw(self):
        """
        When only Raw is offered, QEMU's Raw stream is framed and passed unchanged.
        """
        self.frame(PF_32, [0, -223, -258, -261, -308, -307], 0)


class ClipboardFromQemuTests(SynchronousTestCase):
    """
    A real clipboard transfer from QEMU, dropped or passed by policy.
    """

    TEXT = b"text copied in another VNC client"

    def setUp(self) -> None:
        self.server_format, self.stream = capture_clipboard(start_plain_qemu(self), self.TEXT)
        self.messages = cut_texts(self.stream)
        self.assertEqual(len(self.messages), 3, self.stream[:200])

    def feed(self, policy: OutputPolicy) -> Tuple[bytes, List[str]]:
        drops: List[str] = []
        f = RFBServerFilter(policy, self.server_format, drops.append)
        f.set_pixel_format(PF_32)
        out = b"".join(f.feed(self.stream[i : i + 1000]) for i in range(0, len(self.stream), 1000))
        self.assertTrue(f.at_message_boundary)
        self.assertGreater(f.rectangles.get(16, 0), 0)
        return out, drops

    def test_fromVmOn(self):
        """
        When clipboard from_vm is on, QEMU's extended clipboard messages reach the browser unchanged, the text inside.
        """
        out, drops = self.feed(OutputPolicy())
        self.assertEqual((out, drops), (self.stream, []))
        provide_start, provide_end = self.messages[2]
        self.assertIn(self.TEXT, zlib.decompress(out[provide_start + 12 : provide_end]))

    def test_fromVmOff(self):
        """
        When clipboard from_vm is off, none of QEMU's clipboard messages reaches the browser, and the update does.
        """
        out, drops = self.feed(OutputPolicy(clipboard_from_vm=False))
        expected = self.stream
        for start, end in reversed(self.messages):
            expected = expected[:start] + expected[end:]
        self.assertEqual((out, drops), (expected, ["clipboard"] * 3))
        self.assertNotIn(b"\x03\x00\x00\x00\xff\xff\xff", out)

    def test_maxSize(self):
        """
        When the transfer holding the text is longer than max_size, only it is dropped; the short capabilities and notify pass.
        """
        provide_start, provide_end = self.messages[2]
        out, drops = self.feed(OutputPolicy(clipboard_max=provide_end - provide_start - 9))
        self.assertEqual(out, self.stream[:provide_start] + self.stream[provide_end:])
        self.assertEqual(drops, ["clipboard"])
