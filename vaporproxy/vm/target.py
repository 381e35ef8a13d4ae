"""
Which console a client gets and where to dial it: grant -> VM -> graphics
-> address.  Pure; the address is then checked by the host policy
(L{vaporproxy.vm.hosts}).
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from typing import Optional
from urllib.parse import urlsplit

from twisted.logger import Logger

from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.interfaces import CONSOLE_TYPES, Graphics, VMConsoles

log = Logger(namespace="vaporproxy.consoles")

# ---------------------------------------------------------------------------
# Choosing a console and where to dial it
# ---------------------------------------------------------------------------


def select_console(
    vm: VMConsoles, console_type: Optional[str], display: Optional[int]
) -> Graphics:
    """
    The graphics device a client asked for.

    @param console_type: C{"vnc"}, C{"spice"} or C{None} for the first
        device in document order.
    @param display: index among devices of that type, or C{None} for the
        first.
    @raise ConsoleError: BAD_REQUEST for an unknown type or a negative
        display; NO_CONSOLE_AVAILABLE (the message says why) when the VM is
        not running, has no such device, or the device has no port yet.
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
    if chosen.port is None:
        raise ConsoleError(
            ErrorCode.NO_CONSOLE_AVAILABLE,
            "The console has no TCP port (not assigned yet, or not listening on TCP)",
        )
    return chosen


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
    a local hypervisor URI, else the URI's host.

    @raise ConsoleError: NO_CONSOLE_AVAILABLE when the console listens on
        the loopback interface of a remote hypervisor: dialling that address
        here would reach this machine, not the VM.
    """
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

