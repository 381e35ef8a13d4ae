"""
VeNCrypt (RFB security type 19): TLS on the VM connection itself, with the
VM's X.509 certificate checked, and VNC authentication or none inside it.

L{vencrypt_steps} is the negotiation the RFB guard runs once it has chosen
security type 19: version 0.2, the sub-type choice (L{choose_subtype}), the
VM's acceptance, then L{StartTLS}; from then on the guard gets plaintext.
The X.509 settings of a hypervisor are loaded once into a
L{vaporproxy.tls.VncTLS} (see L{vnc_tls_by_uri}); C{VncTLS.for_host} gives
the L{VeNCryptTLS} the guard takes for one connection.
"""

from __future__ import annotations

import struct
from typing import Any, Callable, Dict, Generator, Iterable, List, Optional, Tuple

from twisted.logger import Logger

from vaporproxy.config import HypervisorConfig
from vaporproxy.guards.kit import Need, Output, SendToServer, StartTLS, StepReader, server_failure

# The TLS settings are a value the guard takes (and the SPICE dialler too):
# vaporproxy.tls; their names stay importable from here.
from vaporproxy.tls import (  # noqa: F401
    AnonymousTLSCreator,
    VeNCryptTLS,
    VncTLS,
    describe_connection_lost,
    tls_by_uri,
)

# The namespace the guards' log lines have always had.
log = Logger(namespace="vaporproxy.rfb")

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
VENCRYPT_VNC_AUTH = (VENCRYPT_X509_VNC, VENCRYPT_TLS_VNC)
#: Anonymous-TLS sub-types (unauthenticated server, only with allow_anonymous).
VENCRYPT_ANONYMOUS = (VENCRYPT_TLS_VNC, VENCRYPT_TLS_NONE)

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


# ---------------------------------------------------------------------------
# The negotiation
# ---------------------------------------------------------------------------


def choose_subtype(offered: List[int], tls: VeNCryptTLS, password: Optional[str]) -> Tuple[int, Any]:
    """
    Pick the VeNCrypt sub-type and the TLS connection creator for it:
    X509Vnc when a password is known, else X509None; the anonymous TLS
    ones only when the configuration allows them.

    @raise GuardFailure: (CONNECTION_FAILED) when none of C{offered} fits.
    """
    wanted: List[int] = []
    if password is not None:
        wanted.append(VENCRYPT_X509_VNC)
    wanted.append(VENCRYPT_X509_NONE)
    if tls.anonymous is not None:
        if password is not None:
            wanted.append(VENCRYPT_TLS_VNC)
        wanted.append(VENCRYPT_TLS_NONE)
    for subtype in wanted:
        if subtype in offered:
            creator = tls.anonymous if subtype in VENCRYPT_ANONYMOUS else tls.creator
            return subtype, creator
    names = ", ".join(subtype_name(t) for t in offered)
    if password is None and any(t in VENCRYPT_VNC_AUTH for t in offered):
        raise server_failure(
            "console wants VNC authentication inside VeNCrypt but no password is known (offered: %s)" % (names,)
        )
    if tls.anonymous is None and any(t in VENCRYPT_ANONYMOUS for t in offered):
        raise server_failure("VM offers only anonymous TLS (unauthenticated; allow_anonymous is off): %s" % (names,))
    raise server_failure("no acceptable VeNCrypt sub-type among: %s" % (names,))


def vencrypt_steps(
    emit: Callable[[Output], None], server: StepReader, tls: VeNCryptTLS, password: Optional[str]
) -> Generator[Need, Optional[bytes], int]:
    """
    The VeNCrypt negotiation with the VM up to the TLS handshake, run with
    C{yield from} inside the RFB guard's VM-side steps (C{server} is that
    side's reader): version 0.2, sub-type choice, the VM's acceptance, then
    L{StartTLS}.

    @return: the sub-type in use.
    """
    major, minor = yield 2
    if (major, minor) < (0, 2):
        raise server_failure("VM speaks VeNCrypt %d.%d (0.2 needed)" % (major, minor))
    emit(SendToServer(b"\x00\x02"))
    if (yield 1)[0] != 0:
        raise server_failure("VM refused VeNCrypt version 0.2")
    count = (yield 1)[0]
    if count == 0:
        raise server_failure("VM offered no VeNCrypt sub-type")
    raw = yield 4 * count
    offered = list(struct.unpack("!%dI" % (count,), raw))
    subtype, creator = choose_subtype(offered, tls, password)
    emit(SendToServer(struct.pack("!I", subtype)))
    ack = (yield 1)[0]
    if ack != 1:
        raise server_failure("VM refused VeNCrypt sub-type %s (answer %d)" % (subtype_name(subtype), ack))
    if server.buffered():
        # The client speaks first in TLS; anything here is not the VM's.
        raise server_failure("VM sent data before the TLS handshake")
    log.debug("VeNCrypt: {subtype}, starting TLS", subtype=subtype_name(subtype))
    emit(StartTLS(creator))
    return subtype


def vnc_tls_by_uri(hypervisors: Iterable[HypervisorConfig]) -> Dict[str, VncTLS]:
    """The loaded VeNCrypt settings (C{vnc_tls}) by hypervisor URI (L{tls_by_uri})."""
    return tls_by_uri(hypervisors, "vnc_tls")
