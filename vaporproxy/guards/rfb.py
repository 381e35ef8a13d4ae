"""
The VNC (RFB) protocol guard: the proxy does the RFB security handshake with
the VM itself and offers the browser security type None, so the console
password never leaves the server (DESIGN.md rule 9).

The guard is sans-IO (L{vaporproxy.guards.kit}): bytes go in
(L{RFBGuard.client_data}, L{RFBGuard.server_data}) with events
(L{RFBGuard.start}, L{RFBGuard.server_connected}, L{RFBGuard.server_lost}),
and typed outputs come out (L{SendToClient}, L{SendToServer}, L{StartTLS},
L{Established}, L{Failed}), returned and, when the guard has a sink,
delivered to it.  After L{Established} the caller relays raw bytes and
never calls the guard again.

With a L{VeNCryptTLS} the VM side speaks VeNCrypt
(L{vaporproxy.guards.vencrypt}): after L{StartTLS} the caller runs TLS on the
VM connection and C{server_data} gets plaintext; when the VM connection
closes during the handshake, C{server_lost(reason)} makes a failed TLS
handshake a L{Failed} with OpenSSL's reason.
"""

from __future__ import annotations

import re
import struct
from typing import Callable, Generator, List, Optional, Tuple

from cryptography.hazmat.primitives.ciphers import Cipher, modes

from vaporproxy.guards.kit import (
    AUTH_FAILED,
    Established,
    GuardFailure,
    Need,
    Output,
    SendToClient,
    SendToServer,
    StepReader,
    Steps,
    TwoSidedGuard,
    UpTo,
    client_failure,
    server_failure,
)
from vaporproxy.guards.vencrypt import (
    VENCRYPT_TLS_NONE,
    VENCRYPT_TLS_VNC,
    VENCRYPT_VNC_AUTH,
    VENCRYPT_X509_NONE,
    VENCRYPT_X509_VNC,
    AnonymousTLSCreator,
    VeNCryptTLS,
    VncTLS,
    describe_connection_lost,
    subtype_name,
    vencrypt_steps,
    vnc_tls_by_uri,
)

try:  # cryptography >= 43 moved TripleDES to the "decrepit" package.
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
except ImportError:  # pragma: no cover - older cryptography
    from cryptography.hazmat.primitives.ciphers.algorithms import TripleDES

#: Names that lived here before the split, still importable from here (the
#: bridge imports C{RFBGuard} and C{vnc_tls_by_uri} from this module).
__all__ = [
    "AUTH_FAILED",
    "GuardFailure",
    "StepReader",
    "Steps",
    "UpTo",
    "VENCRYPT_TLS_NONE",
    "VENCRYPT_TLS_VNC",
    "VENCRYPT_X509_NONE",
    "VENCRYPT_X509_VNC",
    "AnonymousTLSCreator",
    "VeNCryptTLS",
    "VncTLS",
    "describe_connection_lost",
    "subtype_name",
    "vnc_tls_by_uri",
    "RFBGuard",
    "parse_version",
    "effective_version",
    "peer_version",
    "version_bytes",
    "reverse_bits",
    "vnc_des_key",
    "vnc_auth_response",
    "RFB_VERSION_38",
    "SEC_INVALID",
    "SEC_NONE",
    "SEC_VNC_AUTH",
    "SEC_VENCRYPT",
    "MAX_CLIENT_BUFFER",
    "MAX_SERVER_BUFFER",
    "MAX_REASON_LENGTH",
]

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

# The outputs every handshake hands out, made once (they are frozen).
_GREETING = SendToClient(RFB_VERSION_38)
_OFFER_NONE_33 = SendToClient(struct.pack("!I", SEC_NONE))
_OFFER_NONE = SendToClient(bytes([1, SEC_NONE]))
_SECURITY_OK = SendToClient(struct.pack("!I", 0))
_CHOICE = {sec: SendToServer(bytes([sec])) for sec in (SEC_NONE, SEC_VNC_AUTH, SEC_VENCRYPT)}
_ESTABLISHED = Established()


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


# What the proxy answers a VM of each handshake version (3.3, 3.7, 3.8).
_VERSIONS = {minor: SendToServer(version_bytes(minor)) for minor in (3, 7, 8)}


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
    hands out L{Established}.

    With a L{VeNCryptTLS} the guard also speaks VeNCrypt (security type 19)
    to the VM: TLS with a verified X.509 certificate, then VNC
    authentication (X509Vnc) or none (X509None) inside it.  Without one a
    VM that only offers VeNCrypt is refused.

    @param sink: the legacy sink the outputs are also delivered to (the
        bridge: C{send_to_client}, C{send_to_server}, C{established},
        C{fail}, and C{start_tls(creator)} for VeNCrypt), or C{None}.
    @param password: the console password, or C{None} when there is none.
    @param tls: the TLS settings for this VM, or C{None} (no VeNCrypt).

    @ivar vencrypt_subtype: the VeNCrypt sub-type in use, or C{None}.
    """

    protocol_name = "VNC"

    def __init__(self, sink: Optional[object], password: Optional[str], tls: Optional[VeNCryptTLS] = None):
        self._password = password if password else None
        self._tls = tls
        self._started = False
        self._server_done = False
        self._tls_started = False
        self._tls_data = False
        self.client_version: Optional[int] = None
        self.server_version: Optional[int] = None
        self.security_type: Optional[int] = None
        self.vencrypt_subtype: Optional[int] = None
        super().__init__(sink, MAX_CLIENT_BUFFER, MAX_SERVER_BUFFER)

    # -- guard protocol ----------------------------------------------------

    def start(self) -> List[Output]:
        """
        The WebSocket is open and the token redeemed: greet the browser.
        """
        self._started = True
        return self._run(self._client.pump)

    def client_data(self, data: bytes) -> List[Output]:
        """
        Bytes from the browser.
        """
        return self._run(self._client.feed, data)

    def server_connected(self) -> List[Output]:
        """
        The TCP connection to the VM is up; the VM speaks first.
        """
        return self._run(self._server.pump)

    def server_data(self, data: bytes) -> List[Output]:
        """
        Bytes from the VM (plaintext once L{StartTLS} was handed out).
        """
        if self._tls_started and data:
            self._tls_data = True
        return self._run(self._server.feed, data)

    def server_lost(self, reason: object = None) -> List[Output]:
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

        return self._run(lost)

    # -- internals ---------------------------------------------------------

    def _client_steps(self) -> Steps:
        emit = self._out.emit
        yield lambda: self._started
        emit(_GREETING)
        version = peer_version((yield 12), "client", client_failure)
        self.client_version = version
        if version == 3:
            emit(_OFFER_NONE_33)
        else:
            emit(_OFFER_NONE)
            choice = (yield 1)[0]
            if choice != SEC_NONE:
                raise client_failure("client chose security type %d" % (choice,))
            if version == 8:
                emit(_SECURITY_OK)
        client_init = yield 1
        yield lambda: self._server_done
        emit(SendToServer(client_init + self._client.take_rest()))
        leftover = self._server.take_rest()
        if leftover:
            emit(SendToClient(leftover))
        emit(_ESTABLISHED)

    def _read_reason(self) -> Generator[Need, Optional[bytes], str]:
        length = _u32((yield 4))
        if length > MAX_REASON_LENGTH:
            raise server_failure("server reason string of %d bytes" % (length,))
        reason = yield length
        return reason.decode("utf-8", "replace").rstrip("\0")

    def _server_steps(self) -> Steps:
        emit = self._out.emit
        version = peer_version((yield 12), "server", server_failure)
        self.server_version = version
        emit(_VERSIONS[version])

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
            emit(_CHOICE[chosen])
        self.security_type = chosen

        vnc_auth = chosen == SEC_VNC_AUTH
        if chosen == SEC_VENCRYPT:
            assert self._tls is not None
            subtype = yield from vencrypt_steps(emit, self._server, self._tls, self._password)
            self.vencrypt_subtype = subtype
            self._tls_started = True
            vnc_auth = subtype in VENCRYPT_VNC_AUTH
        if vnc_auth:
            challenge = yield 16
            assert self._password is not None
            emit(SendToServer(vnc_auth_response(self._password, challenge)))
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
