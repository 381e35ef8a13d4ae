"""
A tiny RFB 3.8 server on the real reactor, standing in for a VM's VNC
server in integration tests.

It speaks the server side of the handshake: ProtocolVersion, security
(None, or VNC authentication whose DES response it checks with vncdotool's
own DES code, not vaporproxy's), SecurityResult, then ServerInit once the
client's ClientInit is in.  After that it echoes every byte it gets back to
the client (and keeps a copy), so a test can prove bytes flow both ways;
or, with C{stream=True}, it writes without end as fast as its transport
lets it (a push producer paused by the transport), to test back-pressure.

Usage in a trial test case::

    vnc = await FakeVNCServer.listen(self, reactor, password="s3cret")
    vnc.port, vnc.sessions[0].auth_ok, vnc.sessions[0].echoed
"""

from __future__ import annotations

import os
import struct
import warnings
from typing import Any, List, Optional

from zope.interface import implementer

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import LoopingCall
from twisted.internet.protocol import Factory, Protocol
from vncdotool.rfb import _vnc_des, des_encrypt

VERSION = b"RFB 003.008\n"
SEC_NONE = 1
SEC_VNC_AUTH = 2
WIDTH, HEIGHT = 640, 480
#: 32 bpp, depth 24, little endian, true colour, 255/255/255, shifts 16/8/0.
PIXEL_FORMAT = struct.pack("!BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
NAME = b"fake-vnc"
#: The ServerInit message this server sends.
SERVER_INIT = struct.pack("!HH", WIDTH, HEIGHT) + PIXEL_FORMAT + struct.pack("!I", len(NAME)) + NAME
#: What a streaming server writes, again and again.
STREAM_CHUNK = b"\xa5" * 65536


def expected_response(password: str, challenge: bytes) -> bytes:
    """
    The right answer to C{challenge}, computed by vncdotool (a VNC client
    independent of vaporproxy).
    """
    with warnings.catch_warnings():
        # vncdotool uses TripleDES from its pre-"decrepit" location.
        warnings.simplefilter("ignore")
        return des_encrypt(_vnc_des(password), challenge)


@implementer(IPushProducer)
class Flood:
    """
    The push-producer half of a peer that writes L{STREAM_CHUNK} as fast as
    its transport lets it, without end: the transport pauses and resumes it.

    @ivar streamed: bytes written.
    @ivar paused: whether the transport has paused the stream.
    @ivar pauses: how many times it was paused.
    """

    transport: Any
    streamed = 0
    paused = False
    pauses = 0
    _loop: Optional[LoopingCall] = None

    def start_flood(self, clock: Any = None) -> None:
        """Register as the transport's producer and write every millisecond (on C{clock})."""
        self.transport.registerProducer(self, True)
        self._loop = LoopingCall(self._fill)
        if clock is not None:
            self._loop.clock = clock
        self._loop.start(0.001)

    def _fill(self) -> None:
        while not self.paused and self.transport.connected:
            self.transport.write(STREAM_CHUNK)
            self.streamed += len(STREAM_CHUNK)

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.paused = True

    def stop_flood(self) -> None:
        """Stop writing for good (the connection is lost)."""
        self.paused = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()


class FakeVNCSession(Flood, Protocol):
    """
    One RFB connection.

    @ivar client_version: the 12-byte ProtocolVersion the client sent.
    @ivar security_type: the security type the client chose.
    @ivar challenge: the 16-byte challenge sent (VNC auth).
    @ivar response: the 16-byte response the client sent (VNC auth).
    @ivar auth_ok: whether the response matched the password (VNC auth).
    @ivar shared: the ClientInit shared flag.
    @ivar echoed: every byte received after ClientInit (and echoed).
    @ivar streamed: bytes written after ServerInit (streaming server).
    @ivar paused: whether the transport has paused the stream.
    @ivar pauses: how many times it was paused.
    """

    factory: "FakeVNCServer"

    def __init__(self) -> None:
        self._buffer = b""
        self._state = "version"
        self.client_version: Optional[bytes] = None
        self.security_type: Optional[int] = None
        self.challenge: Optional[bytes] = None
        self.response: Optional[bytes] = None
        self.auth_ok: Optional[bool] = None
        self.shared: Optional[int] = None
        self.echoed = b""
        self.closed: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.factory.sessions.append(self)
        self.transport.write(VERSION)

    def _take(self, n: int) -> Optional[bytes]:
        if len(self._buffer) < n:
            return None
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def dataReceived(self, data: bytes) -> None:
        if self._state == "relay":
            self._echo(data)
            return
        self._buffer += data
        while self._step():
            pass

    def _echo(self, data: bytes) -> None:
        self.echoed += data
        self.transport.write(data)

    def _step(self) -> bool:
        password = self.factory.password
        if self._state == "version":
            got = self._take(12)
            if got is None:
                return False
            self.client_version = got
            offered = SEC_VNC_AUTH if password is not None else SEC_NONE
            self.transport.write(bytes([1, offered]))
            self._state = "security"
            return True
        if self._state == "security":
            got = self._take(1)
            if got is None:
                return False
            self.security_type = got[0]
            if password is None and got[0] == SEC_NONE:
                self.transport.write(struct.pack("!I", 0))
                self._state = "init"
            elif password is not None and got[0] == SEC_VNC_AUTH:
                self.challenge = os.urandom(16)
                self.transport.write(self.challenge)
                self._state = "auth"
            else:
                self._refuse(b"security type not offered")
            return True
        if self._state == "auth":
            got = self._take(16)
            if got is None:
                return False
            self.response = got
            assert self.challenge is not None and password is not None
            self.auth_ok = got == expected_response(password, self.challenge)
            if self.auth_ok:
                self.transport.write(struct.pack("!I", 0))
                self._state = "init"
            else:
                self._refuse(b"authentication failed")
            return True
        if self._state == "init":
            got = self._take(1)
            if got is None:
                return False
            self.shared = got[0]
            self.transport.write(SERVER_INIT)
            self._state = "relay"
            if self.factory.stream:
                self.start_flood(self.factory.reactor)
            rest, self._buffer = self._buffer, b""
            if rest:
                self._echo(rest)
            return False
        return False

    def _refuse(self, reason: bytes) -> None:
        self.transport.write(struct.pack("!I", 1) + struct.pack("!I", len(reason)) + reason)
        self._state = "refused"
        self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.stop_flood()
        self.closed.callback(None)


class FakeVNCServer(Factory):
    """
    The listening fake VNC server.

    @ivar password: the VNC password (C{None}: security type None).
    @ivar stream: whether sessions stream without end after ServerInit.
    @ivar sessions: every connection accepted, in order.
    @ivar port: the TCP port on 127.0.0.1.
    """

    protocol = FakeVNCSession

    def __init__(self, password: Optional[str], reactor: Any, stream: bool = False):
        self.password = password
        self.reactor = reactor
        self.stream = stream
        self.sessions: List[FakeVNCSession] = []
        self.port = 0
        self._listening: Any = None

    @classmethod
    async def listen(
        cls, testcase: Any, reactor: Any, password: Optional[str] = None, stream: bool = False
    ) -> "FakeVNCServer":
        """
        Listen on a free port of 127.0.0.1; stopped (and every connection
        closed) in C{testcase}'s cleanup.
        """
        server = cls(password, reactor, stream)
        server._listening = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server)
        server.port = server._listening.getHost().port
        testcase.addCleanup(server.stop)
        return server

    async def _stop(self) -> None:
        await maybeDeferred(self._listening.stopListening)
        for session in self.sessions:
            if not session.closed.called:
                session.transport.loseConnection()
                await session.closed

    def stop(self) -> Deferred:
        """
        Stop listening and close every open connection.
        """
        return Deferred.fromCoroutine(self._stop())
