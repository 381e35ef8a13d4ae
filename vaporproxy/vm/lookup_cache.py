"""
The libvirt locator's short-lived cache of running VMs' descriptions
(L{LookupCache}): opening a console asks twice for the same VM within
milliseconds (console info, then the WebSocket), and each libvirt round
trip costs a thread-pool hop, a libvirt call and an XML parse.

What a cached answer may miss is in
L{vaporproxy.vm.libvirt.LibvirtConsoleLocator}'s docstring.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, Optional, Tuple

from vaporproxy.interfaces import VMConsoles

#: A libvirt UUID, with or without dashes, any case.
UUID_RE = re.compile(
    r"^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$",
    re.IGNORECASE,
)

#: Above this many cached entries, expired ones are swept on insert; the
#: cache is emptied if that is not enough (it only ever holds running VMs
#: that were asked for, twice each: by reference and by UUID).
CACHE_SWEEP_AT = 4096


def cache_key(vm_ref: str) -> str:
    """
    The lookup cache key of C{vm_ref}: a UUID in any accepted spelling
    (upper case, without dashes) maps to one key; a name is itself.
    """
    if UUID_RE.match(vm_ref):
        return "uuid:" + vm_ref.replace("-", "").lower()
    return "name:" + vm_ref


class LookupCache:
    """
    Running VMs by the reference asked for and by UUID, each for C{ttl}
    seconds of C{seconds()}; touched on the reactor thread only.  A C{ttl}
    of 0 keeps nothing.
    """

    def __init__(self, ttl: float, seconds: Callable[[], float]):
        self.ttl = float(ttl)
        self._seconds = seconds
        #: cache key -> (expiry time, the VM).
        self._entries: Dict[str, Tuple[float, VMConsoles]] = {}

    def get(self, vm_ref: str) -> Optional[VMConsoles]:
        """The VM cached for C{vm_ref} and not yet expired, or C{None}."""
        if self.ttl <= 0 or not isinstance(vm_ref, str):
            return None
        entry = self._entries.get(cache_key(vm_ref))
        if entry is not None and self._seconds() < entry[0]:
            return entry[1]
        return None

    def remember(self, vm_ref: str, vm: VMConsoles) -> None:
        """Cache C{vm} (running VMs only) under C{vm_ref} and its UUID."""
        if self.ttl <= 0 or not vm.running:
            return
        now = self._seconds()
        entries = self._entries
        if len(entries) >= CACHE_SWEEP_AT:
            for key in [k for k, (expires, _) in entries.items() if expires <= now]:
                del entries[key]
            if len(entries) >= CACHE_SWEEP_AT:
                entries.clear()
        entry = (now + self.ttl, vm)
        entries[cache_key(vm_ref)] = entry
        entries[cache_key(vm.uuid)] = entry

    def invalidate(self, vm_ref: Optional[str] = None) -> None:
        """
        Forget the cached lookup of C{vm_ref} (a name or UUID; for a cached
        VM both its entries go), or of every VM when C{None}.
        """
        if vm_ref is None:
            self._entries.clear()
            return
        entry = self._entries.pop(cache_key(vm_ref), None)
        if entry is not None:
            vm = entry[1]
            for key in [k for k, (_, cached) in self._entries.items() if cached is vm]:
                del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)
