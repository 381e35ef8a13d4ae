"""
The C{allowed_hosts} policy: which console servers the proxy may dial.

Entries are host names, IPv4 or IPv6 addresses, or CIDRs, or absolute
directory paths (C{/var/lib/libvirt/qemu/}): UNIX-socket consoles are
allowed when their socket, symbolic links resolved, lies under one of
them.  A target is
resolved first; every address it resolves to is checked against the allowed
set (allowed names are themselves resolved, at check time, to addresses);
the first allowed address is the answer, and that address -- not the name --
is what the bridge dials, so a DNS answer cannot change between the check
and the connect.

Name resolutions (of targets and of allowed names) are cached for a few
seconds (L{DEFAULT_NAME_TTL}), and concurrent resolutions of one name share
one lookup: without that, every console check of an address literal
against an allowed I{name} ran C{getaddrinfo} on the reactor's thread pool.
A name whose addresses change is seen with its new addresses at most that
long after.  Empty answers (a name that does not resolve) are not cached.
"""

from __future__ import annotations

import ipaddress
import os
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IHostnameResolver, IReactorTime, IResolutionReceiver
from twisted.logger import Logger
from zope.interface import implementer

from vaporproxy.errors import ConsoleError, ErrorCode

log = Logger(namespace="vaporproxy.hosts")

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: The message a client sees for a refused host: it never names the host.
NOT_ALLOWED_MESSAGE = "Console host is not allowed"

#: The "host" of a console without a listener: libvirt hands over its
#: connection (virDomainOpenGraphicsFD), so there is no address to check.
LIBVIRT_HANDOFF = "libvirt:open-graphics"

#: Seconds a name resolution is reused.
DEFAULT_NAME_TTL = 5.0

#: Above this many cached names, expired ones are swept; then all dropped.
_NAME_CACHE_SWEEP_AT = 1024


class _MonotonicClock:
    """
    C{seconds()} from the monotonic clock: the default clock of
    L{HostPolicy} when none is injected.
    """

    @staticmethod
    def seconds() -> float:
        return time.monotonic()


def parse_address(text: str) -> Optional[IPAddress]:
    """
    An IP address literal (brackets around IPv6 allowed), normalised: an
    IPv4-mapped IPv6 address becomes its IPv4 address.  C{None} when
    C{text} is not an address.
    """
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return normalise(address)


def normalise(address: IPAddress) -> IPAddress:
    """
    C{::ffff:a.b.c.d} is C{a.b.c.d}; other addresses are unchanged.
    """
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_allowed(allowed: Iterable[str]) -> Tuple[Tuple[IPNetwork, ...], Tuple[str, ...]]:
    """
    Split C{allowed_hosts} entries into networks (addresses are /32 or /128
    networks) and lower-case host names.

    @raise ValueError: an entry that is neither an address, a CIDR nor a
        plausible host name.
    """
    networks: List[IPNetwork] = []
    names: List[str] = []
    for entry in allowed:
        if not isinstance(entry, str) or not entry.strip():
            raise ValueError(f"allowed_hosts: {entry!r} is not a host name, address or CIDR")
        text = entry.strip()
        if text.startswith("/"):
            continue  # a socket directory: see socket_directories
        address = parse_address(text)
        if address is not None:
            networks.append(ipaddress.ip_network(address))
            continue
        if "/" in text:
            try:
                network = ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise ValueError(
                    f"allowed_hosts: {entry!r} is not a valid CIDR"
                ) from None
            if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
                mapped = network.network_address.ipv4_mapped
                if mapped is not None:
                    network = ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}")
            networks.append(network)
            continue
        name = text.lower().rstrip(".")
        if not name or any(c.isspace() or c in "/\\@:" for c in name):
            raise ValueError(f"allowed_hosts: {entry!r} is not a host name, address or CIDR")
        names.append(name)
    return tuple(networks), tuple(names)


def socket_directories(allowed: Iterable[str]) -> Tuple[str, ...]:
    """
    The socket directories among C{allowed_hosts} entries (absolute paths),
    symbolic links resolved, each ending with C{/}.
    """
    found = []
    for entry in allowed:
        if isinstance(entry, str) and entry.strip().startswith("/"):
            found.append(os.path.realpath(entry.strip()).rstrip("/") + "/")
    return tuple(found)


def check_socket(path: str, directories: Sequence[str]) -> str:
    """
    The path to dial for UNIX socket C{path}: itself, symbolic links
    resolved, when that lies under one of C{directories}.

    @raise ConsoleError: UNAUTHORIZED (403) otherwise.
    """
    real = os.path.realpath(path)
    if any(real.startswith(directory) for directory in directories):
        return real
    log.warn("console socket {path} is not under an allowed_hosts directory", path=path)
    raise _not_allowed()


@implementer(IResolutionReceiver)
class _Collector:
    """
    Collects the addresses of one resolution into a Deferred.
    """

    def __init__(self) -> None:
        self.addresses: List[IPAddress] = []
        self.deferred: Deferred = Deferred()

    def resolutionBegan(self, resolutionInProgress: Any) -> None:
        pass

    def addressResolved(self, address: Any) -> None:
        parsed = parse_address(getattr(address, "host", ""))
        if parsed is not None and parsed not in self.addresses:
            self.addresses.append(parsed)

    def resolutionComplete(self) -> None:
        self.deferred.callback(self.addresses)


class HostPolicy:
    """
    Checks console hosts against C{allowed_hosts} and answers the address
    to dial.

    @param allowed: the C{allowed_hosts} entries.
    @param resolver: an L{IHostnameResolver}, normally C{reactor.nameResolver}.
    @param clock: the clock of the name cache (normally the reactor); the
        monotonic clock when not given.
    @param name_ttl: seconds a name resolution is reused; 0 turns the
        cache off.
    """

    def __init__(
        self,
        allowed: Sequence[str],
        resolver: IHostnameResolver,
        clock: Optional[IReactorTime] = None,
        name_ttl: float = DEFAULT_NAME_TTL,
    ):
        self._resolver = resolver
        self._clock = clock if clock is not None else _MonotonicClock()
        self._name_ttl = float(name_ttl)
        self._networks: Tuple[IPNetwork, ...] = ()
        self._names: Tuple[str, ...] = ()
        #: name -> (expiry, addresses)
        self._cache: Dict[str, Tuple[float, Tuple[IPAddress, ...]]] = {}
        #: name -> Deferreds waiting for the lookup in flight
        self._pending: Dict[str, List[Deferred]] = {}
        #: host text -> the address to dial, for address literals found in
        #: the allowed networks (the check is pure; this skips re-parsing).
        self._allowed_literals: Dict[str, str] = {}
        self.set_allowed(allowed)

    def set_allowed(self, allowed: Sequence[str]) -> None:
        """
        Replace the allowed entries (SIGHUP reload).  A bad entry raises
        C{ValueError} and leaves the old policy in force.  Cached name
        resolutions are dropped.
        """
        self._networks, self._names = parse_allowed(allowed)
        self._socket_dirs = socket_directories(allowed)
        self._cache.clear()
        self._allowed_literals = {}

    def _lookup(self, name: str) -> "Deferred[List[IPAddress]]":
        """
        The addresses of C{name}: from the cache, from the lookup of it
        already in flight, or from a new lookup.
        """
        if self._name_ttl > 0:
            hit = self._cache.get(name)
            if hit is not None and self._clock.seconds() < hit[0]:
                return succeed(list(hit[1]))
            waiting = self._pending.get(name)
            if waiting is not None:
                d: Deferred = Deferred()
                waiting.append(d)
                return d
        collector = _Collector()
        try:
            self._resolver.resolveHostName(collector, name, 0)
        except Exception as e:
            log.warn("cannot resolve {name}: {error}", name=name, error=str(e))
            return succeed([])
        if self._name_ttl <= 0 or collector.deferred.called:
            if collector.deferred.called:
                collector.deferred.addCallback(self._resolved, name, [])
            return collector.deferred
        waiting = self._pending[name] = []
        collector.deferred.addCallback(self._resolved, name, waiting)
        return collector.deferred

    def _resolved(self, addresses: List[IPAddress], name: str, waiting: List[Deferred]) -> List[IPAddress]:
        """
        Cache a lookup's answer (unless empty) and hand it to the callers
        that waited for it.
        """
        if self._pending.get(name) is waiting:
            del self._pending[name]
        if addresses and self._name_ttl > 0:
            if len(self._cache) >= _NAME_CACHE_SWEEP_AT:
                now = self._clock.seconds()
                for key in [k for k, (expires, _) in self._cache.items() if expires <= now]:
                    del self._cache[key]
                if len(self._cache) >= _NAME_CACHE_SWEEP_AT:
                    self._cache.clear()
            self._cache[name] = (self._clock.seconds() + self._name_ttl, tuple(addresses))
        for d in waiting:
            d.callback(list(addresses))
        return addresses

    def _in_networks(self, address: IPAddress) -> bool:
        return any(address in network for network in self._networks)

    def resolve(self, host: str) -> "Deferred[str]":
        """
        The checked address to dial for C{host} (an absolute path is a UNIX
        socket, checked against the allowed directories; L{LIBVIRT_HANDOFF}
        is answered as is).

        Fails with C{ConsoleError(UNAUTHORIZED)} when no address of C{host}
        is allowed, C{ConsoleError(CONNECTION_FAILED)} when C{host} does
        not resolve.
        """
        if host == LIBVIRT_HANDOFF:
            return succeed(host)
        if isinstance(host, str) and host.startswith("/"):
            try:
                return succeed(check_socket(host, self._socket_dirs))
            except ConsoleError as e:
                return fail(e)
        known = self._allowed_literals.get(host) if isinstance(host, str) else None
        if known is not None:
            return succeed(known)
        literal = parse_address(host) if isinstance(host, str) else None
        if literal is not None and any(literal in network for network in self._networks):
            # The common case (a console on an allowed address): no lookup,
            # and the answer is kept (bounded) for the next console.
            address = str(literal)
            if len(self._allowed_literals) >= _NAME_CACHE_SWEEP_AT:
                self._allowed_literals.clear()
            self._allowed_literals[host] = address
            return succeed(address)
        return Deferred.fromCoroutine(self._resolve(host))

    async def _resolve(self, host: str) -> str:
        networks, names = self._networks, self._names
        if not isinstance(host, str) or not host.strip():
            log.warn("refusing an empty console host")
            raise _not_allowed()
        literal = parse_address(host)
        if literal is not None:
            candidates = [literal]
            host_name = None
        else:
            host_name = host.strip().lower().rstrip(".")
            candidates = await self._lookup(host_name)
            if not candidates:
                log.warn("console host {host} does not resolve", host=host)
                raise ConsoleError(ErrorCode.CONNECTION_FAILED)
        for address in candidates:
            if any(address in network for network in networks):
                return str(address)
        if host_name is not None and host_name in names:
            # The very name is allowed: whatever it resolves to now is what
            # the name stands for.  Dial the address we resolved.
            return str(candidates[0])
        allowed_addresses: Set[IPAddress] = set()
        for name in names:
            allowed_addresses.update(await self._lookup(name))
        for address in candidates:
            if address in allowed_addresses:
                return str(address)
        log.warn(
            "console host {host} ({addresses}) is not in allowed_hosts",
            host=host,
            addresses=", ".join(str(a) for a in candidates),
        )
        raise _not_allowed()


def _not_allowed() -> ConsoleError:
    # 403: the caller is authenticated; the console server is what is refused.
    return ConsoleError(ErrorCode.UNAUTHORIZED, NOT_ALLOWED_MESSAGE, http_status=403)
