"""
Tests for L{vaporproxy.relay.spiceclient}: a SPICE main channel's client
messages framed and filtered by policy.
"""

import struct

from twisted.trial.unittest import SynchronousTestCase

from vaporproxy.relay.policy import InputPolicy, PolicyViolation
from vaporproxy.relay.spiceclient import AGENT_HEADER, SpiceMainFilter

CLIENT_INFO = 101
AGENT_START = 106
AGENT_DATA = 107
VD_AGENT_MONITORS_CONFIG = 2
VD_AGENT_CLIPBOARD = 4
VD_AGENT_CLIPBOARD_GRAB = 7


def mini(msg_type, payload):
    return struct.pack("<HI", msg_type, len(payload)) + payload


def full(serial, msg_type, payload):
    return struct.pack("<QHII", serial, msg_type, len(payload), 0) + payload


def agent_chunks(agent_type, data, chunk=2048, frame=mini):
    """One agent message, split over AGENT_DATA messages of at most C{chunk} bytes."""
    whole = AGENT_HEADER.pack(1, agent_type, 0, len(data)) + data
    return [frame(AGENT_DATA, whole[i : i + chunk]) for i in range(0, len(whole), chunk)]


def run(f, messages, whole=True):
    stream = b"".join(messages)
    if whole:
        return f.feed(stream)
    return b"".join(f.feed(stream[i : i + 1]) for i in range(len(stream)))


class SpiceMainFilterTests(SynchronousTestCase):
    def check(self, policy, messages, expected, drops, mini_header=True):
        for whole in (True, False):
            seen = []
            f = SpiceMainFilter(policy, mini_header, seen.append)
            self.assertEqual(run(f, messages, whole), b"".join(expected), f"whole={whole}")
            self.assertEqual(seen, drops, f"whole={whole}")

    def test_viewOnlyDropsAgentData(self):
        """
        When a view-only console's browser sends agent data (split over messages), none of it reaches the VM; other messages pass.
        """
        info = mini(CLIENT_INFO, b"\x00" * 8)
        start = mini(AGENT_START, struct.pack("<I", 10))
        monitors = agent_chunks(VD_AGENT_MONITORS_CONFIG, b"m" * 5000)
        self.assertEqual(len(monitors), 3)
        self.check(InputPolicy(view_only=True), [info, start] + monitors + [info], [info, start, info], ["input"])

    def test_controlPassesAgentData(self):
        """
        When a control console has no clipboard rule, every agent message passes unchanged.
        """
        messages = agent_chunks(VD_AGENT_CLIPBOARD, b"c" * 3000) + agent_chunks(VD_AGENT_MONITORS_CONFIG, b"m" * 10)
        self.check(InputPolicy(clipboard_max=10**6), messages, messages, [])

    def test_clipboardToVmOff(self):
        """
        When clipboard to_vm is off, clipboard agent messages are dropped and the rest of the agent passes.
        """
        grab = agent_chunks(VD_AGENT_CLIPBOARD_GRAB, b"g" * 8)
        clip = agent_chunks(VD_AGENT_CLIPBOARD, b"c" * 3000)
        monitors = agent_chunks(VD_AGENT_MONITORS_CONFIG, b"m" * 10)
        self.check(InputPolicy(clipboard_to_vm=False), grab + clip + monitors, monitors, ["clipboard"] * 2)

    def test_clipboardMaxSize(self):
        """
        When a clipboard transfer is over max_size it is dropped; a small one passes.
        """
        big = agent_chunks(VD_AGENT_CLIPBOARD, b"c" * 3000)
        small = agent_chunks(VD_AGENT_CLIPBOARD, b"c" * 10)
        self.check(InputPolicy(clipboard_max=100), big + small, small, ["clipboard"])

    def test_fullHeader(self):
        """
        When the link did not negotiate the mini header, the full header frames messages the same way.
        """
        info = full(1, CLIENT_INFO, b"\x00" * 8)
        data = agent_chunks(VD_AGENT_MONITORS_CONFIG, b"m" * 10, frame=lambda t, p: full(2, t, p))
        self.check(InputPolicy(view_only=True), [info] + data, [info], ["input"], mini_header=False)

    def test_oversizedMessageRefused(self):
        """
        When a message claims more than the bound, the filter fails closed instead of buffering it.
        """
        f = SpiceMainFilter(InputPolicy(view_only=True), True)
        self.assertRaises(PolicyViolation, f.feed, struct.pack("<HI", CLIENT_INFO, 10**7))

    def test_agentDataPastItsMessage(self):
        """
        When an AGENT_DATA message holds more than its agent message's size, the filter fails closed.
        """
        f = SpiceMainFilter(InputPolicy(view_only=True), True)
        payload = AGENT_HEADER.pack(1, VD_AGENT_MONITORS_CONFIG, 0, 4) + b"12345678"
        self.assertRaises(PolicyViolation, f.feed, mini(AGENT_DATA, payload))
