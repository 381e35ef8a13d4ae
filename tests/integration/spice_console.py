"""
A SPICE console through a proxy, opened the way spice-html5 opens one (for
the recording integration tests): the main channel, ATTACH_CHANNELS, then
display (with DISPLAY_INIT), inputs and cursor, each linked in turn with the
console's token and the main channel's session id.  While the test runs,
L{SpiceConsole.serve} answers what the server waits for (SET_ACK's sync,
an ACK every window of messages, PONG), so the display keeps streaming.
"""

from __future__ import annotations

import struct
import time
from typing import Any, List, Tuple

from tests.integration.proxy_cluster import (
    ADMIN_KEY,
    HTTP,
    VM_PATH,
    ProxyProcess,
    spice_channel,
    spice_main_session,
    spice_reply_size,
    ws_connect,
)

__all__ = ["SpiceChannel", "SpiceConsole", "MAIN", "DISPLAY", "INPUTS", "CURSOR"]

MAIN, DISPLAY, INPUTS, CURSOR = 1, 2, 3, 4
MINI = struct.Struct("<HI")
MSG_SET_ACK, MSG_PING = 3, 4
MSGC_ACK_SYNC, MSGC_ACK, MSGC_PONG = 1, 2, 3
MSGC_MAIN_ATTACH_CHANNELS, MSGC_DISPLAY_INIT = 104, 101
#: spice-html5's SpiceMsgcDisplayInit: pixmap cache 1 of 10 MiB, no glz dictionary.
DISPLAY_INIT = struct.pack("<BQBI", 1, 10 * 1024 * 1024, 0, 0)


def mini(msg_type: int, body: bytes = b"") -> bytes:
    """A message with the mini header."""
    return MINI.pack(msg_type, len(body)) + body


class SpiceChannel:
    """
    One linked channel: reads its messages as they come and answers acks
    and pings.

    @ivar samples: C{(monotonic time, bytes received)} at each L{serve}.
    """

    def __init__(self, client: Any, channel_type: int):
        self.client = client
        self.type = channel_type
        self.at = 0          # where the next message starts in client.received
        self.window = 0      # the server's ack window (0: none asked)
        self.until_ack = 0
        self.messages = 0
        self.samples: List[Tuple[float, int]] = []

    async def link(self, connection_id: int) -> None:
        result = await spice_channel(self.client, self.type, connection_id)
        assert result == 0, f"channel {self.type}: link result {result}"
        self.at = spice_reply_size(self.client.received) + 4
        if self.type == DISPLAY:
            self.client.send(mini(MSGC_DISPLAY_INIT, DISPLAY_INIT))

    def serve(self) -> None:
        """Handle every whole message received since the last call."""
        data = self.client.received
        while len(data) - self.at >= MINI.size:
            msg_type, size = MINI.unpack_from(data, self.at)
            if len(data) - self.at - MINI.size < size:
                break
            body = data[self.at + MINI.size : self.at + MINI.size + size]
            self.at += MINI.size + size
            self.messages += 1
            if msg_type == MSG_SET_ACK:
                generation, self.window = struct.unpack_from("<II", body)
                self.until_ack = self.window
                self.client.send(mini(MSGC_ACK_SYNC, struct.pack("<I", generation)))
            elif msg_type == MSG_PING:
                self.client.send(mini(MSGC_PONG, body[:12]))
            if self.window:
                self.until_ack -= 1
                if self.until_ack <= 0:
                    self.until_ack = self.window
                    self.client.send(mini(MSGC_ACK))
        self.samples.append((time.monotonic(), len(data)))

    def received_by(self, moment: float) -> int:
        """Bytes the channel had received at C{moment} (by the samples)."""
        return max((n for t, n in self.samples if t <= moment), default=0)


class SpiceConsole:
    """The channels of one SPICE console, in the order they were linked."""

    def __init__(self, channels: List[SpiceChannel]):
        self.channels = channels

    @classmethod
    async def open(cls, http: HTTP, proxy: ProxyProcess, vm: str) -> "SpiceConsole":
        code, info = await http.request("GET", f"{proxy.base}{VM_PATH}/{vm}/console", ADMIN_KEY)
        assert code == 200 and info["type"] == "spice", (code, info)

        async def channel(channel_type: int, connection_id: int) -> SpiceChannel:
            client, _ = await ws_connect(proxy, vm, info["token"], ["binary"])
            assert client is not None, f"channel {channel_type}: the WebSocket did not open"
            linked = SpiceChannel(client, channel_type)
            await linked.link(connection_id)
            return linked

        main = await channel(MAIN, 0)
        session_id = await spice_main_session(main.client)
        main.client.send(mini(MSGC_MAIN_ATTACH_CHANNELS))
        channels = [main]
        for channel_type in (DISPLAY, INPUTS, CURSOR):
            channels.append(await channel(channel_type, session_id))
        return cls(channels)

    def serve(self) -> None:
        for channel in self.channels:
            channel.serve()
