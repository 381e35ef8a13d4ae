"""
Admission limits: the in-memory L{ILimiter}.

Each admitted console holds one L{ILease}; the limiter counts live leases
per VM and in total.  A lease is given back exactly once, however many times
C{release()} is called.
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Callable, Dict, Hashable, Optional

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.interfaces import ILease, ILimiter

__all__ = ["Caps", "Lease", "MemoryLimiter"]

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

    def __init__(self, key: Hashable, vm_uuid: str, console_id: str, on_release: Callable[["Lease"], None],
                 user: Optional[str] = None, client: Optional[str] = None):  # fmt: skip
        self.key = key
        self.vm_uuid = vm_uuid
        self.console_id = console_id
        self.user = user
        self.client = client
        self.released = False
        self._on_release = on_release

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self._on_release(self)

    def __repr__(self) -> str:
        return f"<Lease {self.console_id} vm={self.vm_uuid} released={self.released}>"


class Caps:
    """
    The caps a limiter keeps (the memory one and the Redis one alike).
    """

    max_per_vm: int
    max_total: int
    max_per_user: int
    max_per_client: int

    def set_limits(self, max_per_vm: int, max_total: int, max_per_user: Optional[int] = None,
                   max_per_client: Optional[int] = None) -> None:  # fmt: skip
        """
        New caps for new consoles (live ones stay); C{None} keeps a cap.
        """
        self.max_per_vm = int(max_per_vm)
        self.max_total = int(max_total)
        if max_per_user is not None or not hasattr(self, "max_per_user"):
            self.max_per_user = int(max_per_user or 0)
        if max_per_client is not None or not hasattr(self, "max_per_client"):
            self.max_per_client = int(max_per_client or 0)


@implementer(ILimiter)
class MemoryLimiter(Caps):
    """
    Per-VM and total admission within this process.

    @ivar max_per_vm: live consoles allowed per VM.
    @ivar max_total: live consoles allowed in total.
    @ivar max_per_user: live consoles allowed per user (0: unlimited).
    @ivar max_per_client: live consoles allowed per client address (0:
        unlimited).
    """

    def __init__(self, max_per_vm: int, max_total: int, max_per_user: int = 0, max_per_client: int = 0):
        self.set_limits(max_per_vm, max_total, max_per_user, max_per_client)
        self._leases: Dict[int, Lease] = {}
        self._per_vm: Counter[str] = Counter()
        self._per_user: Counter[str] = Counter()
        self._per_client: Counter[str] = Counter()
        self._keys = itertools.count()

    def _over_owner_caps(self, user: Optional[str], client: Optional[str]) -> Optional[str]:
        """
        Which per-user or per-client cap C{user} / C{client} is at, if any.
        """
        if user is not None and 0 < self.max_per_user <= self._per_user[user]:
            return f"user {user} has {self._per_user[user]}/{self.max_per_user}"
        if client is not None and 0 < self.max_per_client <= self._per_client[client]:
            return f"client {client} has {self._per_client[client]}/{self.max_per_client}"
        return None

    def acquire(self, vm_uuid: str, console_id: str, user: Optional[str] = None,
                client: Optional[str] = None) -> Deferred:  # fmt: skip
        """
        A lease for one console, or MAX_CONNECTIONS_REACHED: per VM, in
        total, and (when given and capped) per user and per client address.
        """
        over = self._over_owner_caps(user, client)
        if over is not None:
            log.info("console {console_id} of {vm_uuid} refused: {over}", console_id=console_id,
                     vm_uuid=vm_uuid, over=over)  # fmt: skip
            return fail(ConsoleError(ErrorCode.MAX_CONNECTIONS_REACHED))
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
        lease = Lease(next(self._keys), vm_uuid, console_id, self._release, user, client)
        self._leases[lease.key] = lease
        self._per_vm[vm_uuid] += 1
        if user is not None:
            self._per_user[user] += 1
        if client is not None:
            self._per_client[client] += 1
        return succeed(lease)

    @staticmethod
    def _down(counter: "Counter[str]", name: Optional[str]) -> None:
        if name is None:
            return
        counter[name] -= 1
        if counter[name] <= 0:
            del counter[name]

    def _release(self, lease: Lease) -> None:
        if self._leases.pop(lease.key, None) is None:
            return
        self._down(self._per_vm, lease.vm_uuid)
        self._down(self._per_user, lease.user)
        self._down(self._per_client, lease.client)

    def stats(self) -> Deferred:
        return succeed(
            {
                "total_connections": len(self._leases),
                "connections_per_vm": dict(self._per_vm),
            }
        )
