"""
Listening: what the port serves (the guard, the port switch, the site), the
endpoints of C{server.listen}, the sockets a worker inherits, or the
supervisor of C{server.workers} worker processes.
"""

from __future__ import annotations

from typing import Any, Sequence, Tuple

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService

from vaporproxy.config import Config


def served(api: Any, bridge_factory: Any, config: Config, reactor: Any) -> Tuple[Any, Any, Any]:
    """
    C{(site, listening, guard)}: the API's site (with C{logging.access_log});
    the port switch in front of it, which hands console WebSocket upgrades
    straight to C{bridge_factory} (L{vaporproxy.ws.switch}); and the guard
    of pending connections in front of both (L{guarded}), which listens.
    """
    from vaporproxy.http.site import ConsoleSite
    from vaporproxy.ws.switch import SwitchFactory

    site = ConsoleSite(api.resource())
    site.access_log = config.logging.access_log
    listening = SwitchFactory(site, bridge_factory, reactor)
    return site, listening, guarded(listening, config.server, reactor)


def listen(root: MultiService, site: Any, listen: Sequence[str], worker_fds: Sequence[int], reactor: Any) -> None:
    """
    Serve C{site} (the listening factory) on every endpoint, or on the sockets inherited from the
    supervisor when this process is a worker.
    """
    from twisted.internet.endpoints import serverFromString

    if worker_fds:
        from vaporproxy.app.workers import AdoptedPortService, is_proxy_endpoint

        # The N-th descriptor is the N-th endpoint (checked in Options),
        # which tells whether connections start with a PROXY header.
        for fd, description in zip(worker_fds, listen):
            AdoptedPortService(fd, site, reactor, proxy=is_proxy_endpoint(description)).setServiceParent(root)
        return
    for description in listen:
        StreamServerEndpointService(serverFromString(reactor, description), site).setServiceParent(root)


def supervisor(root: MultiService, options: Any, reactor: Any) -> MultiService:
    """
    The parent of C{server.workers} worker processes (see L{vaporproxy.app.workers}).
    """
    from twisted.internet.endpoints import serverFromString

    from vaporproxy.app.workers import WorkerSupervisor, worker_argv

    config: Config = options["parsed"]
    endpoints = [serverFromString(reactor, s) for s in config.server.listen]
    # The workers take the parent's endpoints (file or --listen), in order.
    argv = worker_argv(options["config_path"], [arg for d in config.server.listen for arg in ("--listen", d)])
    WorkerSupervisor(config.server.workers, endpoints, argv, reactor).setServiceParent(root)
    return root


def guarded(listening: Any, server: Any, clock: Any) -> Any:
    """
    C{listening} behind the guard of pending connections, with the
    C{server.request_timeout} and C{server.max_pending_*} caps.
    """
    from vaporproxy.http.guard import GuardFactory

    return GuardFactory(listening, clock, request_timeout=server.request_timeout,
                        max_pending=server.max_pending_connections,
                        max_pending_per_client=server.max_pending_per_client)  # fmt: skip
