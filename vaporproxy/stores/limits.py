"""
Admission limits: the in-memory L{ILimiter}.

Each admitted console holds one L{ILease}; the limiter counts live leases
per VM and in total.  A lease is given back exactly once, however many times
C{release()} is called.
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Callable, Dict, Hashable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.interfaces import ILease, ILimiter

__all__ = ["Lease", "MemoryLimiter"]

log = Logger(namespace="vaporproxy.limits")


@implementer(ILease)
class Lease:
    """
    One admitted console's slot, for any limiter: C{release()} gives it
    back through C{on_release} exactly once, however often it is called.

    @ivar key: the limiter's own handle on the slot (a counter value in
        memory, the sorted-set member in Redis).
    @ivar released: whether the slot has been given back.
    """

    def __init__(self, key: Hashable, vm_uuid: str, console_id: str, on_release: Callable[["Lease"], None]):
        self.key = key
        self.vm_uuid = vm_uuid
        self.console_id = console_id
        self.released = False
        self._on_release = on_release

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self._on_release(self)

    def __repr__(self) -> str:
        return f"<Lease {self.console_id} vm={self.vm_uuid} released={self.released}>"


@implementer(ILimiter)
class MemoryLimiter:
    """
    Per-VM and total admission within this process.

    @ivar max_per_vm: live consoles allowed per VM.
    @ivar max_total: live consoles allowed in total.
    """

    def __init__(self, max_per_vm: int, max_total: int):
        self.max_per_vm = int(max_per_vm)
        self.max_total = int(max_total)
        self._leases: Dict[int, Lease] = {}
        self._per_vm: Counter[str] = Counter()
        self._keys = itertools.count()

    def acquire(self, vm_uuid: str, console_id: str) -> Deferred:
        if self._per_vm[vm_uuid] >= self.max_per_vm or len(self._leases) >= self.max_total:
            log.info(
                "console {console_id} of {vm_uuid} refused: limit reached"
                " ({vm_count}/{max_per_vm} on the VM, {total}/{max_total} in total)",
                console_id=console_id,
                vm_uuid=vm_uuid,
                vm_count=self._per_vm[vm_uuid],
                max_per_vm=self.max_per_vm,
                total=len(self._leases),
                max_total=self.max_total,
            )
            return fail(ConsoleError(ErrorCode.MAX_CONNECTIONS_REACHED))
        lease = Lease(next(self._keys), vm_uuid, console_id, self._release)
        self._leases[lease.key] = lease
        self._per_vm[vm_uuid] += 1
        return succeed(lease)

    def _release(self, lease: Lease) -> None:
        if self._leases.pop(lease.key, None) is None:
            return
        self._per_vm[lease.vm_uuid] -= 1
        if self._per_vm[lease.vm_uuid] <= 0:
            del self._per_vm[lease.vm_uuid]

    def set_limits(self, max_per_vm: int, max_total: int) -> None:
        self.max_per_vm = int(max_per_vm)
        self.max_total = int(max_total)

    def stats(self) -> Deferred:
        return succeed(
            {
                "total_connections": len(self._leases),
                "connections_per_vm": dict(self._per_vm),
            }
        )
