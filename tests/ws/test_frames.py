"""
Tests for L{vaporproxy.ws.frames}: the relaying state's client frame parser,
unmasking and the direct TCP writer.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Any, List, Optional, Tuple

from twisted.trial.unittest import SynchronousTestCase

from vaporproxy.ws import frames as wsframes
from vaporproxy.ws.frames import (
    CLOSE_MESSAGE_TOO_BIG,
    CLOSE_PROTOCOL_ERROR,
    ClientFrameParser,
    _unmask_int,
    _unmask_translate,
    send_now,
    unmask,
)

MASK = b"\x37\xfa\x21\x3d"


def xor(data: bytes, mask: bytes) -> bytes:
    return bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def frame(
    opcode: int,
    payload: bytes,
    fin: bool = True,
    mask: Optional[bytes] = MASK,
    rsv: int = 0,
    length_bytes: Optional[int] = None,
) -> bytes:
    """
    A client frame; C{length_bytes} forces the length encoding (0, 2 or 8
    extra bytes).
    """
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    n = len(payload)
    if length_bytes is None:
        length_bytes = 0 if n < 126 else 2 if n < 0x10000 else 8
    masked = 0x80 if mask is not None else 0
    if length_bytes == 0:
        header = struct.pack("!BB", b0, masked | n)
    elif length_bytes == 2:
        header = struct.pack("!BBH", b0, masked | 126, n)
    else:
        header = struct.pack("!BBQ", b0, masked | 127, n)
    if mask is None:
        return header + payload
    return header + mask + xor(payload, mask)


class Recorder:
    """
    A parser with its callbacks recorded as events, data events merged.
    """

    def __init__(self, max_size: int = 0):
        self.events: List[Tuple[Any, ...]] = []
        self.data_calls = 0
        self.parser = ClientFrameParser(max_size, self.data, self.control, self.text, self.error)

    def data(self, payload: bytes) -> None:
        self.data_calls += 1
        assert isinstance(payload, bytes), type(payload)
        if self.events and self.events[-1][0] == "data":
            self.events[-1] = ("data", self.events[-1][1] + payload)
        else:
            self.events.append(("data", payload))

    def control(self, opcode: int, payload: bytes) -> None:
        self.events.append(("control", opcode, payload))

    def text(self) -> None:
        self.events.append(("text",))

    def error(self, code: int, reason: str) -> None:
        self.events.append(("error", code))

    def feed_splits(self, stream: bytes, cuts: Tuple[int, ...]) -> None:
        start = 0
        for cut in cuts + (len(stream),):
            self.parser.feed(stream[start:cut])
            start = cut


def every_split(test: SynchronousTestCase, stream: bytes, expected: List[Tuple[Any, ...]], max_size: int = 0) -> None:
    """
    Feed C{stream} whole, in every two-piece split, in every three-piece
    split (for short streams) and byte by byte; each gives C{expected}.
    """
    n = len(stream)
    splits: List[Tuple[int, ...]] = [()]
    splits += [(i,) for i in range(1, n)]
    if n <= 60:
        splits += [(i, j) for i in range(1, n) for j in range(i + 1, n)]
    splits.append(tuple(range(1, n)))
    for cuts in splits:
        r = Recorder(max_size)
        r.feed_splits(stream, cuts)
        test.assertEqual(r.events, expected, cuts)


class UnmaskTests(SynchronousTestCase):
    """
    Unmasking at every size and through every implementation.
    """

    def test_sizes(self) -> None:
        """
        When payloads of any size are unmasked, the result is the byte-wise
        XOR with the repeated mask.
        """
        for n in (0, 1, 3, 4, 5, 127, 128, 129, 4096, 65537):
            data = os.urandom(n)
            expected = xor(data, MASK)
            self.assertEqual(unmask(data, MASK), expected, n)
            self.assertEqual(unmask(memoryview(data), MASK), expected, n)
            self.assertEqual(_unmask_int(data, MASK), expected, n)
            self.assertEqual(_unmask_translate(data, MASK), expected, n)
            self.assertEqual(wsframes._unmask_large(data, MASK), expected, n)


class ParserTests(SynchronousTestCase):
    """
    The frame parser: every frame split across reads, lengths, control
    frames, caps and bad frames.
    """

    def test_smallFrameEverySplit(self) -> None:
        """
        When a small binary frame arrives in any number of pieces, its
        payload is delivered intact.
        """
        every_split(self, frame(2, b"hello, world"), [("data", b"hello, world")])

    def test_lengthEncodings(self) -> None:
        """
        When frames use 7-, 16- and 64-bit lengths, each payload is
        delivered intact whatever the split.
        """
        for payload in (b"", b"x" * 125, bytes(range(256)) * 2, os.urandom(70000)):
            stream = frame(2, payload)
            expected = [("data", payload)] if payload else []
            if len(payload) > 1000:
                for cuts in [(1,), (2,), (9,), (13,), (14,), (15,), (100,), (14, 14 + 4097), (len(stream) - 1,)]:
                    r = Recorder()
                    r.feed_splits(stream, cuts)
                    self.assertEqual(r.events, expected, cuts)
            else:
                every_split(self, stream, expected)

    def test_manyFramesOneRead(self) -> None:
        """
        When one read holds many frames, their payloads are delivered in
        order with one call.
        """
        r = Recorder()
        r.parser.feed(b"".join(frame(2, bytes([i]) * 4096) for i in range(10)))
        self.assertEqual(r.events, [("data", b"".join(bytes([i]) * 4096 for i in range(10)))])
        self.assertEqual(r.data_calls, 1)

    def test_fragmentedMessage(self) -> None:
        """
        When a binary message is fragmented into continuation frames with
        a ping between them, the data and the ping come out in order.
        """
        stream = frame(2, b"abc", fin=False) + frame(9, b"p!") + frame(0, b"def", fin=False) + frame(0, b"g")
        every_split(self, stream, [("data", b"abc"), ("control", 9, b"p!"), ("data", b"defg")])

    def test_controlFrames(self) -> None:
        """
        When pings, pongs and empty control frames arrive, each is reported
        whole and unmasked.
        """
        stream = frame(9, b"") + frame(10, b"x" * 125) + frame(2, b"data") + frame(9, b"ping")
        every_split(
            self,
            stream,
            [("control", 9, b""), ("control", 10, b"x" * 125), ("data", b"data"), ("control", 9, b"ping")],
        )

    def test_closeStops(self) -> None:
        """
        When a close frame arrives, it is reported and nothing after it is
        read.
        """
        stream = frame(2, b"a") + frame(8, struct.pack("!H", 1000) + b"bye") + frame(2, b"late")
        every_split(self, stream, [("data", b"a"), ("control", 8, b"\x03\xe8bye")])

    def test_masks(self) -> None:
        """
        When every frame has its own mask, including an all-zero one, each
        payload is unmasked with its own.
        """
        r = Recorder()
        masks = [b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\x01\x02\x03\x04", os.urandom(4)]
        payloads = [os.urandom(n) for n in (5, 300, 7, 70000)]
        r.parser.feed(b"".join(frame(2, p, mask=m) for p, m in zip(payloads, masks)))
        self.assertEqual(r.events, [("data", b"".join(payloads))])

    def test_textRefused(self) -> None:
        """
        When a text message arrives, it is reported once, its payload is
        not delivered, and later frames are still parsed.
        """
        stream = (
            frame(2, b"before")
            + frame(1, b"text", fin=False)
            + frame(0, b"more")
            + frame(8, struct.pack("!H", 1000))
        )
        every_split(self, stream, [("data", b"before"), ("text",), ("control", 8, b"\x03\xe8")])

    def test_frameCap(self) -> None:
        """
        When a frame announces more than the cap, the connection fails with
        1009 before any of its payload is delivered.
        """
        stream = frame(2, b"ok") + frame(2, b"y" * 200)
        every_split(self, stream[:20], [("data", b"ok"), ("error", CLOSE_MESSAGE_TOO_BIG)], max_size=100)
        r = Recorder(100)
        r.parser.feed(frame(2, b"y" * 100))
        self.assertEqual(r.events, [("data", b"y" * 100)])

    def test_messageCap(self) -> None:
        """
        When the frames of one message add up to more than the cap, the
        connection fails with 1009.
        """
        stream = frame(2, b"a" * 60, fin=False) + frame(0, b"b" * 60)
        r = Recorder(100)
        r.parser.feed(stream)
        self.assertEqual(r.events, [("data", b"a" * 60), ("error", CLOSE_MESSAGE_TOO_BIG)])
        self.assertTrue(r.parser.stopped)

    def test_badFrames(self) -> None:
        """
        When a frame breaks RFC 6455, the connection fails with 1002, data
        before it is delivered and nothing after it.
        """
        bad = [
            frame(2, b"x", rsv=4),
            frame(2, b"x", rsv=1),
            frame(2, b"x", mask=None),
            frame(3, b"x"),
            frame(0xB, b"x"),
            frame(9, b"x", fin=False),
            frame(9, b"x" * 126),
            frame(8, b"\x03"),
            frame(0, b"x"),
            frame(2, b"x" * 10, length_bytes=2),
            frame(2, b"x" * 300, length_bytes=8),
            struct.pack("!BBQ", 0x82, 0xFF, 1 << 63) + MASK,
        ]
        cases = [(case, b"good") for case in bad]
        # The first frame of a message is good; a new message inside it is not.
        cases.append((frame(2, b"x", fin=False) + frame(2, b"y"), b"goodx"))
        for case, delivered in cases:
            stream = frame(2, b"good") + case + frame(2, b"after")
            r = Recorder()
            r.parser.feed(stream)
            self.assertEqual(r.events, [("data", delivered), ("error", CLOSE_PROTOCOL_ERROR)], case)
            r.parser.feed(frame(2, b"later"))
            self.assertEqual(len(r.events), 2)

    def test_idle(self) -> None:
        """
        When the parser is between messages with nothing buffered it is
        idle, and not inside a frame or a fragmented message.
        """
        r = Recorder()
        self.assertTrue(r.parser.idle)
        r.parser.feed(frame(2, b"abc")[:3])
        self.assertFalse(r.parser.idle)
        r.parser.feed(frame(2, b"abc")[3:])
        self.assertTrue(r.parser.idle)
        r.parser.feed(frame(2, b"abc", fin=False))
        self.assertFalse(r.parser.idle)


class FakeTCP:
    """
    The attributes of a Twisted TCP transport that L{send_now} uses.
    """

    def __init__(self, sock: Any):
        self.socket = sock
        self.dataBuffer = b""
        self.offset = 0
        self._tempDataLen = 0
        self.disconnecting = False
        self.connected = True
        self.written: List[bytes] = []

    def writeSequence(self, chunks: List[bytes]) -> None:
        self.written.extend(chunks)
        self._tempDataLen += sum(map(len, chunks))


class PartialSocket:
    def __init__(self, accept: int, error: Optional[OSError] = None):
        self.accept = accept
        self.error = error
        self.sent = b""

    def send(self, data: bytes) -> int:
        return self.sendmsg([data])

    def sendmsg(self, chunks: List[bytes]) -> int:
        if self.error is not None:
            raise self.error
        data = b"".join(chunks)[: self.accept]
        self.sent += data
        return len(data)


class SendNowTests(SynchronousTestCase):
    """
    The direct writer keeps the order and the buffering of Twisted's.
    """

    def test_direct(self) -> None:
        """
        When nothing is buffered, the chunks go to the socket at once.
        """
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        t = FakeTCP(a)
        send_now(t, [b"head", b"payload"])
        self.assertEqual(b.recv(100), b"headpayload")
        self.assertEqual(t.written, [])

    def test_partial(self) -> None:
        """
        When the socket takes only part, the rest goes through the
        transport's buffered write, in order.
        """
        for accept, rest in [(0, [b"head", b"payload"]), (2, [b"ad", b"payload"]), (4, [b"payload"]), (6, [b"yload"])]:
            t = FakeTCP(PartialSocket(accept))
            send_now(t, [b"head", b"payload"])
            self.assertEqual(t.written, rest, accept)

    def test_buffered(self) -> None:
        """
        When data is already buffered, or the transport is closing, the
        chunks queue behind it instead of overtaking it.
        """
        sock = PartialSocket(100)
        t = FakeTCP(sock)
        t._tempDataLen = 3
        send_now(t, [b"x"])
        t = FakeTCP(sock)
        t.dataBuffer, t.offset = b"abc", 1
        send_now(t, [b"y"])
        t2 = FakeTCP(sock)
        t2.disconnecting = True
        send_now(t2, [b"z"])
        self.assertEqual((sock.sent, t.written, t2.written), (b"", [b"y"], [b"z"]))

    def test_error(self) -> None:
        """
        When the socket raises, everything goes through the transport's
        write, which reports the error its own way.
        """
        t = FakeTCP(PartialSocket(0, BlockingIOError()))
        send_now(t, [b"a", b"b"])
        t2 = FakeTCP(PartialSocket(0, BrokenPipeError()))
        send_now(t2, [b"c"])
        self.assertEqual((t.written, t2.written), ([b"a", b"b"], [b"c"]))


class DirectWriterTests(SynchronousTestCase):
    """
    Which transports the direct writer may write to.
    """

    def test_plainTCP(self) -> None:
        """
        When the transport is Twisted's plain TCP connection, it is used directly.
        """
        from twisted.internet import tcp

        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        conn = tcp.Connection(a, None)
        self.assertIs(wsframes.direct_writer(conn), conn)

    def test_startTLS(self) -> None:
        """
        When startTLS was called on the TCP connection (VeNCrypt), its bytes
        must go through TLS, so there is no direct writer.
        """
        from twisted.internet import tcp

        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        conn = tcp.Connection(a, None)
        conn.TLS = True
        self.assertIsNone(wsframes.direct_writer(conn))

    def test_notTCP(self) -> None:
        """
        When the transport is something else (a TLS wrapper, a test transport), there is no direct writer.
        """
        from twisted.internet.testing import StringTransport

        self.assertIsNone(wsframes.direct_writer(StringTransport()))
