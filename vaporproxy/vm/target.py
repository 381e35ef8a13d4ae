"""
Which console a client gets and where to dial it: grant -> VM -> graphics
-> address.  Pure; the address is then checked by the host policy
(L{vaporproxy.vm.hosts}).
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, NoReturn, Optional
from urllib.parse import urlsplit

from twisted.logger import Logger

from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.interfaces import CONSOLE_TYPES, Graphics, VMConsoles
from vaporproxy.vm.hosts import LIBVIRT_HANDOFF

log = Logger(namespace="vaporproxy.consoles")

# ---------------------------------------------------------------------------
# Choosing a console and where to dial it
# ---------------------------------------------------------------------------


def select_console(
    vm: VMConsoles, console_type: Optional[str], display: Optional[int], now: Optional[float] = None
) -> Graphics:
    """
    The graphics device a client asked for.

    @param console_type: C{"vnc"}, C{"spice"} or C{None} for the first
        device in document order.
    @param display: index among devices of that type, or C{None} for the
        first.
    @raise ConsoleError: BAD_REQUEST for an unknown type or a negative
        display; NO_CONSOLE_AVAILABLE (the message says why) when the VM is
        not running, has no such device, or the device cannot be reached
        from here (see L{check_reachable}).
    """
    if console_type is not None and console_type not in CONSOLE_TYPES:
        raise ConsoleError(ErrorCode.BAD_REQUEST, "Console type must be 'vnc' or 'spice'")
    if display is not None and (isinstance(display, bool) or not isinstance(display, int)):
        raise ConsoleError(ErrorCode.BAD_REQUEST, "Display must be a non-negative integer")
    if display is not None and display < 0:
        raise ConsoleError(ErrorCode.BAD_REQUEST, "Display must be a non-negative integer")
    if not vm.running:
        raise ConsoleError(ErrorCode.NO_CONSOLE_AVAILABLE, "The virtual machine is not running")
    if not vm.graphics:
        raise ConsoleError(
            ErrorCode.NO_CONSOLE_AVAILABLE, "The virtual machine has no graphical console"
        )
    candidates = [
        g for g in vm.graphics if console_type is None or g.type == console_type
    ]
    if not candidates:
        raise ConsoleError(
            ErrorCode.NO_CONSOLE_AVAILABLE,
            f"The virtual machine has no {console_type.upper()} console",
        )
    if display is not None:
        candidates = [g for g in candidates if g.index == display]
        if not candidates:
            what = f"{console_type.upper()} display" if console_type else "display"
            raise ConsoleError(
                ErrorCode.NO_CONSOLE_AVAILABLE,
                f"The virtual machine has no {what} {display}",
            )
    chosen = candidates[0]
    check_reachable(vm, chosen, now)
    return chosen


def check_reachable(vm: VMConsoles, g: Graphics, now: Optional[float] = None) -> None:
    """
    Refuse a console this proxy cannot open, saying why.

    @param now: POSIX time for C{passwdValidTo} (the wall clock when
        C{None}).
    @raise ConsoleError: NO_CONSOLE_AVAILABLE.
    """
    if g.password_valid_to is not None:
        if (time.time() if now is None else now) >= g.password_valid_to:
            _unavailable("The console password has expired (passwdValidTo)")
    if handed_over(vm, g):
        if not vm.local:
            _unavailable("The console has no listener and its host is not this proxy's (local)")
        return
    if g.listen_type == "socket":
        if not vm.local:
            _unavailable("The console listens on a UNIX socket of another host")
        if not g.socket:
            _unavailable("The console's UNIX socket is not known yet")
        return
    if g.type == "spice" and needs_tls(g):
        if g.tls_port is None:
            _unavailable("The console has no TLS port (not assigned yet)")
        if not vm.spice_tls:
            _unavailable("The console accepts only TLS and no spice_tls is configured for its host")
        return
    if g.port is None:
        _unavailable("The console has no TCP port (not assigned yet, or not listening on TCP)")


def _unavailable(message: str) -> NoReturn:
    raise ConsoleError(ErrorCode.NO_CONSOLE_AVAILABLE, message)


#: SPICE channel types (spice-protocol) by the names libvirt's
#: C{<channel name=…>} uses.
SPICE_CHANNELS = {
    1: "main",
    2: "display",
    3: "inputs",
    4: "cursor",
    5: "playback",
    6: "record",
    8: "smartcard",
    9: "usbredir",
    10: "port",
    11: "webdav",
}


def needs_tls(g: Graphics) -> bool:
    """
    Whether some channel of SPICE console C{g} can only be reached over
    TLS: no plain port, C{defaultMode='secure'}, or a channel marked secure.
    """
    if g.port is None or g.default_mode == "secure":
        return True
    return any(mode == "secure" for _, mode in g.channel_modes)


def channel_uses_tls(g: Graphics, channel_type: Optional[int]) -> bool:
    """
    Whether the SPICE channel C{channel_type} of C{g} is dialled over TLS,
    as libvirt's C{<channel name mode>} (else C{defaultMode}) says; C{any}
    takes the plain port when there is one (QEMU accepts either).

    @raise ConsoleError: NO_CONSOLE_AVAILABLE when the port that mode needs
        is missing.
    """
    modes = dict(g.channel_modes)
    mode = modes.get(SPICE_CHANNELS.get(channel_type or 0, ""), g.default_mode)
    if mode == "secure" or (mode == "any" and g.port is None):
        if g.tls_port is None:
            _unavailable("The console has no TLS port for this channel")
        return True
    if g.port is None:
        _unavailable("The console has no plain port for this channel")
    return False


@lru_cache(maxsize=1024)
def _is_wildcard(address: Optional[str]) -> bool:
    if address is None or address.strip() in ("", "*"):
        return True
    try:
        return ipaddress.ip_address(address.strip().strip("[]")).is_unspecified
    except ValueError:
        return False


@lru_cache(maxsize=256)
def hypervisor_host(uri: str) -> Optional[str]:
    """
    The host part of a libvirt URI (C{qemu+ssh://root@h1/system} is
    C{h1}), or C{None} for a local URI (C{qemu:///system}).
    """
    try:
        host = urlsplit(uri).hostname
    except ValueError:
        return None
    return host or None


@lru_cache(maxsize=1024)
def is_loopback(host: str) -> bool:
    """
    Whether C{host} (an address, bracketed or not, with or without an IPv6
    zone, or C{localhost}) names this machine's loopback interface.
    """
    host = host.strip().strip("[]").split("%", 1)[0].lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def dial_host(vm: VMConsoles, g: Graphics) -> str:
    """
    The address to dial for console C{g} of C{vm}.

    The listen address, unless it is a wildcard (C{0.0.0.0}, C{::}, empty):
    then the hypervisor's configured C{console_host}, else C{127.0.0.1} for
    a local hypervisor URI, else the URI's host.  A UNIX-socket console's
    address is its socket path (the host policy checks it against the
    allowed socket directories); a console without a listener is
    L{LIBVIRT_HANDOFF}: libvirt hands over its connection.

    @raise ConsoleError: NO_CONSOLE_AVAILABLE when the console listens on
        the loopback interface of a remote hypervisor: dialling that address
        here would reach this machine, not the VM.
    """
    if handed_over(vm, g):
        return LIBVIRT_HANDOFF
    if g.listen_type == "socket" and g.socket:
        return g.socket
    if not _is_wildcard(g.listen):
        assert g.listen is not None
        listen = g.listen.strip()
        remote = hypervisor_host(vm.hypervisor)
        if is_loopback(listen) and remote is not None and not is_loopback(remote):
            log.warn(
                "console of {vm_uuid} listens on {listen} of remote hypervisor {uri}; not dialling",
                vm_uuid=vm.uuid,
                listen=listen,
                uri=vm.hypervisor,
            )
            raise ConsoleError(
                ErrorCode.NO_CONSOLE_AVAILABLE,
                "The console listens only on the virtualization host's loopback interface",
            )
        return listen
    if vm.console_host:
        return vm.console_host
    return hypervisor_host(vm.hypervisor) or "127.0.0.1"



@dataclass(frozen=True)
class ConsoleTarget:
    """
    A console whose address the host policy has checked: all the VM dial
    (L{vaporproxy.relay.dial.dial}) needs.

    @ivar address: the checked address: an IP literal, or a UNIX socket
        path for a socket listener.
    @ivar graphics: the console.
    @ivar hypervisor: the hypervisor URI (the key of its TLS settings).
    @ivar host: the host as L{dial_host} named it, before resolution: the
        name a VM's TLS certificate is checked against.
    @ivar vm_uuid: the VM's UUID.
    @ivar locator: what opens a console without a listener
        (C{open_graphics(target)}), or C{None}.
    @ivar hand_over: whether libvirt hands over the connection (see
        L{handed_over}).
    """

    address: str
    graphics: Graphics
    hypervisor: str = ""
    host: str = ""
    vm_uuid: str = ""
    locator: Any = field(default=None, compare=False, repr=False)
    hand_over: bool = False

    def uses_tls(self, channel_type: Optional[int]) -> bool:
        """Whether the SPICE channel C{channel_type} is dialled over TLS (L{channel_uses_tls})."""
        return channel_uses_tls(self.graphics, channel_type)


def handed_over(vm: VMConsoles, g: Graphics) -> bool:
    """
    Whether libvirt hands over console C{g}'s connection
    (C{virDomainOpenGraphicsFD}): it has no listener, or its hypervisor
    has C{open_graphics} on.
    """
    return g.listen_type == "none" or vm.open_graphics


def console_target(vm: VMConsoles, g: Graphics, host: str, address: str, locator: Any = None) -> ConsoleTarget:
    """
    The target of console C{g} of C{vm}, named C{host} by L{dial_host}
    and checked to C{address} by the host policy; C{locator} opens
    consoles without a listener (C{open_graphics}).
    """
    return ConsoleTarget(address, g, vm.hypervisor, host, vm.uuid, locator, handed_over(vm, g))
