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

VeNCrypt (security type 19) runs TLS on the VM connection itself: after the
VeNCrypt negotiation the guard calls the sink's C{start_tls(creator)} and the
bridge answers with C{transport.startTLS(creator)}; from then on
C{server_data} gets plaintext.  The X.509 settings of a hypervisor are loaded
once into a L{VncTLS} (see L{vnc_tls_by_uri}); L{VncTLS.for_host} gives the
L{VeNCryptTLS} the guard takes for one connection.  When the VM connection
closes during the handshake the bridge calls C{server_lost(reason)}, so a
failed TLS handshake is logged with OpenSSL's reason.

This module also holds L{StepReader}, the small incremental parser both
guards use: a parsing generator yields how many bytes it needs next (or a
condition to wait for) and gets those bytes back, so any fragmentation of
the input, down to one byte at a time, is handled in one place.
"""

from __future__ import annotations

import re
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Generator, Iterable, List, Optional, Tuple, Union

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.ciphers import Cipher, modes
from OpenSSL import SSL
from twisted.internet.error import VerifyError
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    KeyPair,
    PrivateCertificate,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from vaporproxy.config import ConfigError, HypervisorConfig, VncTLSConfig
from vaporproxy.errors import ConsoleError, ErrorCode

try:  # cryptography >= 43 moved TripleDES to the "decrepit" package.
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
except ImportError:  # pragma: no cover - older cryptography
    from cryptography.hazmat.primitives.ciphers.algorithms import TripleDES

log = Logger(namespace="vaporproxy.rfb")



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

#: VeNCrypt sub-types (the VeNCrypt specification; QEMU's vnc.h).
VENCRYPT_PLAIN = 256
VENCRYPT_TLS_NONE = 257
VENCRYPT_TLS_VNC = 258
VENCRYPT_TLS_PLAIN = 259
VENCRYPT_X509_NONE = 260
VENCRYPT_X509_VNC = 261
VENCRYPT_X509_PLAIN = 262
VENCRYPT_TLS_SASL = 263
VENCRYPT_X509_SASL = 264
#: Sub-types whose inner authentication is the VNC DES challenge.
_VENCRYPT_VNC_AUTH = (VENCRYPT_X509_VNC, VENCRYPT_TLS_VNC)
#: Anonymous-TLS sub-types (unauthenticated server, only with allow_anonymous).
_VENCRYPT_ANONYMOUS = (VENCRYPT_TLS_VNC, VENCRYPT_TLS_NONE)

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
            # The last wait condition may be a closure over the guard.
            self._need = 0

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
        buffer = self._buffer
        while not self.done:
            need = self._need
            if type(need) is int:
                # The common step: exactly that many bytes.
                if len(buffer) < need:
                    return
                chunk = bytes(buffer[:need])
                del buffer[:need]
                self._advance(chunk)
            elif isinstance(need, UpTo):
                if not buffer:
                    return
                chunk = bytes(buffer[: need.n])
                del buffer[: need.n]
                self._advance(chunk)
            elif callable(need):
                if not need():
                    return
                self._advance(None)
            else:
                raise TypeError(f"a handshake step yielded {need!r}")

    def close(self) -> None:
        """
        Stop: the generator is closed where it waits (its frame, which
        refers to the guard, is freed with it) and nothing more is read.
        """
        self.done = True
        self._need = 0
        self._buffer.clear()
        self._steps.close()

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


def client_failure(reason: str) -> GuardFailure:
    """
    A handshake failure the browser caused: BAD_REQUEST, C{reason} logged.
    """
    return GuardFailure(ConsoleError(ErrorCode.BAD_REQUEST), reason)


def server_failure(reason: str) -> GuardFailure:
    """
    A handshake failure the VM caused: CONNECTION_FAILED, C{reason} logged.
    """
    return GuardFailure(ConsoleError(ErrorCode.CONNECTION_FAILED), reason)


def handshake_readers(
    client_steps: Steps, server_steps: Steps, client_limit: int, server_limit: int
) -> Tuple[StepReader, StepReader]:
    """
    The two L{StepReader}s of a guard, browser side then VM side (each
    generator is started in that order), failing with L{client_failure} or
    L{server_failure} when that side leaves more than its limit unconsumed.
    """
    client = StepReader(
        client_steps, client_limit, lambda: client_failure("client sent too much during the handshake")
    )
    server = StepReader(
        server_steps, server_limit, lambda: server_failure("server sent too much during the handshake")
    )
    return client, server


class TwoSidedGuard:
    """
    What the RFB and SPICE guards share: a L{StepReader} per side, a
    L{SinkQueue} (C{_out}), how one step is run, and C{close}.
    """

    #: Names the protocol in the debug line of a failed handshake.
    protocol_name = ""

    _client: StepReader
    _server: StepReader
    _out: "SinkQueue"

    def _run(self, step: Callable[..., None], *args: Any) -> None:
        """
        Run C{step(*args)}, let both sides go as far as that allows (a step
        on one side may unblock the other), then make the queued sink calls;
        a L{GuardFailure} becomes the sink's one C{fail}.
        """
        if self._out.failed or self._out.finished:
            return
        try:
            step(*args)
            self._client.pump()
            self._server.pump()
        except GuardFailure as failure:
            log.debug("{protocol} handshake failed: {reason}", protocol=self.protocol_name, reason=failure.reason)
            self._out.emit("fail", failure.error, failure.reason)
        self._out.flush()

    def close(self) -> None:
        """
        The bridge is done with this guard (the handshake is over, failed,
        or the console ended): both parsers stop where they are, so the
        guard and its suspended generators, which refer to each other,
        are freed at once rather than by the cyclic garbage collector.
        """
        self._client.close()
        self._server.close()


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


def peer_version(data: bytes, peer: str, failure: Callable[[str], GuardFailure]) -> int:
    """
    The handshake (3, 7 or 8) a peer's ProtocolVersion message stands for.

    @param peer: C{"client"} or C{"server"}, for the failure's reason.
    @raise GuardFailure: from C{failure} when the message is malformed or
        the version is below 3.
    """
    parsed = parse_version(data)
    if parsed is None:
        raise failure(f"{peer} sent a malformed protocol version")
    version = effective_version(*parsed)
    if version is None:
        raise failure("%s protocol version %d.%d" % (peer, *parsed))
    return version


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


def _u32(data: bytes) -> int:
    return struct.unpack("!I", data)[0]


class RFBGuard(TwoSidedGuard):
    """
    The RFB handshake of one VNC console, done by the proxy.

    Towards the browser the proxy is an RFB 3.8 server offering only
    security type None (it accepts clients speaking 3.3, 3.7 and 3.8).
    Towards the VM it is an RFB client that answers VNC authentication with
    the real password.  The browser's ClientInit (and anything after it) is
    held until the VM side is authenticated, then forwarded, and the guard
    calls C{established()}.

    With a L{VeNCryptTLS} the guard also speaks VeNCrypt (security type 19)
    to the VM: TLS with a verified X.509 certificate, then VNC
    authentication (X509Vnc) or none (X509None) inside it.  Without one a
    VM that only offers VeNCrypt is refused.

    @param sink: the bridge (C{send_to_client}, C{send_to_server},
        C{established}, C{fail}, and C{start_tls(creator)} for VeNCrypt).
    @param password: the console password, or C{None} when there is none.
    @param tls: the TLS settings for this VM, or C{None} (no VeNCrypt).

    @ivar vencrypt_subtype: the VeNCrypt sub-type in use, or C{None}.
    """

    protocol_name = "VNC"

    def __init__(self, sink: object, password: Optional[str], tls: Optional["VeNCryptTLS"] = None):
        self._password = password if password else None
        self._tls = tls
        self._out = SinkQueue(sink)
        self._started = False
        self._server_done = False
        self._tls_started = False
        self._tls_data = False
        self.client_version: Optional[int] = None
        self.server_version: Optional[int] = None
        self.security_type: Optional[int] = None
        self.vencrypt_subtype: Optional[int] = None
        self._client, self._server = handshake_readers(
            self._client_steps(), self._server_steps(), MAX_CLIENT_BUFFER, MAX_SERVER_BUFFER
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
        self._run(self._client.feed, data)

    def server_connected(self) -> None:
        """
        The TCP connection to the VM is up; the VM speaks first.
        """
        self._run(self._server.pump)

    def server_data(self, data: bytes) -> None:
        """
        Bytes from the VM (plaintext once C{start_tls} was called).
        """
        if self._tls_started and data:
            self._tls_data = True
        self._run(self._server.feed, data)

    def server_lost(self, reason: object = None) -> None:
        """
        The VM connection closed before the handshake was over: fail with
        CONNECTION_FAILED and a log reason saying why, in particular why a
        TLS handshake failed.

        @param reason: the C{connectionLost} reason (a L{Failure} or an
            exception), or C{None}.
        """

        def lost() -> None:
            detail = describe_connection_lost(reason)
            if self._tls_started and not self._tls_data:
                raise server_failure("TLS handshake with the VM failed: %s" % (detail,))
            raise server_failure("VM closed the connection during the handshake: %s" % (detail,))

        self._run(lost)

    # -- internals ---------------------------------------------------------

    def _client_steps(self) -> Steps:
        out = self._out
        yield lambda: self._started
        out.emit("send_to_client", RFB_VERSION_38)
        version = peer_version((yield 12), "client", client_failure)
        self.client_version = version
        if version == 3:
            out.emit("send_to_client", struct.pack("!I", SEC_NONE))
        else:
            out.emit("send_to_client", bytes([1, SEC_NONE]))
            choice = (yield 1)[0]
            if choice != SEC_NONE:
                raise client_failure("client chose security type %d" % (choice,))
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
            raise server_failure("server reason string of %d bytes" % (length,))
        reason = yield length
        return reason.decode("utf-8", "replace").rstrip("\0")

    def _server_steps(self) -> Steps:
        out = self._out
        version = peer_version((yield 12), "server", server_failure)
        self.server_version = version
        out.emit("send_to_server", version_bytes(version))

        if version == 3:
            offered = _u32((yield 4))
            if offered == SEC_INVALID:
                reason = yield from self._read_reason()
                raise server_failure("server refused the connection: %s" % (reason,))
            chosen = self._choose([offered])
        else:
            count = (yield 1)[0]
            if count == 0:
                reason = yield from self._read_reason()
                raise server_failure("server refused the connection: %s" % (reason,))
            chosen = self._choose(list((yield count)))
            out.emit("send_to_server", bytes([chosen]))
        self.security_type = chosen

        vnc_auth = chosen == SEC_VNC_AUTH
        if chosen == SEC_VENCRYPT:
            yield from self._vencrypt_steps()
            vnc_auth = self.vencrypt_subtype in _VENCRYPT_VNC_AUTH
        if vnc_auth:
            challenge = yield 16
            assert self._password is not None
            out.emit("send_to_server", vnc_auth_response(self._password, challenge))
        # After VNC auth and VeNCrypt a SecurityResult always follows; after
        # None only in RFB 3.8.
        if chosen != SEC_NONE or version == 8:
            result = _u32((yield 4))
            if result != 0:
                detail = ""
                if version == 8:
                    detail = yield from self._read_reason()
                raise server_failure("%s: %s" % (AUTH_FAILED, detail or result))
        self._server_done = True

    def _vencrypt_steps(self) -> Generator[Need, Optional[bytes], None]:
        """
        The VeNCrypt negotiation up to the TLS handshake: version 0.2,
        sub-type choice, the VM's acceptance, then C{start_tls}.
        """
        out = self._out
        major, minor = yield 2
        if (major, minor) < (0, 2):
            raise server_failure("VM speaks VeNCrypt %d.%d (0.2 needed)" % (major, minor))
        out.emit("send_to_server", b"\x00\x02")
        if (yield 1)[0] != 0:
            raise server_failure("VM refused VeNCrypt version 0.2")
        count = (yield 1)[0]
        if count == 0:
            raise server_failure("VM offered no VeNCrypt sub-type")
        raw = yield 4 * count
        offered = list(struct.unpack("!%dI" % (count,), raw))
        subtype, creator = self._choose_subtype(offered)
        out.emit("send_to_server", struct.pack("!I", subtype))
        ack = (yield 1)[0]
        if ack != 1:
            raise server_failure("VM refused VeNCrypt sub-type %s (answer %d)" % (subtype_name(subtype), ack))
        if self._server.buffered():
            # The client speaks first in TLS; anything here is not the VM's.
            raise server_failure("VM sent data before the TLS handshake")
        self.vencrypt_subtype = subtype
        self._tls_started = True
        log.debug("VeNCrypt: {subtype}, starting TLS", subtype=subtype_name(subtype))
        out.emit("start_tls", creator)

    def _choose_subtype(self, offered: List[int]) -> Tuple[int, Any]:
        """
        Pick the VeNCrypt sub-type and the TLS connection creator for it:
        X509Vnc when a password is known, else X509None; the anonymous TLS
        ones only when the configuration allows them.
        """
        tls = self._tls
        assert tls is not None
        wanted: List[int] = []
        if self._password is not None:
            wanted.append(VENCRYPT_X509_VNC)
        wanted.append(VENCRYPT_X509_NONE)
        if tls.anonymous is not None:
            if self._password is not None:
                wanted.append(VENCRYPT_TLS_VNC)
            wanted.append(VENCRYPT_TLS_NONE)
        for subtype in wanted:
            if subtype in offered:
                creator = tls.anonymous if subtype in _VENCRYPT_ANONYMOUS else tls.creator
                return subtype, creator
        names = ", ".join(subtype_name(t) for t in offered)
        if self._password is None and any(t in _VENCRYPT_VNC_AUTH for t in offered):
            raise server_failure(
                "console wants VNC authentication inside VeNCrypt but no password is known (offered: %s)" % (names,)
            )
        if tls.anonymous is None and any(t in _VENCRYPT_ANONYMOUS for t in offered):
            raise server_failure(
                "VM offers only anonymous TLS (unauthenticated; allow_anonymous is off): %s" % (names,)
            )
        raise server_failure("no acceptable VeNCrypt sub-type among: %s" % (names,))

    def _choose(self, offered: list) -> int:
        """
        Pick the security type to use with the VM: VeNCrypt when TLS is
        configured (and then only VeNCrypt: a VM, or anyone on the path,
        that offers plain types instead would otherwise get the password's
        DES answer in clear), else VNC authentication when a password is
        known, then None.
        """
        if self._tls is not None:
            if SEC_VENCRYPT in offered:
                return SEC_VENCRYPT
            raise server_failure(
                "vnc_tls is configured for this VM's hypervisor but the VM does not offer VeNCrypt"
                " (offered %r): refusing a console without TLS" % (offered,)
            )
        if self._password is not None and SEC_VNC_AUTH in offered:
            return SEC_VNC_AUTH
        if SEC_NONE in offered:
            return SEC_NONE
        if SEC_VNC_AUTH in offered:
            raise server_failure("console wants VNC authentication but no password is known")
        if SEC_VENCRYPT in offered:
            raise server_failure(
                "VM wants VeNCrypt (security type 19) but no vnc_tls is configured for its hypervisor"
            )
        raise server_failure("no supported security type among %r" % (offered,))


_SUBTYPE_NAMES = {
    VENCRYPT_PLAIN: "Plain",
    VENCRYPT_TLS_NONE: "TLSNone",
    VENCRYPT_TLS_VNC: "TLSVnc",
    VENCRYPT_TLS_PLAIN: "TLSPlain",
    VENCRYPT_X509_NONE: "X509None",
    VENCRYPT_X509_VNC: "X509Vnc",
    VENCRYPT_X509_PLAIN: "X509Plain",
    VENCRYPT_TLS_SASL: "TLSSASL",
    VENCRYPT_X509_SASL: "X509SASL",
}


def subtype_name(subtype: int) -> str:
    """
    A VeNCrypt sub-type for log lines, e.g. C{"X509Vnc (261)"}.
    """
    name = _SUBTYPE_NAMES.get(subtype)
    return "%s (%d)" % (name, subtype) if name else str(subtype)


def describe_connection_lost(reason: object) -> str:
    """
    A one-line log description of why a connection closed: OpenSSL's
    reasons for a TLS error (e.g. C{certificate verify failed}), the
    message of a hostname mismatch, or the exception's name.
    """
    value = reason.value if isinstance(reason, Failure) else reason
    if value is None:
        return "connection closed"
    if isinstance(value, SSL.Error):
        parts = []
        for item in value.args[0] if value.args and isinstance(value.args[0], list) else ():
            if isinstance(item, tuple) and item:
                parts.append(str(item[-1]))
        if parts:
            return "; ".join(parts)[:300]
    text = str(value).strip().splitlines()[0] if str(value).strip() else ""
    name = type(value).__name__
    return ("%s: %s" % (name, text) if text else name)[:300]


# ---------------------------------------------------------------------------
# TLS settings (VeNCrypt)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class VeNCryptTLS:
    """
    What the guard needs for VeNCrypt with one VM connection.

    @ivar creator: the connection creator for the X.509 sub-types (checks
        the VM's certificate unless verification is off); the guard hands it
        to the sink's C{start_tls}.
    @ivar anonymous: the creator for the anonymous-TLS sub-types (TLSVnc,
        TLSNone), or C{None} when they are refused.
    """

    creator: Any
    anonymous: Any = None


@implementer(IOpenSSLClientConnectionCreator)
class AnonymousTLSCreator:
    """
    TLS 1.2 with anonymous Diffie-Hellman only (what VeNCrypt's TLSNone and
    TLSVnc use): encrypted but unauthenticated, so only used when
    C{allow_anonymous} is set.
    """

    def __init__(self) -> None:
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_max_proto_version(SSL.TLS1_2_VERSION)
        context.set_cipher_list(b"aNULL:!eNULL:@SECLEVEL=0")
        self._context = context

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self._context, None)


def _read(key: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"{key}: {path!r} cannot be read ({e.strerror or e})") from None


def _load_certificates(key: str, path: str) -> List[Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(_read(key, path))
    except ValueError:
        raise ConfigError(
            f"{key}: {path!r} is not a PEM certificate file (expected one or more CERTIFICATE blocks)"
        ) from None
    return [Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM)) for c in certificates]


class VncTLS:
    """
    The VeNCrypt TLS settings of one hypervisor's VMs, with the files read
    once.  L{for_host} gives what the guard needs for one connection.

    @param config: the hypervisor's C{vnc_tls} section.
    @param key: the dotted config key, for error messages.
    @raise ConfigError: when a file cannot be read or parsed.
    """

    #: How many per-host connection creators are kept.
    CACHE_SIZE = 256

    def __init__(self, config: VncTLSConfig, key: str = "vnc_tls"):
        self.config = config
        self._trust: Any = None
        if config.verify:
            if config.ca_file is None:
                self._trust = platformTrust()
            else:
                self._trust = trustRootFromCertificates(_load_certificates(f"{key}.ca_file", config.ca_file))
        self._client: Optional[PrivateCertificate] = None
        if config.cert_file is not None:
            certificates = _load_certificates(f"{key}.cert_file", config.cert_file)
            key_file = config.key_file or config.cert_file
            try:
                pair = KeyPair.load(_read(f"{key}.key_file", key_file), 1)  # FILETYPE_PEM
            except Exception:
                raise ConfigError(f"{key}.key_file: {key_file!r} is not a PEM private key") from None
            try:
                self._client = PrivateCertificate.fromCertificateAndKeyPair(certificates[0], pair)
            except VerifyError:
                raise ConfigError(
                    f"{key}.key_file: {key_file!r} is not the key of {config.cert_file!r} (expected the matching key)"
                ) from None
        self._anonymous = AnonymousTLSCreator() if config.allow_anonymous else None
        self._unverified: Any = None
        self._creators: "OrderedDict[str, Any]" = OrderedDict()

    def for_host(self, host: str) -> VeNCryptTLS:
        """
        The TLS settings for a connection to C{host} (the host name or
        address dialled; the certificate must name it unless C{server_name}
        is configured, or verification is off).
        """
        return VeNCryptTLS(creator=self._creator(self.config.server_name or host), anonymous=self._anonymous)

    def _creator(self, name: str) -> Any:
        if not self.config.verify:
            if self._unverified is None:
                extra: Dict[str, Any] = {}
                if self._client is not None:
                    extra = {"privateKey": self._client.privateKey.original, "certificate": self._client.original}
                self._unverified = CertificateOptions(verify=False, **extra)
            return self._unverified
        creator = self._creators.get(name)
        if creator is None:
            creator = optionsForClientTLS(name, trustRoot=self._trust, clientCertificate=self._client)
            self._creators[name] = creator
            while len(self._creators) > self.CACHE_SIZE:
                self._creators.popitem(last=False)
        else:
            self._creators.move_to_end(name)
        return creator


def vnc_tls_by_uri(hypervisors: Iterable[HypervisorConfig]) -> Dict[str, VncTLS]:
    """
    The loaded VeNCrypt settings of every hypervisor that has a
    C{vnc_tls} section, by hypervisor URI (what L{VMConsoles.hypervisor}
    holds).

    @raise ConfigError: when a certificate or key file is unusable.
    """
    found: Dict[str, VncTLS] = {}
    for i, hypervisor in enumerate(hypervisors):
        if hypervisor.vnc_tls is not None:
            found[hypervisor.uri] = VncTLS(hypervisor.vnc_tls, f"hypervisors[{i}].vnc_tls")
    return found
