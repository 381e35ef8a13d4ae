"""
Byte scripts of the RFB and VeNCrypt handshakes, shared by the guard tests
and the bridge's VeNCrypt tests.
"""

from __future__ import annotations

import struct
from typing import Sequence

from vaporproxy.guards.rfb import vnc_auth_response
from vaporproxy.guards.vencrypt import VeNCryptTLS

PASSWORD = "s3cr3t-pw"
CHALLENGE = bytes(range(16))


def version(minor: int) -> bytes:
    return b"RFB 003.%03d\n" % (minor,)


def u32(n: int) -> bytes:
    return struct.pack("!I", n)


def server_script(minor: int, offered: Sequence[int], chosen: int, result: int = 0) -> bytes:
    """
    Everything an RFB server of version 3.C{minor} sends up to the end of
    security, when the client picks C{chosen}.
    """
    out = version(minor)
    if minor >= 7:
        out += bytes([len(offered)]) + bytes(offered)
    else:
        out += u32(offered[0])
    if chosen == 2:
        out += CHALLENGE
    if chosen == 2 or minor >= 8:
        out += u32(result)
    return out


def client_script(minor: int) -> bytes:
    """
    Everything an RFB client of version 3.C{minor} sends the proxy, through
    ClientInit.
    """
    out = version(minor)
    if minor >= 7:
        out += b"\x01"
    return out + b"\x01"


def expected_to_client(minor: int) -> bytes:
    if minor == 8:
        return version(8) + b"\x01\x01" + u32(0)
    if minor == 7:
        return version(8) + b"\x01\x01"
    return version(8) + u32(1)


def expected_to_server(server_minor: int, client_init: bytes = b"\x01") -> bytes:
    out = version(server_minor)
    if server_minor >= 7:
        out += b"\x02"
    return out + vnc_auth_response(PASSWORD, CHALLENGE) + client_init


#: Stand-ins for the TLS connection creators the guard hands to start_tls.
X509_CREATOR = object()
ANON_CREATOR = object()


def vencrypt_tls(anonymous: bool = False) -> VeNCryptTLS:
    return VeNCryptTLS(creator=X509_CREATOR, anonymous=ANON_CREATOR if anonymous else None)


def vencrypt_before_tls(subtypes: Sequence[int], minor: int = 8, vencrypt: bytes = b"\x00\x02") -> bytes:
    """
    What a VeNCrypt VM sends in the clear: RFB version, security types
    (only 19), VeNCrypt version, version ack, sub-types, sub-type ack.
    """
    count = len(subtypes)
    return (
        version(minor)
        + b"\x01\x13"
        + vencrypt
        + b"\x00"
        + bytes([count])
        + struct.pack("!%dI" % (count,), *subtypes)
        + b"\x01"
    )
