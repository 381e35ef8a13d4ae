"""
The administrator's view of live consoles: stats (this process, or the
cluster on Redis) and closing every console of a VM.
"""

from __future__ import annotations

import uuid
from typing import Any, Dict

from twisted.logger import Logger

from vaporproxy.console.events import ENDED_BY_ADMIN
from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.http.principal import Principal
from vaporproxy.timestamps import iso_utc
from vaporproxy.vm.libvirt import UUID_RE

log = Logger(namespace="vaporproxy.web.ConsoleAPI")


class ConsoleAdmin:
    """
    Stats and termination over the limiter, token store, registry and (in a
    cluster) the Redis backend.
    """

    def __init__(self, *, limiter: Any, token_store: Any, registry: Any, reactor: Any, cluster: Any = None,
                 locator: Any = None, audit: Any = None):  # fmt: skip
        self._limiter = limiter
        self._locator = locator
        self._audit = audit
        self._token_store = token_store
        self._registry = registry
        self._reactor = reactor
        self._cluster = cluster

    async def stats(self) -> Dict[str, Any]:
        """
        The body of C{GET /api/v1/console/stats}.
        """
        if self._cluster is not None:
            return await self._cluster_stats()
        limits = await self._limiter.stats()
        total_tokens = await self._token_store.count()
        now = self._reactor.seconds()
        return {
            "total_connections": limits["total_connections"],
            "total_tokens": total_tokens,
            "connections_per_vm": dict(limits["connections_per_vm"]),
            "connections": [record.as_dict(now) for record in self._registry.consoles()],
        }

    async def _cluster_stats(self) -> Dict[str, Any]:
        """
        The stats of a cluster: C{total_connections}, C{total_tokens} and
        C{connections_per_vm} are cluster-wide; C{connections} lists this
        process's consoles; C{cluster} names this process and gives every
        live process's figures.
        """
        figures = await self._cluster.cluster_stats()
        now = self._reactor.seconds()
        processes = []
        for process in figures.get("processes", ()):
            entry = dict(process)
            for field in ("started_at", "updated_at"):
                if isinstance(entry.get(field), (int, float)):
                    entry[field] = iso_utc(entry[field])
            processes.append(entry)
        per_vm = dict(figures["connections_per_vm"])
        return {
            "total_connections": figures["total_connections"],
            "total_tokens": figures["total_tokens"],
            "connections_per_vm": per_vm,
            "connections": [record.as_dict(now) for record in self._registry.consoles()],
            "cluster": {
                "node_id": self._cluster.node_id,
                "total_connections": figures["total_connections"],
                "total_tokens": figures["total_tokens"],
                "connections_per_vm": per_vm,
                "processes": processes,
            },
        }

    async def delete_sessions(self, by: Principal, vm_id: str) -> int:
        """
        Close every live console of the VM C{vm_id} (a name or UUID) for
        the admin C{by}, with a log line and an audit event; answer how many
        (L{terminate_vm}).
        """
        vm_name = None
        try:
            vm = await self._locator.locate(vm_id)
            vm_uuid, vm_name = vm.uuid, vm.name
        except ConsoleError as e:
            # A VM that is gone (or whose hypervisor is down) may still have
            # live consoles: accept its UUID as given.
            if e.code not in (ErrorCode.VM_NOT_FOUND, ErrorCode.INTERNAL_ERROR) or not UUID_RE.match(vm_id):
                raise
            # The canonical form (dashed, lower case) the registry keys on.
            vm_uuid = str(uuid.UUID(vm_id))
        terminated = await self.terminate_vm(vm_uuid)
        log.info("{user} terminated {count} console(s) of {vm_uuid}", user=by.user, count=terminated, vm_uuid=vm_uuid)
        if self._audit is not None:
            self._audit.sessions_terminated(by=by.user, vm_uuid=vm_uuid, vm_name=vm_name, count=terminated)
        return terminated

    async def terminate_vm(self, vm_uuid: str) -> int:
        """
        Close every live console of C{vm_uuid}; answer how many.

        Alone, that is this process's consoles.  In a cluster, the consoles
        of this process close at once and every process (this one too) is
        told over Redis pub/sub to close its own; the answer is then the
        number of consoles of the VM that held a slot anywhere in the
        cluster when the request arrived (or this process's count, if
        larger).  Remote consoles close asynchronously, within
        milliseconds of the answer.

        @raise ConsoleError: SERVICE_UNAVAILABLE when Redis cannot be
            reached (this process's consoles are closed all the same).
        """
        if self._cluster is None:
            return int(self._registry.terminate_vm(vm_uuid, ENDED_BY_ADMIN))
        try:
            limits = await self._limiter.stats()
        except ConsoleError:
            self._registry.terminate_vm(vm_uuid, ENDED_BY_ADMIN)
            raise
        live = int(dict(limits["connections_per_vm"]).get(vm_uuid, 0))
        local = int(self._registry.terminate_vm(vm_uuid, ENDED_BY_ADMIN))
        processes = await self._cluster.publish_terminate(vm_uuid)
        log.info("terminate request for {vm_uuid} sent to {processes} process(es)", vm_uuid=vm_uuid, processes=processes)
        return max(live, local)
