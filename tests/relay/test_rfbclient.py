"""
Tests for L{vaporproxy.relay.rfbclient}: the browser's RFB messages framed
and filtered by policy, fed whole and byte at a time.
"""

import struct

from twisted.trial.unittest import SynchronousTestCase

from vaporproxy.relay.policy import InputPolicy, PolicyViolation
from vaporproxy.relay.rfbclient import RFBClientFilter

SET_PIXEL_FORMAT = bytes([0, 0, 0, 0]) + bytes(range(16))
SET_ENCODINGS = struct.pack("!BBHiii", 2, 0, 3, 7, -223, 0)
SET_ENCODINGS_EXT_MOUSE = struct.pack("!BBHiiii", 2, 0, 4, 7, -316, -223, 0)
FB_UPDATE_REQUEST = struct.pack("!BBHHHH", 3, 1, 0, 0, 800, 600)
KEY_EVENT = struct.pack("!BBHI", 4, 1, 0, 0x61)
POINTER_EVENT = struct.pack("!BBHH", 5, 1, 10, 20)
CUT_TEXT = struct.pack("!BxxxI", 6, 5) + b"hello"
CUT_TEXT_EXTENDED = struct.pack("!Bxxxi", 6, -8) + struct.pack("!I", 0x10000001) + b"abcd"
CONTINUOUS_UPDATES = struct.pack("!BBHHHH", 150, 1, 0, 0, 800, 600)
FENCE = struct.pack("!BxxxIB", 248, 0x80000001, 3) + b"xyz"
XVP = bytes([250, 0, 1, 2])
SET_DESKTOP_SIZE = struct.pack("!BxHHBx", 251, 1024, 768, 1) + struct.pack("!IHHHHI", 1, 0, 0, 1024, 768, 0)
QEMU_KEY = struct.pack("!BBHII", 255, 0, 1, 0x61, 0x1E)
QEMU_AUDIO_ENABLE = struct.pack("!BBH", 255, 1, 0)
QEMU_AUDIO_FORMAT = struct.pack("!BBHBBI", 255, 1, 2, 3, 2, 44100)

SCREEN = [SET_PIXEL_FORMAT, SET_ENCODINGS, FB_UPDATE_REQUEST, CONTINUOUS_UPDATES, FENCE]
INPUT = [KEY_EVENT, POINTER_EVENT, XVP, SET_DESKTOP_SIZE, QEMU_KEY, QEMU_AUDIO_ENABLE, QEMU_AUDIO_FORMAT]
CLIPBOARD = [CUT_TEXT, CUT_TEXT_EXTENDED]


def run(policy, messages, whole):
    """Feed C{messages} whole or byte at a time; answer (bytes out, drops)."""
    drops = []
    f = RFBClientFilter(policy, drops.append)
    stream = b"".join(messages)
    if whole:
        return f.feed(stream), drops
    return b"".join(f.feed(stream[i : i + 1]) for i in range(len(stream))), drops


class RFBClientFilterTests(SynchronousTestCase):
    def check(self, policy, messages, expected, expected_drops):
        for whole in (True, False):
            out, drops = run(policy, messages, whole)
            self.assertEqual(out, b"".join(expected), f"whole={whole}")
            self.assertEqual(drops, expected_drops, f"whole={whole}")

    def test_viewOnlyPassesScreenMessages(self):
        """
        When a view-only console's browser sends the messages that draw the screen, all reach the VM unchanged.
        """
        self.check(InputPolicy(view_only=True), SCREEN, SCREEN, [])

    def test_viewOnlyDropsInput(self):
        """
        When a view-only console's browser sends input, desktop-size, XVP and QEMU messages, none reaches the VM.
        """
        messages = [FB_UPDATE_REQUEST] + INPUT + [FB_UPDATE_REQUEST]
        self.check(InputPolicy(view_only=True), messages, [FB_UPDATE_REQUEST] * 2, ["input"] * len(INPUT))

    def test_viewOnlyDropsClipboard(self):
        """
        When a view-only console's browser sends plain and extended ClientCutText, neither reaches the VM.
        """
        self.check(
            InputPolicy(view_only=True), CLIPBOARD + [KEY_EVENT, FENCE], [FENCE], ["clipboard", "clipboard", "input"]
        )

    def test_controlPassesEverything(self):
        """
        When a control console filters only oversized clipboard, every other message reaches the VM.
        """
        messages = SCREEN + INPUT + CLIPBOARD
        self.check(InputPolicy(), messages, messages, [])

    def test_clipboardToVmOff(self):
        """
        When clipboard to_vm is off, ClientCutText of both kinds is dropped and input still passes.
        """
        messages = [KEY_EVENT] + CLIPBOARD + [POINTER_EVENT]
        self.check(InputPolicy(clipboard_to_vm=False), messages, [KEY_EVENT, POINTER_EVENT], ["clipboard"] * 2)

    def test_clipboardMaxSize(self):
        """
        When a transfer is longer than max_size, it is dropped whole; a shorter one passes.
        """
        big = struct.pack("!BxxxI", 6, 100) + b"x" * 100
        policy = InputPolicy(clipboard_max=5)
        self.check(policy, [big, CUT_TEXT, KEY_EVENT], [CUT_TEXT, KEY_EVENT], ["clipboard"])

    def test_largeTextNotBuffered(self):
        """
        When a large allowed transfer arrives in pieces, its text is passed as it comes, nothing held back.
        """
        f = RFBClientFilter(InputPolicy(clipboard_max=10**6))
        header = struct.pack("!BxxxI", 6, 300000)
        self.assertEqual(f.feed(header + b"a" * 1000), header + b"a" * 1000)
        self.assertEqual(f.feed(b"b" * 5000), b"b" * 5000)
        self.assertEqual(len(f._buf), 0)

    def test_extendedMouseRemoved(self):
        """
        When SetEncodings offers ExtendedMouseButtons, it is removed so that every PointerEvent is 6 bytes for both sides.
        """
        self.check(InputPolicy(view_only=True), [SET_ENCODINGS_EXT_MOUSE], [SET_ENCODINGS], [])

    def test_unknownTypeFailsClosed(self):
        """
        When the browser sends a message type the filter does not know, it raises instead of guessing a size.
        """
        f = RFBClientFilter(InputPolicy(view_only=True))
        self.assertEqual(f.feed(FB_UPDATE_REQUEST), FB_UPDATE_REQUEST)
        self.assertRaises(PolicyViolation, f.feed, bytes([253, 0, 0, 0]))
        self.assertRaises(PolicyViolation, RFBClientFilter(InputPolicy()).feed, bytes([255, 9]))

    def test_tooManyEncodings(self):
        """
        When SetEncodings claims more encodings than the bound, the filter refuses it before buffering them.
        """
        f = RFBClientFilter(InputPolicy(view_only=True))
        self.assertRaises(PolicyViolation, f.feed, struct.pack("!BBH", 2, 0, 60000))

    def test_pacedUpdateRequests(self):
        """
        When a pacer is given, update requests closer than its interval are held and the latest is sent later; other messages pass at once.
        """
        from twisted.internet.task import Clock

        from vaporproxy.relay.pacing import UpdatePacer

        clock, later = Clock(), []
        f = RFBClientFilter(InputPolicy(view_only=True), pacer=UpdatePacer(1.0, clock, later.append))
        second = struct.pack("!BBHHHH", 3, 0, 0, 0, 10, 10)
        out = f.feed(FB_UPDATE_REQUEST + FENCE + FB_UPDATE_REQUEST + second)
        self.assertEqual(out, FB_UPDATE_REQUEST + FENCE)
        clock.advance(1.0)
        self.assertEqual(later, [second])
