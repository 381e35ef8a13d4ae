"""
In-memory fakes of vaporproxy's backends, shipped with the package so that
users (and our own tests) can test against them.
"""

from __future__ import annotations

from typing import Dict, Iterable, Mapping, Optional

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.interfaces import IConsoleLocator, VMConsoles
from vaporproxy.stores.limits import MemoryLimiter
from vaporproxy.stores.tokens import MemoryTokenStore

__all__ = ["FakeConsoleLocator", "MemoryLimiter", "MemoryTokenStore"]


@implementer(IConsoleLocator)
class FakeConsoleLocator:
    """
    An L{IConsoleLocator} over a fixed set of L{VMConsoles}, looked up by
    UUID or name.

    @ivar broken: when set to a string, every call fails as an unreachable
        hypervisor would (INTERNAL_ERROR), and C{check} reports that string.
    """

    def __init__(self, vms: Iterable[VMConsoles] = (), uri: str = "fake:///"):
        self.vms: Dict[str, VMConsoles] = {}
        self.uri = uri
        self.broken: Optional[str] = None
        self.lookups = 0
        for vm in vms:
            self.add(vm)

    def add(self, vm: VMConsoles) -> None:
        self.vms[vm.uuid] = vm

    def remove(self, vm_ref: str) -> None:
        vm = self._find(vm_ref)
        if vm is not None:
            del self.vms[vm.uuid]

    def _find(self, vm_ref: str) -> Optional[VMConsoles]:
        for vm in self.vms.values():
            if vm_ref in (vm.uuid, vm.name):
                return vm
        return None

    def locate(self, vm_ref: str) -> Deferred:
        self.lookups += 1
        if self.broken is not None:
            return fail(ConsoleError(ErrorCode.INTERNAL_ERROR, "Hypervisor unavailable"))
        vm = self._find(vm_ref)
        if vm is None:
            return fail(ConsoleError(ErrorCode.VM_NOT_FOUND))
        return succeed(vm)

    def check(self) -> Deferred:
        result: Mapping[str, str] = {self.uri: self.broken or "ok"}
        return succeed(result)
