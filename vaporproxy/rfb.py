"""
The VNC (RFB) protocol guard: the proxy does the RFB security handshake with
the VM itself and offers the browser security type None, so the console
password never leaves the server (DESIGN.md rule 8).

The guard is sans-IO: the bridge feeds it bytes (L{RFBGuard.client_data},
L{RFBGuard.server_data}) and events (L{RFBGuard.start},
L{RFBGuard.server_connected}), and the guard answers through its sink
(C{send_to_client}, C{send_to_server}, C{established}, C{fail}).  Once it has
called C{established()} the bridge relays raw bytes and never calls the guard
again.

This module also holds L{StepReader}, the small incremental parser both
guards use: a parsing generator yields how many bytes it needs next (or a
condition to wait for) and gets those bytes back, so any fragmentation of
the input, down to one byte at a time, is handled in one place.
"""

from __future__ import annotations

import re
import struct
from collections import deque
from typing import Callable, Deque, Generator, Optional, Tuple, Union

from cryptography.hazmat.primitives.ciphers import Cipher, modes
from twisted.logger import Logger

from vaporproxy.errors import ConsoleError, ErrorCode

try:  # cryptography >= 43 moved TripleDES to the "decrepit" package.
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
except ImportError:  # pragma: no cover - older cryptography
    from cryptography.hazmat.primitives.ciphers.algorithms import TripleDES

log = Logger()



class UpTo:
    """
    What a parsing step yields to get whatever is buffered, between 1 and
    C{n} bytes, as soon as at least one byte is there.
    """

    def __init__(self, n: int):
        if n < 1:
            raise ValueError("UpTo needs a positive count")
        self.n = n


#: What a parsing step may ask for: exactly a byte count, up to a byte count
#: (L{UpTo}), or a condition to wait for.
Need = Union[int, UpTo, Callable[[], bool]]
Steps = Generator[Need, Optional[bytes], None]

#: The version the proxy offers the browser, and the highest it speaks to a VM.
RFB_VERSION_38 = b"RFB 003.008\n"
_VERSION_RE = re.compile(rb"\ARFB (\d{3})\.(\d{3})\n\Z")

SEC_INVALID = 0
SEC_NONE = 1
SEC_VNC_AUTH = 2
SEC_VENCRYPT = 19

#: Unconsumed bytes a side may have buffered before the guard gives up.
MAX_CLIENT_BUFFER = 64 * 1024
MAX_SERVER_BUFFER = 64 * 1024
#: The longest failure reason string accepted from a VM.
MAX_REASON_LENGTH = 4096

AUTH_FAILED = "console authentication failed"


class GuardFailure(Exception):
    """
    Raised inside a parsing step to end the handshake with an error.

    @ivar error: the client-safe L{ConsoleError}.
    @ivar reason: a log-only description.
    """

    def __init__(self, error: ConsoleError, reason: str):
        super().__init__(error, reason)
        self.error = error
        self.reason = reason


class StepReader:
    """
    Feeds bytes to a parsing generator.

    The generator yields an C{int} (give me exactly that many bytes), an
    L{UpTo} (give me what you have, at most that many) or a callable (resume
    me, with C{None}, once this returns true).  Bytes that
    arrive beyond what the generator asked for stay buffered, up to
    C{limit}; L{take_rest} hands them out.

    @ivar done: whether the generator has finished.
    """

    def __init__(self, steps: Steps, limit: int, overflow: Callable[[], GuardFailure]):
        self._steps = steps
        self._limit = limit
        self._overflow = overflow
        self._buffer = bytearray()
        self.done = False
        self._need: Need = 0
        self._advance(None)

    def _advance(self, value: Optional[bytes]) -> None:
        try:
            self._need = self._steps.send(value)
        except StopIteration:
            self.done = True

    def feed(self, data: bytes) -> None:
        """
        Add C{data} and run the generator as far as it can go.

        @raise GuardFailure: from the generator, or when what it left
            unconsumed is more than the limit.
        """
        self._buffer += data
        self.pump()
        if len(self._buffer) > self._limit:
            raise self._overflow()

    def pump(self) -> None:
        """
        Run the generator as far as the buffered bytes and its wait
        conditions allow.
        """
        while not self.done:
            need = self._need
            if isinstance(need, UpTo):
                if not self._buffer:
                    return
                chunk = bytes(self._buffer[: need.n])
                del self._buffer[: need.n]
                self._advance(chunk)
            elif callable(need):
                if not need():
                    return
                self._advance(None)
            elif len(self._buffer) >= need:
                chunk = bytes(self._buffer[:need])
                del self._buffer[:need]
                self._advance(chunk)
            else:
                return

    def take_rest(self) -> bytes:
        """
        Remove and return the bytes buffered beyond what was consumed.
        """
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest

    def buffered(self) -> int:
        """
        How many unconsumed bytes are buffered.
        """
        return len(self._buffer)


class SinkQueue:
    """
    Calls on a sink, queued while a parsing step runs and made afterwards,
    so a sink that calls back into the guard never re-enters a running
    generator.  Nothing is delivered after a C{fail}.
    """

    def __init__(self, sink: object):
        self._sink = sink
        self._queue: Deque[Tuple[str, tuple]] = deque()
        self._flushing = False
        self.failed = False
        self.finished = False

    def emit(self, method: str, *args: object) -> None:
        self._queue.append((method, args))

    def flush(self) -> None:
        if self._flushing:
            return
        self._flushing = True
        try:
            while self._queue and not self.failed:
                method, args = self._queue.popleft()
                if method == "fail":
                    self.failed = True
                    self._queue.clear()
                elif method == "established":
                    self.finished = True
                getattr(self._sink, method)(*args)
        finally:
            self._flushing = False


def parse_version(data: bytes) -> Optional[Tuple[int, int]]:
    """
    Parse a 12-byte RFB ProtocolVersion message.

    @return: C{(major, minor)}, or C{None} when C{data} is not one.
    """
    match = _VERSION_RE.match(data)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


def effective_version(major: int, minor: int) -> Optional[int]:
    """
    The handshake a peer's version stands for (RFC 6143 7.1.1): 3, 7 or 8
    (for 3.3, 3.7, 3.8), or C{None} for a major version below 3.  Versions
    above 3.8 speak 3.8 with us; other 3.x versions are 3.3.
    """
    if major < 3:
        return None
    if major > 3 or minor >= 8:
        return 8
    if minor == 7:
        return 7
    return 3


def version_bytes(minor: int) -> bytes:
    """
    The ProtocolVersion message for RFB 3.C{minor}.
    """
    return b"RFB 003.%03d\n" % (minor,)


def reverse_bits(data: bytes) -> bytes:
    """
    Reverse the bit order of every byte (VNC's DES key quirk).
    """
    return bytes(int(f"{b:08b}"[::-1], 2) for b in data)


def vnc_des_key(password: str) -> bytes:
    """
    The DES key VNC authentication derives from a password: its first 8
    bytes, zero padded, each byte bit-reversed.
    """
    raw = password.encode("utf-8")[:8].ljust(8, b"\0")
    return reverse_bits(raw)


def vnc_auth_response(password: str, challenge: bytes) -> bytes:
    """
    Answer a 16-byte VNC authentication challenge (RFC 6143 7.2.2): DES-ECB
    of the challenge under L{vnc_des_key}.
    """
    if len(challenge) != 16:
        raise ValueError("VNC challenge must be 16 bytes")
    key = vnc_des_key(password)
    # Triple-DES with one key repeated three times is single DES.
    encryptor = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()
    return encryptor.update(challenge) + encryptor.finalize()


def _client_failure(reason: str) -> GuardFailure:
    return GuardFailure(ConsoleError(ErrorCode.BAD_REQUEST), reason)


def _server_failure(reason: str) -> GuardFailure:
    return GuardFailure(ConsoleError(ErrorCode.CONNECTION_FAILED), reason)


def _u32(data: bytes) -> int:
    return struct.unpack("!I", data)[0]


class RFBGuard:
    """
    The RFB handshake of one VNC console, done by the proxy.

    Towards the browser the proxy is an RFB 3.8 server offering only
    security type None (it accepts clients speaking 3.3, 3.7 and 3.8).
    Towards the VM it is an RFB client that answers VNC authentication with
    the real password.  The browser's ClientInit (and anything after it) is
    held until the VM side is authenticated, then forwarded, and the guard
    calls C{established()}.

    @param sink: the bridge (C{send_to_client}, C{send_to_server},
        C{established}, C{fail}).
    @param password: the console password, or C{None} when there is none.
    """

    def __init__(self, sink: object, password: Optional[str]):
        self._password = password if password else None
        self._out = SinkQueue(sink)
        self._started = False
        self._server_done = False
        self.client_version: Optional[int] = None
        self.server_version: Optional[int] = None
        self.security_type: Optional[int] = None
        self._client = StepReader(
            self._client_steps(),
            MAX_CLIENT_BUFFER,
            lambda: _client_failure("client sent too much during the handshake"),
        )
        self._server = StepReader(
            self._server_steps(),
            MAX_SERVER_BUFFER,
            lambda: _server_failure("server sent too much during the handshake"),
        )

    # -- guard protocol ----------------------------------------------------

    def start(self) -> None:
        """
        The WebSocket is open and the token redeemed: greet the browser.
        """
        self._started = True
        self._run(self._client.pump)

    def client_data(self, data: bytes) -> None:
        """
        Bytes from the browser.
        """
        self._run(lambda: self._client.feed(data))

    def server_connected(self) -> None:
        """
        The TCP connection to the VM is up; the VM speaks first.
        """
        self._run(self._server.pump)

    def server_data(self, data: bytes) -> None:
        """
        Bytes from the VM.
        """
        self._run(lambda: self._server.feed(data))

    # -- internals ---------------------------------------------------------

    def _run(self, step: Callable[[], None]) -> None:
        if self._out.failed or self._out.finished:
            return
        try:
            step()
            # A step on one side may unblock the other.
            self._client.pump()
        except GuardFailure as failure:
            log.debug("VNC handshake failed: {reason}", reason=failure.reason)
            self._out.emit("fail", failure.error, failure.reason)
        self._out.flush()

    def _client_steps(self) -> Steps:
        out = self._out
        yield lambda: self._started
        out.emit("send_to_client", RFB_VERSION_38)
        parsed = parse_version((yield 12))
        if parsed is None:
            raise _client_failure("client sent a malformed protocol version")
        version = effective_version(*parsed)
        if version is None:
            raise _client_failure("client protocol version %d.%d" % parsed)
        self.client_version = version
        if version == 3:
            out.emit("send_to_client", struct.pack("!I", SEC_NONE))
        else:
            out.emit("send_to_client", bytes([1, SEC_NONE]))
            choice = (yield 1)[0]
            if choice != SEC_NONE:
                raise _client_failure("client chose security type %d" % (choice,))
            if version == 8:
                out.emit("send_to_client", struct.pack("!I", 0))
        client_init = yield 1
        yield lambda: self._server_done
        out.emit("send_to_server", client_init + self._client.take_rest())
        leftover = self._server.take_rest()
        if leftover:
            out.emit("send_to_client", leftover)
        out.emit("established")

    def _read_reason(self) -> Generator[Need, Optional[bytes], str]:
        length = _u32((yield 4))
        if length > MAX_REASON_LENGTH:
            raise _server_failure("server reason string of %d bytes" % (length,))
        reason = yield length
        return reason.decode("utf-8", "replace").rstrip("\0")

    def _server_steps(self) -> Steps:
        out = self._out
        parsed = parse_version((yield 12))
        if parsed is None:
            raise _server_failure("server sent a malformed protocol version")
        version = effective_version(*parsed)
        if version is None:
            raise _server_failure("server protocol version %d.%d" % parsed)
        self.server_version = version
        out.emit("send_to_server", version_bytes(version))

        if version == 3:
            offered = _u32((yield 4))
            if offered == SEC_INVALID:
                reason = yield from self._read_reason()
                raise _server_failure("server refused the connection: %s" % (reason,))
            chosen = self._choose([offered])
        else:
            count = (yield 1)[0]
            if count == 0:
                reason = yield from self._read_reason()
                raise _server_failure("server refused the connection: %s" % (reason,))
            chosen = self._choose(list((yield count)))
            out.emit("send_to_server", bytes([chosen]))
        self.security_type = chosen

        if chosen == SEC_VNC_AUTH:
            challenge = yield 16
            assert self._password is not None
            out.emit("send_to_server", vnc_auth_response(self._password, challenge))
        if chosen == SEC_VNC_AUTH or version == 8:
            result = _u32((yield 4))
            if result != 0:
                detail = ""
                if version == 8:
                    detail = yield from self._read_reason()
                raise _server_failure("%s: %s" % (AUTH_FAILED, detail or result))
        self._server_done = True

    def _choose(self, offered: list) -> int:
        """
        Pick the security type to use with the VM.
        """
        if self._password is not None and SEC_VNC_AUTH in offered:
            return SEC_VNC_AUTH
        if SEC_NONE in offered:
            return SEC_NONE
        if SEC_VNC_AUTH in offered:
            raise _server_failure("console wants VNC authentication but no password is known")
        if SEC_VENCRYPT in offered:
            raise _server_failure("VeNCrypt (security type 19) is not supported yet")
        raise _server_failure("no supported security type among %r" % (offered,))
