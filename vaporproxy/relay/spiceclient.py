"""
The browser's SPICE main-channel messages after the link, framed and
filtered by policy (SPEC.md "Access modes", "Clipboard policy"); sans-IO.

A view-only console's browser sends no agent data to the VM (the inputs
channel of such a console is refused before it links: see the console
path); with clipboard C{to_vm} off, the agent's clipboard messages
(CLIPBOARD, GRAB, REQUEST, RELEASE) are dropped, and so is any clipboard
transfer longer than C{max_size}.  Everything else passes unchanged.

An agent message (VDAgentMessage: protocol, type, opaque, size, data) may
be split over several AGENT_DATA messages; the filter reads its header from
the first and drops or passes the following ones with it.  A dropped
AGENT_DATA message still cost the browser one agent token that the VM will
not give back: for a view-only console that only silences the agent; the
clipboard rule costs a client that sends clipboard messages its agent
channel after its tokens run out (spice-html5 sends none).
"""

from __future__ import annotations

import struct
from typing import Callable, Optional

from vaporproxy.relay.policy import InputPolicy, PolicyViolation

__all__ = ["SpiceMainFilter"]

MSGC_MAIN_AGENT_DATA = 107

#: VDAgentMessage types that carry the clipboard.
CLIPBOARD_TYPES = frozenset({4, 7, 8, 9})

MINI_HEADER = struct.Struct("<HI")
FULL_HEADER = struct.Struct("<QHII")
AGENT_HEADER = struct.Struct("<IIQI")

#: The largest main-channel message from a browser (agent data is sent in
#: chunks of 2 KiB; client info and the rest are small).
MAX_MESSAGE = 64 * 1024


class SpiceMainFilter:
    """
    Frames a SPICE main channel's client messages and keeps what the
    policy allows.

    @param mini_header: whether the link negotiated SPICE's mini header.
    @param on_drop: called with C{"input"} (agent data of a view-only
        console) or C{"clipboard"} for each dropped agent message.
    """

    def __init__(
        self, policy: InputPolicy, mini_header: bool, on_drop: Optional[Callable[[str], None]] = None
    ):
        self.policy = policy
        self._header = MINI_HEADER if mini_header else FULL_HEADER
        self._on_drop = on_drop
        self._buf = b""
        #: Bytes of the current agent message still to come, and whether
        #: they are dropped.
        self._agent_left = 0
        self._agent_drop = False

    def feed(self, data: bytes) -> bytes:
        """
        Bytes from the browser, in any fragmentation; answer the bytes for
        the VM.

        @raise PolicyViolation: on a message larger than L{MAX_MESSAGE}
            or agent data that does not frame.
        """
        buf = self._buf + data if self._buf else data
        out = []
        pos, end = 0, len(buf)
        header = self._header
        while end - pos >= header.size:
            fields = header.unpack_from(buf, pos)
            msg_type, size = (fields[0], fields[1]) if header is MINI_HEADER else (fields[1], fields[2])
            if size > MAX_MESSAGE:
                raise PolicyViolation(f"SPICE main message of {size} bytes (at most {MAX_MESSAGE})")
            whole = header.size + size
            if end - pos < whole:
                break
            message = buf[pos : pos + whole]
            if msg_type != MSGC_MAIN_AGENT_DATA or self._keep_agent(message[header.size :]):
                out.append(message)
            pos += whole
        self._buf = buf[pos:]
        return b"".join(out)

    def _keep_agent(self, payload: bytes) -> bool:
        """Whether this AGENT_DATA message goes to the VM."""
        if self._agent_left == 0:
            if len(payload) < AGENT_HEADER.size:
                raise PolicyViolation("SPICE agent data shorter than its header")
            _, agent_type, _, size = AGENT_HEADER.unpack_from(payload)
            self._agent_left = AGENT_HEADER.size + size
            self._agent_drop = self._drops(agent_type, size)
            if self._agent_drop and self._on_drop is not None:
                self._on_drop("input" if self.policy.view_only else "clipboard")
        if len(payload) > self._agent_left:
            raise PolicyViolation("SPICE agent data runs past its agent message")
        self._agent_left -= len(payload)
        return not self._agent_drop

    def _drops(self, agent_type: int, size: int) -> bool:
        policy = self.policy
        if policy.view_only:
            return True
        if agent_type not in CLIPBOARD_TYPES:
            return False
        return not policy.clipboard_to_vm or size > policy.clipboard_max
