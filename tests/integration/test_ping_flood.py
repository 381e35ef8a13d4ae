"""
A console client that floods pings and never reads, against a real
C{twistd vaporproxy} process on loopback (issue #11, item 3): the process's
memory stays flat because the proxy stops reading from a browser whose
outgoing buffer (its pongs) is full.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from typing import List

from tests.integration.test_hostile import ProcessCase, console_info, open_console
from tests.support import recv_exactly, rss_kb, wait

#: How long the flood lasts, and the most the process may grow meanwhile.
FLOOD_SECONDS = 30.0
MAX_GROWTH_KB = 64 * 1024


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """One client frame (FIN set, masked, payload under 126 bytes)."""
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return struct.pack("!BB", 0x80 | opcode, 0x80 | len(payload)) + mask + body


class QuietVNCServer:
    """
    A VM's VNC server in a thread: the RFB 3.8 handshake (security None),
    then it reads and discards, so the console stays open and relaying.
    """

    def __init__(self, port: int):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(4)
        self.sessions: List[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        self.sessions.append(conn)
        try:
            conn.sendall(b"RFB 003.008\n")
            recv_exactly(conn, 12)
            conn.sendall(b"\x01\x01")  # one security type: None
            recv_exactly(conn, 1)
            conn.sendall(b"\x00\x00\x00\x00")  # SecurityResult OK
            recv_exactly(conn, 1)  # ClientInit
            pixel_format = struct.pack("!BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
            conn.sendall(struct.pack("!HH", 640, 480) + pixel_format + struct.pack("!I", 2) + b"vm")
            while conn.recv(65536):
                pass
        except OSError:
            pass

    def close(self) -> None:
        for s in [self.sock] + self.sessions:
            s.close()


def read_payload(sock: socket.socket, pending: bytes, n: int) -> bytes:
    """
    Read server binary frames until C{n} payload bytes came; answer the
    payload (server frames are unmasked).
    """
    data, payload = pending, b""
    while len(payload) < n:
        while True:
            if len(data) >= 2:
                length, offset = data[1] & 0x7F, 2
                if length == 126 and len(data) >= 4:
                    length, offset = int.from_bytes(data[2:4], "big"), 4
                if length < 126 and len(data) >= offset + length:
                    break
            chunk = sock.recv(65536)
            if not chunk:
                raise AssertionError(f"closed after {payload!r}")
            data += chunk
        if data[0] & 0x0F == 2:
            payload += data[offset:offset + length]
        data = data[offset + length:]
    return payload


class PingFloodProcessTests(ProcessCase):
    timeout = 300

    def test_ping_flood_never_read(self) -> None:
        """When a relaying console's client sends pings for 30 s and reads none of the pongs, the process's memory grows by less than 64 MB and a fresh client is still answered."""
        vnc = QuietVNCServer(self.vnc_port)
        self.addCleanup(vnc.close)
        process = self.start()
        console = open_console(self.port, console_info(self.port, "hostile-test-key")["token"])
        self.addCleanup(console.close)
        s = console.sock
        self.assertEqual(read_payload(s, console.pending, 12), b"RFB 003.008\n")
        s.sendall(masked_frame(2, b"RFB 003.008\n"))
        self.assertEqual(read_payload(s, b"", 2), b"\x01\x01")
        s.sendall(masked_frame(2, b"\x01"))
        self.assertEqual(read_payload(s, b"", 4), b"\x00\x00\x00\x00")
        s.sendall(masked_frame(2, b"\x01"))
        self.assertEqual(read_payload(s, b"", 24)[:4], struct.pack("!HH", 640, 480))
        self.assertTrue(wait(lambda: bool(vnc.sessions)))

        before = peak = rss_kb(process.pid)
        ping = masked_frame(9, b"p" * 125) * 64
        s.settimeout(0.05)
        sent = stalled = 0
        deadline = time.monotonic() + FLOOD_SECONDS
        while time.monotonic() < deadline:
            try:
                s.sendall(ping)
                sent += 64
            except socket.timeout:
                stalled += 1  # the proxy stopped reading from us: the kernel buffers are full
                peak = max(peak, rss_kb(process.pid))
        peak = max(peak, rss_kb(process.pid))
        grown = peak - before
        print(f"\nping flood: {sent} pings in {FLOOD_SECONDS:.0f}s, none read; sends stalled {stalled} times;"
              f" RSS {before} KB -> peak {peak} KB (+{grown} KB)")  # fmt: skip
        self.assertGreater(sent, 10_000)
        self.assertGreater(stalled, 0)
        self.assertLess(grown, MAX_GROWTH_KB)
        self.assertTrue(self.healthy(timeout=10.0), self.tail())
