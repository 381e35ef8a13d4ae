"""
Pure request helpers shared by the HTTP API and the console WebSocket's
opening handshake: the client's address behind trusted proxies, the Origin
check, whether a request came over TLS, and the VM of a console path.
"""

import functools
import ipaddress
from typing import Any, Iterable, List, Optional, Sequence, Tuple
from urllib.parse import unquote, urlsplit

from twisted.internet.interfaces import ISSLTransport
from twisted.logger import Logger

from vaporproxy.vm.hosts import parse_address

__all__ = ["client_ip_from", "origin_allowed", "request_secure", "transport_is_tls", "vm_ref_from_path"]

log = Logger(namespace="vaporproxy.bridge")

#: The WebSocket path of a console: C{.../virtualmachines/{id}/console/ws}.
_PATH_PREFIX = "/api/v1/virtualization/virtualmachines/"
_PATH_SUFFIX = "/console/ws"


#: L{parse_address}, memoised (peer addresses and X-Forwarded-For entries
#: repeat from one request to the next).
_parse_ip = functools.lru_cache(maxsize=1024)(parse_address)


@functools.lru_cache(maxsize=1024)
def _address_text(host: str) -> str:
    """
    C{host} as an address written normally (C{str} of L{parse_address}),
    or C{host} itself when it is not one; memoised like L{_parse_ip}
    (C{str} of an address object costs more than the lookup).
    """
    address = _parse_ip(host)
    return str(address) if address is not None else host


def _networks(entries: Iterable[str]) -> List[ipaddress._BaseNetwork]:
    if isinstance(entries, tuple):
        return list(_networks_of(entries))
    return list(_networks_of(tuple(entries)))


@functools.lru_cache(maxsize=16)
def _networks_of(entries: Tuple[str, ...]) -> Tuple[ipaddress._BaseNetwork, ...]:
    """
    The trusted-proxy networks (pure; memoised: parsed once per
    configuration instead of once per request).
    """
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            log.warn("ignoring trusted proxy entry {entry!r}: not an address or CIDR", entry=entry)
    return tuple(networks)


def _trusted(address: Optional[ipaddress._BaseAddress], networks: Sequence[Any]) -> bool:
    if address is None:
        return False
    return any(address.version == n.version and address in n for n in networks)


def client_ip_from(peer_host: str, x_forwarded_for: Optional[str], trusted_proxies: Iterable[str]) -> str:
    """
    The client's address.

    X-Forwarded-For is believed only when the peer is a trusted proxy; then
    the answer is the rightmost address in it that is not itself a trusted
    proxy (the leftmost when all are trusted).  An unparsable entry stops
    the walk at the last trusted hop.

    @param peer_host: the address of the TCP peer.
    @param x_forwarded_for: the header's value, or C{None}.
    @param trusted_proxies: addresses or CIDRs whose headers are believed.
    """
    networks = _networks(trusted_proxies)
    peer = _parse_ip(peer_host)
    if not x_forwarded_for or not _trusted(peer, networks):
        return _address_text(peer_host)
    answer = str(peer)
    for entry in reversed(x_forwarded_for.split(",")):
        address = _parse_ip(entry)
        if address is None:
            return answer
        answer = str(address)
        if not _trusted(address, networks):
            return answer
    return answer


def _default_port(scheme: str) -> Optional[int]:
    return {"http": 80, "ws": 80, "https": 443, "wss": 443}.get(scheme)


def _normal_origin(origin: str) -> Optional[str]:
    """
    C{scheme://host[:port]} in lower case, default ports removed, or
    C{None} when C{origin} is not a URL origin.
    """
    try:
        parts = urlsplit(origin.strip().lower())
        port = parts.port
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname:
        return None
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    if port is not None and port != _default_port(parts.scheme):
        return f"{parts.scheme}://{host}:{port}"
    return f"{parts.scheme}://{host}"


def _host_netloc(scheme: str, host_header: str) -> Optional[str]:
    """
    The Host header as C{host[:port]}, lower case, default port removed.
    """
    try:
        parts = urlsplit(f"{scheme}://{host_header.strip().lower()}")
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    if port is not None and port != _default_port(scheme):
        return f"{host}:{port}"
    return host


#: The request scheme an Origin's scheme must go with (same-origin check).
_SCHEME_SECURE = {"http": False, "ws": False, "https": True, "wss": True}


def origin_allowed(
    origin: Optional[str], host_header: Optional[str], allowed: Sequence[str], *, secure: bool
) -> bool:
    """
    Whether a WebSocket with this Origin header may open.

    No Origin header (a non-browser client): allowed.  An allow-list: the
    origin must be on it (the configuration has no wildcard: it refuses
    C{"*"}, which matches no origin here).  An empty list: the
    origin must name the same scheme, host and port as the request: its
    scheme C{https} or C{wss} when the request came over TLS, C{http} or
    C{ws} when not, its host and port those of the Host header.

    @param secure: whether the request came over TLS (L{request_secure}).
    """
    if origin is None:
        return True
    if allowed:
        normal = _normal_origin(origin)
        return normal is not None and normal in {_normal_origin(a) for a in allowed}
    normal = _normal_origin(origin)
    if normal is None or not host_header:
        return False
    scheme, _, netloc = normal.partition("://")
    if _SCHEME_SECURE.get(scheme) is not secure:
        return False
    return netloc == _host_netloc(scheme, host_header)


def transport_is_tls(transport: Any) -> bool:
    """
    Whether C{transport}, or a transport under it (through protocol
    wrappers such as the PROXY-header one), is TLS.
    """
    seen = 0
    while transport is not None and seen < 8:
        if ISSLTransport.providedBy(transport):
            return True
        transport = getattr(transport, "transport", None)
        seen += 1
    return False


def request_secure(
    transport: Any, peer_host: str, x_forwarded_proto: Optional[str], trusted_proxies: Iterable[str]
) -> bool:
    """
    Whether the client's request came over TLS.

    From a trusted proxy that sends X-Forwarded-Proto, the header decides:
    secure only when every entry in it is C{https} (a hop in clear makes
    the request not secure).  Otherwise, whether the connection itself is
    TLS (L{transport_is_tls}).
    """
    if x_forwarded_proto is not None and _trusted(_parse_ip(peer_host), _networks(trusted_proxies)):
        entries = [e.strip().lower() for e in x_forwarded_proto.split(",")]
        return all(e == "https" for e in entries)
    return transport_is_tls(transport)


def vm_ref_from_path(path: str) -> Optional[str]:
    """
    The C{{id}} of C{/api/v1/virtualization/virtualmachines/{id}/console/ws}.
    """
    if not (path.startswith(_PATH_PREFIX) and path.endswith(_PATH_SUFFIX)):
        return None
    ref = unquote(path[len(_PATH_PREFIX) : -len(_PATH_SUFFIX)])
    if not ref or "/" in ref:
        return None
    return ref
