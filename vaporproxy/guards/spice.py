"""
The SPICE protocol guard: channel admission by session id (one token, one
console: DESIGN.md rule 8) and ticket injection, so the console password
never leaves the server (rule 9).  Sans-IO (L{vaporproxy.guards.kit}): bytes
and events in, typed outputs out.

One guard sits in front of each SPICE channel WebSocket.  It reads the
browser's link message and decides whether the channel may join:

 - the token's first use must open the MAIN channel with connection id 0;
 - every later channel must not be MAIN and must carry, as its connection
   id, the session id the VM gave that main channel.

It then forwards the link message to the VM, passes the VM's link reply
(with its RSA key) back, throws the browser's encrypted ticket away and
sends the real password encrypted to the VM's key instead.  On the main
channel it reads the VM's messages up to SPICE_MSG_MAIN_INIT to learn the
session id (L{SpiceSessionAssigned}).

Wire layouts (spice-protocol C{spice/protocol.h}, all little-endian)::

    SpiceLinkHeader  magic "REDQ", u32 major (2), u32 minor, u32 size
    SpiceLinkMess    u32 connection_id, u8 channel_type, u8 channel_id,
                     u32 num_common_caps, u32 num_channel_caps,
                     u32 caps_offset, caps...
    SpiceLinkReply   u32 error, u8 pub_key[162], u32 num_common_caps,
                     u32 num_channel_caps, u32 caps_offset, caps...
    (client)         [u32 auth_mechanism], u8 encrypted_ticket[128]
    (server)         u32 link result
    SpiceMiniDataHeader  u16 type, u32 size
    SpiceDataHeader      u64 serial, u16 type, u32 size, u32 sub_list
"""

from __future__ import annotations

import struct
from typing import Callable, List, Optional, Tuple

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.guards.kit import (
    AUTH_FAILED,
    Admit,
    Established,
    GuardFailure,
    Output,
    SendToClient,
    SendToServer,
    SpiceSessionAssigned,
    Steps,
    TwoSidedGuard,
    UpTo,
    client_failure,
    server_failure,
)

SPICE_MAGIC = b"REDQ"
SPICE_VERSION_MAJOR = 2
LINK_HEADER = struct.Struct("<4sIII")
LINK_MESS = struct.Struct("<IBBIII")
LINK_REPLY = struct.Struct("<I162sIII")
MINI_HEADER = struct.Struct("<HI")
FULL_HEADER = struct.Struct("<QHII")

SPICE_CHANNEL_MAIN = 1
SPICE_TICKET_PUBKEY_BYTES = 162

SPICE_COMMON_CAP_PROTOCOL_AUTH_SELECTION = 0
SPICE_COMMON_CAP_AUTH_SPICE = 1
SPICE_COMMON_CAP_AUTH_SASL = 2
SPICE_COMMON_CAP_MINI_HEADER = 3

SPICE_LINK_ERR_OK = 0
SPICE_MSG_MAIN_INIT = 103

#: Largest link message / link reply body accepted.
MAX_LINK_SIZE = 4096
#: Largest number of capability words in a link message or reply.
MAX_CAPS = 64
#: Unconsumed bytes a side may have buffered before the guard gives up.
MAX_CLIENT_BUFFER = 64 * 1024
MAX_SERVER_BUFFER = 64 * 1024
#: Server bytes the main channel may send before SPICE_MSG_MAIN_INIT.
MAX_BYTES_BEFORE_INIT = 1024 * 1024

_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)


def has_cap(caps: List[int], cap: int) -> bool:
    """
    Whether the capability bit C{cap} is set in the words C{caps}.
    """
    word = cap // 32
    return word < len(caps) and bool(caps[word] & (1 << (cap % 32)))


def _parse_caps(
    body: bytes, fixed: int, common: int, channel: int, offset: int, fail: Callable[[str], GuardFailure]
) -> Tuple[List[int], List[int]]:
    """
    The common and channel capability words of a link message or reply
    whose capabilities start C{offset} bytes into C{body}.
    """
    if common > MAX_CAPS or channel > MAX_CAPS:
        raise fail("too many capability words")
    if offset < fixed or offset + 4 * (common + channel) > len(body):
        raise fail("capabilities outside the message")
    words = struct.unpack_from("<%dI" % (common + channel,), body, offset)
    return list(words[:common]), list(words[common:])


def encrypt_ticket(public_key_der: bytes, password: Optional[str]) -> bytes:
    """
    Encrypt a SPICE ticket as spice clients do: the password and a NUL,
    RSA-OAEP with SHA-1, to the server's SubjectPublicKeyInfo C{public_key_der}.

    @raise ValueError: the key is not an RSA key, or the password is too long.
    """
    key = serialization.load_der_public_key(public_key_der)
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("not an RSA key")
    plain = (password or "").encode("utf-8") + b"\0"
    return key.encrypt(plain, _OAEP)


class SpiceGuard(TwoSidedGuard):
    """
    The link handshake of one SPICE channel, with admission and ticket
    injection.

    @param sink: the legacy sink the outputs are also delivered to (the
        bridge: C{send_to_client}, C{send_to_server}, C{admit},
        C{spice_session}, C{established}, C{fail}), or C{None}.
    @param password: the console password, or C{None} for none.
    @param expected_session_id: C{None} on the token's first use (this must
        be the main channel); otherwise the session id of the live main
        channel that later channels must name.
    """

    protocol_name = "SPICE"

    def __init__(self, sink: Optional[object], password: Optional[str], expected_session_id: Optional[int]):
        self._password = password
        self._expected = expected_session_id
        self._connected = False
        self._link: Optional[bytes] = None
        self._reply_read = False
        self._ticket_sent = False
        self._client_caps: List[int] = []
        self._server_caps: List[int] = []
        self._server_key: bytes = b""
        self._ticket_size = 0
        self.is_main: Optional[bool] = None
        self.channel_type: Optional[int] = None
        self.session_id: Optional[int] = None
        super().__init__(sink, MAX_CLIENT_BUFFER, MAX_SERVER_BUFFER)

    # -- guard protocol ----------------------------------------------------

    def start(self) -> List[Output]:
        """
        The WebSocket is open and the token redeemed; the browser speaks
        first, so there is nothing to do.
        """
        return []

    def client_data(self, data: bytes) -> List[Output]:
        """
        Bytes from the browser.
        """
        if self._client.done and self._ticket_sent:
            # The link handshake of the client is over: relay at once.
            out = self._out
            if out.failed or out.finished:
                return []
            out.emit(SendToServer(data))
            return out.hand_out()
        return self._run(self._client.feed, data)

    def server_connected(self) -> List[Output]:
        """
        The TCP connection to the VM is up: send it the link message.
        """
        self._connected = True
        return self._run(self._server.pump)

    def server_data(self, data: bytes) -> List[Output]:
        """
        Bytes from the VM.
        """
        return self._run(self._server.feed, data)

    # -- internals ---------------------------------------------------------

    def _admit(self, connection_id: int, channel_type: int) -> None:
        is_main = channel_type == SPICE_CHANNEL_MAIN
        if self._expected is None:
            if is_main and connection_id == 0:
                return
            raise GuardFailure(
                ConsoleError(ErrorCode.TOKEN_ALREADY_USED),
                "first use of a token must open the main channel (got type %d)" % (channel_type,),
            )
        if is_main:
            raise GuardFailure(
                ConsoleError(ErrorCode.TOKEN_ALREADY_USED), "second main channel for one token"
            )
        if connection_id != self._expected:
            raise GuardFailure(
                ConsoleError(ErrorCode.TOKEN_ALREADY_USED),
                "channel names another session than the token's",
            )

    def _client_steps(self) -> Steps:
        emit = self._out.emit
        header = yield LINK_HEADER.size
        magic, major, _minor, size = LINK_HEADER.unpack(header)
        if magic != SPICE_MAGIC:
            raise client_failure("not a SPICE link message")
        if major != SPICE_VERSION_MAJOR:
            raise client_failure("SPICE protocol version %d" % (major,))
        if not LINK_MESS.size <= size <= MAX_LINK_SIZE:
            raise client_failure("SPICE link message of %d bytes" % (size,))
        body = yield size
        connection_id, channel_type, _channel_id, ncommon, nchannel, offset = LINK_MESS.unpack_from(body)
        self._client_caps, _ = _parse_caps(body, LINK_MESS.size, ncommon, nchannel, offset, client_failure)
        self._admit(connection_id, channel_type)
        self.channel_type = channel_type
        self.is_main = channel_type == SPICE_CHANNEL_MAIN
        self._link = header + body
        emit(Admit(self.is_main))

        yield lambda: self._reply_read
        if self._auth_selection():
            mechanism = struct.unpack("<I", (yield 4))[0]
            if mechanism != SPICE_COMMON_CAP_AUTH_SPICE:
                raise client_failure("client asked for auth mechanism %d" % (mechanism,))
        yield self._ticket_size  # the browser's ticket: never sent on
        try:
            ticket = encrypt_ticket(self._server_key, self._password)
        except ValueError as e:
            raise server_failure("cannot encrypt the ticket: %s" % (e,))
        if self._auth_selection():
            ticket = struct.pack("<I", SPICE_COMMON_CAP_AUTH_SPICE) + ticket
        rest = self._client.take_rest()
        self._ticket_sent = True
        emit(SendToServer(ticket + rest))

    def _negotiated(self, cap: int) -> bool:
        """Whether both the browser and the VM announced common cap C{cap}."""
        return has_cap(self._client_caps, cap) and has_cap(self._server_caps, cap)

    def _auth_selection(self) -> bool:
        return self._negotiated(SPICE_COMMON_CAP_PROTOCOL_AUTH_SELECTION)

    def _mini_header(self) -> bool:
        return self._negotiated(SPICE_COMMON_CAP_MINI_HEADER)

    def _server_steps(self) -> Steps:
        emit = self._out.emit
        yield lambda: self._connected and self._link is not None
        assert self._link is not None
        emit(SendToServer(self._link))

        header = yield LINK_HEADER.size
        magic, major, _minor, size = LINK_HEADER.unpack(header)
        if magic != SPICE_MAGIC:
            raise server_failure("server is not speaking SPICE")
        if major != SPICE_VERSION_MAJOR:
            raise server_failure("server SPICE protocol version %d" % (major,))
        if not 4 <= size <= MAX_LINK_SIZE:
            raise server_failure("SPICE link reply of %d bytes" % (size,))
        body = yield size
        error = struct.unpack_from("<I", body)[0]
        if error != SPICE_LINK_ERR_OK:
            raise server_failure("server refused the link: error %d" % (error,))
        if size < LINK_REPLY.size:
            raise server_failure("short SPICE link reply")
        _error, key, ncommon, nchannel, offset = LINK_REPLY.unpack_from(body)
        self._server_caps, _ = _parse_caps(body, LINK_REPLY.size, ncommon, nchannel, offset, server_failure)
        try:
            public_key = serialization.load_der_public_key(key)
        except ValueError:
            raise server_failure("server sent a malformed public key")
        if not isinstance(public_key, rsa.RSAPublicKey):
            raise server_failure("server key is not RSA")
        self._server_key = key
        self._ticket_size = public_key.key_size // 8
        emit(SendToClient(header + body))
        self._reply_read = True

        # The link result answers the ticket: read it only once that is sent.
        yield lambda: self._ticket_sent
        result_bytes = yield 4
        result = struct.unpack("<I", result_bytes)[0]
        if result != SPICE_LINK_ERR_OK:
            raise server_failure("%s: link result %d" % (AUTH_FAILED, result))
        emit(SendToClient(result_bytes))

        if self.is_main:
            yield from self._read_until_main_init()
        rest = self._server.take_rest()
        if rest:
            emit(SendToClient(rest))
        emit(Established())

    def _read_until_main_init(self) -> Steps:
        """
        Relay the main channel's messages until SPICE_MSG_MAIN_INIT and
        report its session id.
        """
        emit = self._out.emit
        mini = self._mini_header()
        header_struct = MINI_HEADER if mini else FULL_HEADER
        seen = 0
        while True:
            header = yield header_struct.size
            if mini:
                msg_type, msg_size = MINI_HEADER.unpack(header)
            else:
                _serial, msg_type, msg_size, _sub_list = FULL_HEADER.unpack(header)
            if msg_type == SPICE_MSG_MAIN_INIT:
                if msg_size < 4:
                    raise server_failure("short SPICE_MSG_MAIN_INIT")
                first = yield 4
                self.session_id = struct.unpack("<I", first)[0]
                emit(SendToClient(header + first))
                emit(SpiceSessionAssigned(self.session_id))
                return
            seen += header_struct.size + msg_size
            if seen > MAX_BYTES_BEFORE_INIT:
                raise server_failure("no SPICE_MSG_MAIN_INIT from the server")
            emit(SendToClient(header))
            # Relay the body as it comes, without holding it.
            remaining = msg_size
            while remaining:
                chunk = yield UpTo(remaining)
                remaining -= len(chunk)
                emit(SendToClient(chunk))
