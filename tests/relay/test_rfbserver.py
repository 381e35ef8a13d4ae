"""
Tests for L{vaporproxy.relay.rfbserver}: the VM's RFB messages framed, with
clipboard from the VM dropped by policy, fed whole, byte at a time and in
random pieces; and SetEncodings restricted to what can be framed.
"""

import random
import struct

from twisted.trial.unittest import SynchronousTestCase

from vaporproxy.relay.policy import PolicyViolation
from vaporproxy.relay.rfbserver import (
    EXTENDED_CLIPBOARD,
    KEPT_ENCODINGS,
    OutputPolicy,
    RFBServerFilter,
    pixel_sizes,
    restrict_encodings,
)

#: noVNC's SetPixelFormat: 32 bits, depth 24, true colour, 255 maxima.
PF_32 = struct.pack("!BBBBHHHBBBxxx", 32, 24, 0, 1, 255, 255, 255, 0, 8, 16)
#: 16-bit true colour (565).
PF_16 = struct.pack("!BBBBHHHBBBxxx", 16, 16, 0, 1, 31, 63, 31, 11, 5, 0)
#: 32 bits at depth 32: a Tight TPIXEL is then 4 bytes.
PF_32_DEPTH_32 = struct.pack("!BBBBHHHBBBxxx", 32, 32, 0, 1, 255, 255, 255, 0, 8, 16)
#: 8-bit colour map.
PF_8_MAP = struct.pack("!BBBBHHHBBBxxx", 8, 8, 0, 0, 0, 0, 0, 0, 0, 0)


def rect(encoding, width, height, data=b"", x=0, y=0):
    """One rectangle: header and data."""
    return struct.pack("!HHHHi", x, y, width, height, encoding) + data


def update(*rects, count=None):
    """A FramebufferUpdate of C{rects} (C{count} overrides their number)."""
    return struct.pack("!BxH", 0, len(rects) if count is None else count) + b"".join(rects)


def compact(length):
    """A Tight compact length."""
    out = bytearray([length & 0x7F])
    if length > 0x7F:
        out[0] |= 0x80
        out.append((length >> 7) & 0x7F)
        if length > 0x3FFF:
            out[1] |= 0x80
            out.append(length >> 14)
    return bytes(out)


def cut_text(length, fill=b"t"):
    """A ServerCutText: plain for a positive C{length}, extended for a negative one."""
    return struct.pack("!Bxxxi", 3, length) + fill * abs(length)


# Messages other than FramebufferUpdate.
COLOUR_MAP = struct.pack("!BxHH", 1, 0, 2) + bytes(range(12))
BELL = bytes([2])
CUT_TEXT = cut_text(5, b"h")
CUT_TEXT_EXTENDED = struct.pack("!Bxxxi", 3, -8) + struct.pack("!I", 0x10000001) + b"abcd"
END_OF_CONTINUOUS = bytes([150])
FENCE = struct.pack("!BxxxIB", 248, 0x80000003, 3) + b"xyz"
FENCE_EMPTY = struct.pack("!BxxxIB", 248, 0x80000000, 0)
XVP = bytes([250, 0, 1, 1])
AUDIO_END = struct.pack("!BBH", 255, 1, 0)
AUDIO_BEGIN = struct.pack("!BBH", 255, 1, 1)
AUDIO_DATA = struct.pack("!BBHI", 255, 1, 2, 6) + b"\x01" * 6
OTHER_MESSAGES = [COLOUR_MAP, BELL, END_OF_CONTINUOUS, FENCE, FENCE_EMPTY, XVP, AUDIO_END, AUDIO_BEGIN, AUDIO_DATA]

# Rectangles at 32 bits per pixel (TPIXEL 3).
RAW = rect(0, 3, 2, bytes(range(24)))
RAW_EMPTY = rect(0, 0, 5)
COPY_RECT = rect(1, 8, 8, struct.pack("!HH", 16, 32))
RRE = rect(2, 10, 10, struct.pack("!I", 2) + b"B" * 4 + (b"C" * 4 + struct.pack("!HHHH", 1, 1, 2, 2)) * 2)
ZLIB = rect(6, 4, 4, struct.pack("!I", 5) + b"zzzzz")
ZRLE = rect(16, 64, 64, struct.pack("!I", 7) + b"rrrrrrr")
ZRLE_EMPTY = rect(16, 64, 64, struct.pack("!I", 0))
TIGHT_FILL = rect(7, 100, 100, bytes([0x80]) + b"RGB")
TIGHT_FILL_RESET = rect(7, 100, 100, bytes([0x8F]) + b"RGB")
TIGHT_JPEG = rect(7, 50, 50, bytes([0x90]) + compact(300) + b"J" * 300)
TIGHT_COPY_SMALL = rect(7, 1, 3, bytes([0x00]) + b"c" * 9)
TIGHT_COPY = rect(7, 10, 10, bytes([0x01]) + compact(20) + b"c" * 20)
TIGHT_COPY_FILTER = rect(7, 10, 10, bytes([0x42, 0]) + compact(130) + b"c" * 130)
TIGHT_COPY_12 = rect(7, 1, 4, bytes([0x00]) + compact(5) + b"c" * 5)
TIGHT_MONO_11 = rect(7, 8, 11, bytes([0x40, 1, 1]) + b"P" * 6 + b"m" * 11)
TIGHT_COPY_EMPTY = rect(7, 0, 10, bytes([0x00]))
TIGHT_MONO_SMALL = rect(7, 10, 4, bytes([0x40, 1, 1]) + b"P" * 6 + b"m" * 8)
TIGHT_MONO = rect(7, 20, 10, bytes([0x43, 1, 1]) + b"P" * 6 + compact(9) + b"m" * 9)
TIGHT_ONE_COLOUR = rect(7, 30, 2, bytes([0x40, 1, 0]) + b"P" * 3 + b"m" * 8)
TIGHT_PALETTE = rect(7, 8, 8, bytes([0x41, 1, 15]) + b"P" * 48 + compact(33) + b"p" * 33)
TIGHT_GRADIENT = rect(7, 4, 4, bytes([0x40, 2]) + compact(40) + b"g" * 40)
TIGHT_GRADIENT_SMALL = rect(7, 1, 2, bytes([0x40, 2]) + b"g" * 6)
TIGHT_LONG = rect(7, 200, 200, bytes([0x90]) + compact(20000) + b"L" * 20000)
CURSOR = rect(-239, 5, 3, b"c" * 60 + b"m" * 3)
CURSOR_WIDE = rect(-239, 9, 2, b"c" * 72 + b"m" * 4)
X_CURSOR = rect(-240, 9, 2, b"F" * 3 + b"B" * 3 + b"b" * 4 + b"m" * 4)
X_CURSOR_EMPTY = rect(-240, 0, 0)
X_CURSOR_FLAT = rect(-240, 8, 0)
DESKTOP_SIZE = rect(-223, 1024, 768)
QEMU_KEY = rect(-258, 0, 0)
QEMU_AUDIO = rect(-259, 0, 0)
LED = rect(-261, 0, 0, bytes([6]))
DESKTOP_NAME = rect(-307, 0, 0, struct.pack("!I", 4) + b"vm-1")
EXTENDED_DESKTOP_SIZE = rect(-308, 1024, 768, bytes([2, 0, 0, 0]) + b"s" * 32)
LAST_RECT = rect(-224, 0, 0)

RECTS = [
    RAW, RAW_EMPTY, COPY_RECT, RRE, ZLIB, ZRLE, ZRLE_EMPTY,
    TIGHT_FILL, TIGHT_FILL_RESET, TIGHT_JPEG, TIGHT_COPY_SMALL, TIGHT_COPY, TIGHT_COPY_FILTER,
    TIGHT_COPY_12, TIGHT_MONO_11, TIGHT_COPY_EMPTY, TIGHT_MONO_SMALL, TIGHT_MONO, TIGHT_ONE_COLOUR, TIGHT_PALETTE,
    TIGHT_GRADIENT, TIGHT_GRADIENT_SMALL, TIGHT_LONG,
    CURSOR, CURSOR_WIDE, X_CURSOR, X_CURSOR_EMPTY, X_CURSOR_FLAT,
    DESKTOP_SIZE, QEMU_KEY, QEMU_AUDIO, LED, DESKTOP_NAME, EXTENDED_DESKTOP_SIZE,
]

#: What noVNC sends (its _sendEncodings, quality 6, compression 2, depth 24).
NOVNC_ENCODINGS = [
    1, 7, -260, 16, 21, 5, 2, 6, 0, -26, -254, -223, -224, -258, -261, -308, -309, -312, -313,
    -307, EXTENDED_CLIPBOARD, -316, 0x574D5664, -239,
]
NOVNC_KEPT = [
    1, 7, 16, 2, 6, 0, -26, -254, -223, -224, -258, -261, -308, -309, -312, -313, -307,
    EXTENDED_CLIPBOARD, -239,
]


def set_encodings(encodings):
    """A SetEncodings message."""
    return struct.pack("!BxH", 2, len(encodings)) + b"".join(struct.pack("!i", e) for e in encodings)


def pieces(stream, how):
    """C{stream} cut whole, byte at a time, or at random places."""
    if how == "whole":
        return [stream]
    if how == "bytes":
        return [stream[i : i + 1] for i in range(len(stream))]
    rng = random.Random(len(stream))
    cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, 20)))
    return [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]


def run(policy, messages, how, pixel_format=PF_32):
    """Feed C{messages} cut C{how}; answer (bytes out, drops)."""
    drops = []
    f = RFBServerFilter(policy, pixel_format, drops.append)
    return b"".join(f.feed(p) for p in pieces(b"".join(messages), how)), drops


class FramingTests(SynchronousTestCase):
    """
    Every server message and every kept encoding is framed, whatever the
    fragmentation.
    """

    def check(self, messages, expected, expected_drops=(), policy=OutputPolicy(), pixel_format=PF_32):
        """
        Feed C{messages} three ways, then a ServerCutText and a bell that
        end up where they belong only if every message before was framed
        to its exact end.
        """
        policy = OutputPolicy(clipboard_from_vm=False, clipboard_max=policy.clipboard_max)
        for how in ("whole", "bytes", "random"):
            out, drops = run(policy, messages + [CUT_TEXT, BELL], how, pixel_format)
            self.assertEqual(out, b"".join(expected) + BELL, how)
            self.assertEqual(drops, list(expected_drops) + ["clipboard"], how)

    def test_otherMessagesPass(self):
        """
        When the VM sends colour map, bell, end of continuous updates, fence, XVP and QEMU audio messages, all reach the browser unchanged.
        """
        self.check(OTHER_MESSAGES, OTHER_MESSAGES)

    def test_eachEncodingAlone(self):
        """
        When each kept encoding comes alone in an update followed by a bell, the stream passes unchanged, so each was framed to its end.
        """
        for r in RECTS:
            messages = [update(r), BELL]
            self.check(messages, messages)

    def test_mixedUpdate(self):
        """
        When one update holds every kept encoding between other messages, the whole stream passes unchanged.
        """
        messages = [BELL, update(*RECTS), FENCE, update(RAW, TIGHT_JPEG, ZRLE), XVP]
        self.check(messages, messages)

    def test_lastRectEndsUpdate(self):
        """
        When an update claiming 65535 rectangles ends with LastRect, the next message is framed as a message.
        """
        messages = [update(RAW, TIGHT_FILL, LAST_RECT, count=0xFFFF), BELL]
        self.check(messages, messages)

    def test_messageBoundary(self):
        """
        When the fed bytes end inside a message, the filter says it is not at a message boundary; after the message, it is.
        """
        f = RFBServerFilter(OutputPolicy(), PF_32)
        self.assertTrue(f.at_message_boundary)
        for stream in (update(RAW), CUT_TEXT, FENCE, update(TIGHT_JPEG)):
            for i in range(1, len(stream)):
                f.feed(stream[i - 1 : i])
                self.assertFalse(f.at_message_boundary, (stream, i))
            f.feed(stream[-1:])
            self.assertTrue(f.at_message_boundary)

    def test_emptyUpdate(self):
        """
        When an update has no rectangles, the next message is framed as a message.
        """
        self.check([update(), BELL], [update(), BELL])

    def test_pixelFormat16(self):
        """
        When the browser chose 16 bits per pixel, Raw, RRE, Cursor and Tight (TPIXEL of two bytes) are framed with it.
        """
        messages = [
            update(
                rect(0, 3, 2, b"r" * 12),
                rect(2, 4, 4, struct.pack("!I", 1) + b"B" * 2 + b"C" * 2 + b"\0" * 8),
                rect(-239, 5, 3, b"c" * 30 + b"m" * 3),
                rect(7, 9, 9, bytes([0x80]) + b"RG"),
                rect(7, 1, 5, bytes([0x00]) + b"c" * 10),
                rect(7, 8, 8, bytes([0x40, 1, 2]) + b"P" * 6 + compact(12) + b"p" * 12),
            ),
            BELL,
        ]
        self.check(messages, messages, pixel_format=PF_16)

    def test_tightPixelDepth32(self):
        """
        When the pixel format is 32 bits at depth 32, a Tight fill carries a whole 4-byte pixel.
        """
        messages = [update(rect(7, 9, 9, bytes([0x80]) + b"RGBX")), BELL]
        self.check(messages, messages, pixel_format=PF_32_DEPTH_32)

    def test_colourMapFormat(self):
        """
        When the pixel format is an 8-bit colour map, Raw is one byte per pixel.
        """
        messages = [COLOUR_MAP, update(rect(0, 4, 4, b"i" * 16)), BELL]
        self.check(messages, messages, pixel_format=PF_8_MAP)

    def test_setPixelFormat(self):
        """
        When the browser switches to 16 bits per pixel, later Raw rectangles are framed with two bytes a pixel.
        """
        f = RFBServerFilter(OutputPolicy(clipboard_from_vm=False), PF_32)
        self.assertEqual(f.feed(update(RAW)), update(RAW))
        f.set_pixel_format(PF_16)
        small = update(rect(0, 3, 2, b"r" * 12))
        self.assertEqual(f.feed(small + CUT_TEXT + BELL), small + BELL)

    def test_pixelSizes(self):
        """
        When pixel formats are read, the pixel and TPIXEL sizes follow the Tight rule, and 24 bits per pixel is refused.
        """
        self.assertEqual(pixel_sizes(PF_32), (4, 3))
        self.assertEqual(pixel_sizes(PF_32_DEPTH_32), (4, 4))
        self.assertEqual(pixel_sizes(PF_16), (2, 2))
        self.assertEqual(pixel_sizes(PF_8_MAP), (1, 1))
        self.assertRaises(PolicyViolation, pixel_sizes, struct.pack("!BBBBHHHBBBxxx", 24, 24, 0, 1, 255, 255, 255, 0, 8, 16))

    def test_rectDataStreamed(self):
        """
        When a large Raw rectangle arrives in pieces, its data is passed as it comes and only headers are ever held.
        """
        f = RFBServerFilter(OutputPolicy(clipboard_from_vm=False), PF_32)
        header = update(rect(0, 1000, 1000))
        self.assertEqual(f.feed(header[:10]), header[:4])
        self.assertEqual(f.feed(header[10:] + b"a" * 1000), header[4:] + b"a" * 1000)
        chunk = b"b" * 65536
        for _ in range(10):
            self.assertEqual(f.feed(chunk), chunk)
            self.assertEqual(f._buf, b"")

    def test_zrleStreamed(self):
        """
        When a ZRLE rectangle's data arrives in pieces, each piece is passed at once.
        """
        f = RFBServerFilter(OutputPolicy(clipboard_from_vm=False), PF_32)
        head = update(rect(16, 64, 64, struct.pack("!I", 100000)))
        self.assertEqual(f.feed(head + b"z" * 7), head + b"z" * 7)
        self.assertEqual(f.feed(b"z" * (100000 - 7)), b"z" * (100000 - 7))
        self.assertEqual(f.feed(CUT_TEXT + BELL), BELL)


class ClipboardTests(SynchronousTestCase):
    """
    ServerCutText, plain and extended, dropped or passed by policy.
    """

    def check(self, policy, messages, expected, expected_drops):
        for how in ("whole", "bytes", "random"):
            out, drops = run(policy, messages, how)
            self.assertEqual(out, b"".join(expected), how)
            self.assertEqual(drops, expected_drops, how)

    def test_fromVmOffDrops(self):
        """
        When clipboard from_vm is off, plain and extended ServerCutText never reach the browser and the screen still does.
        """
        messages = [update(RAW), CUT_TEXT, BELL, CUT_TEXT_EXTENDED, update(ZRLE), cut_text(0)]
        expected = [update(RAW), BELL, update(ZRLE)]
        self.check(OutputPolicy(clipboard_from_vm=False), messages, expected, ["clipboard"] * 3)

    def test_fromVmOnPasses(self):
        """
        When clipboard from_vm is on, plain and extended transfers within max_size reach the browser unchanged.
        """
        messages = [CUT_TEXT, update(RAW), CUT_TEXT_EXTENDED, BELL]
        self.check(OutputPolicy(), messages, messages, [])

    def test_maxSize(self):
        """
        When a transfer, plain or extended, is longer than max_size it is dropped; one of exactly max_size passes.
        """
        policy = OutputPolicy(clipboard_max=10)
        messages = [cut_text(10), cut_text(11), cut_text(-11), cut_text(-10), BELL]
        self.check(policy, messages, [cut_text(10), cut_text(-10), BELL], ["clipboard"] * 2)

    def test_textStreamed(self):
        """
        When a long allowed transfer arrives in pieces, its text is passed as it comes, nothing held back.
        """
        f = RFBServerFilter(OutputPolicy(clipboard_max=10**6), PF_32)
        header = struct.pack("!Bxxxi", 3, 300000)
        self.assertEqual(f.feed(header + b"a" * 1000), header + b"a" * 1000)
        self.assertEqual(f.feed(b"b" * 5000), b"b" * 5000)
        self.assertEqual(f._buf, b"")

    def test_droppedTextSkipped(self):
        """
        When a long transfer is dropped, its pieces are skipped as they come and the next message passes.
        """
        drops = []
        f = RFBServerFilter(OutputPolicy(clipboard_max=100), PF_32, drops.append)
        self.assertEqual(f.feed(cut_text(-300000)[:5000]), b"")
        self.assertEqual(f._buf, b"")
        self.assertEqual(f.feed(b"x" * (300008 - 5000) + BELL), BELL)
        self.assertEqual(drops, ["clipboard"])

    def test_filtersProperty(self):
        """
        When neither rule can drop anything, the policy says no filter is needed.
        """
        self.assertFalse(OutputPolicy(clipboard_max=2**31).filters)
        self.assertTrue(OutputPolicy(clipboard_from_vm=False, clipboard_max=2**31).filters)
        self.assertTrue(OutputPolicy().filters)


class FailClosedTests(SynchronousTestCase):
    """
    What cannot be framed raises L{PolicyViolation}, now and on every later feed.
    """

    def assertViolation(self, stream, pixel_format=PF_32):
        for how in ("whole", "bytes"):
            f = RFBServerFilter(OutputPolicy(), pixel_format)
            with self.assertRaises(PolicyViolation, msg=how):
                for p in pieces(stream, how):
                    f.feed(p)
            self.assertRaises(PolicyViolation, f.feed, BELL)

    def test_unknownMessageType(self):
        """
        When the VM sends a message type the filter does not know, it raises.
        """
        self.assertViolation(BELL + bytes([7, 0, 0, 0]))

    def test_unknownEncoding(self):
        """
        When an update has a rectangle in an encoding that was removed (Hextile, TightPNG, VMware cursor), it raises.
        """
        for encoding in (5, -260, 0x574D5664, 21, -316):
            self.assertViolation(update(RAW, rect(encoding, 16, 16, b"\0" * 64)))

    def test_tightPng(self):
        """
        When a Tight rectangle says PNG or another unknown compression, it raises.
        """
        for control in (0xA0, 0xB0, 0xF0):
            self.assertViolation(update(rect(7, 4, 4, bytes([control]) + b"\0" * 8)))

    def test_tightUnknownFilter(self):
        """
        When a basic Tight rectangle names a filter other than copy, palette or gradient, it raises.
        """
        self.assertViolation(update(rect(7, 4, 4, bytes([0x40, 3]) + b"\0" * 8)))

    def test_unknownQemuMessage(self):
        """
        When a QEMU server message is not audio, or its audio operation is unknown, it raises.
        """
        self.assertViolation(bytes([255, 0, 0, 0]))
        self.assertViolation(bytes([255, 1, 0, 3]))


class RestrictEncodingsTests(SynchronousTestCase):
    """
    The browser's SetEncodings keeps only what the filter frames.
    """

    def test_novncList(self):
        """
        When noVNC's list is restricted, TightPNG, JPEG, Hextile, VMware cursor and ExtendedMouseButtons go, the rest stays in order with the count fixed.
        """
        out = restrict_encodings(set_encodings(NOVNC_ENCODINGS))
        self.assertEqual(out, set_encodings(NOVNC_KEPT))
        self.assertEqual(struct.unpack_from("!H", out, 2)[0], len(NOVNC_KEPT))

    def test_allKept(self):
        """
        When every offered encoding can be framed, the message comes back unchanged.
        """
        message = set_encodings(sorted(KEPT_ENCODINGS))
        self.assertIs(restrict_encodings(message), message)

    def test_levels(self):
        """
        When every quality and compression level is offered, all stay; the pseudo-encodings just outside the ranges go.
        """
        levels = list(range(-32, -22)) + list(range(-256, -246))
        out = restrict_encodings(set_encodings([-33, -22, -257, -246] + levels))
        self.assertEqual(out, set_encodings(levels))

    def test_noneKept(self):
        """
        When nothing offered can be framed, the message lists no encodings.
        """
        self.assertEqual(restrict_encodings(set_encodings([5, 50, -260])), set_encodings([]))

    def test_framerAgrees(self):
        """
        When a kept encoding can arrive as a rectangle, the filter frames it: each rectangle constant uses a kept encoding.
        """
        for r in RECTS + [LAST_RECT]:
            self.assertIn(struct.unpack_from("!i", r, 8)[0], KEPT_ENCODINGS)

    def test_malformed(self):
        """
        When the message is not one whole SetEncodings, it raises.
        """
        good = set_encodings([0, 16])
        for bad in (b"", good[:-1], good + b"\0", b"\x03" + good[1:], struct.pack("!BxH", 2, 2000)):
            self.assertRaises(PolicyViolation, restrict_encodings, bad)
