"""
C{twistd vaporproxy}: the command-line options and the composition root.

L{makeService} is the one place where vaporproxy's pieces are built and
wired together; the process's own services (thread pool, Redis, reload on
SIGHUP, shutdown, listening) are in L{vaporproxy.app}.  Collaborator modules
are imported inside it, so that C{twistd --help} stays fast and
libvirt/txredisapi load only when the sub-command actually runs.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

from twisted.application.service import MultiService
from twisted.python import usage

from vaporproxy.app.listen import listen, served, supervisor
from vaporproxy.app.reload import ReloadService, apply_reload, check_files, log_startup
from vaporproxy.app.services import (
    ShutdownService,
    VaporService,
    audit_trail,
    follow_cluster,
    libvirt_locator,
    purge_timer,
    recording_store,
    share_store,
    token_backend,
)
from vaporproxy.config import Config, ConfigError, load_config, with_listen
from vaporproxy.logs import effective_level, log_setup_for
from vaporproxy.static_dirs import static_dirs

DEFAULT_CONFIG = "vapor.conf"


class Options(usage.Options):
    """
    Options of C{twistd vaporproxy}.
    """

    synopsis = "[--config vapor.conf] [--listen ENDPOINT ...]"
    longdesc = (
        "A WebSocket console gateway for libvirt VMs (VNC and SPICE). "
        "SIGHUP reloads limits, allowed hosts, origins, API keys and the log level."
    )

    def __init__(self) -> None:
        super().__init__()
        self["config"] = DEFAULT_CONFIG
        self["listen"] = []
        self["worker_fds"] = []
        self.config_given = False
        #: The environment read for VAPOR_LOG_LEVEL (tests replace it).
        self.environ: Mapping[str, str] = os.environ

    def opt_config(self, path: str) -> None:
        """Path of the YAML config file [default: vapor.conf, or built-in defaults when absent]."""
        self["config"] = path
        self.config_given = True

    opt_c = opt_config

    def opt_listen(self, endpoint: str) -> None:
        """A Twisted endpoint to listen on, e.g. tcp:8080:interface=127.0.0.1 or ssl:8443:privateKey=key.pem (repeatable; replaces server.listen)."""  # noqa: E501
        self["listen"].append(endpoint)

    opt_l = opt_listen

    def opt_worker_fds(self, fds: str) -> None:
        """(internal) Listening descriptors inherited from the supervisor (server.workers > 1)."""
        from vaporproxy.app.workers import parse_worker_fds

        try:
            self["worker_fds"] = parse_worker_fds(fds)
        except ValueError as e:
            raise usage.UsageError(f"--worker-fds: {e}")

    def postOptions(self) -> None:
        """
        Read and validate the config; keep it as C{self["parsed"]}.
        """
        path: Optional[str] = self["config"]
        try:
            if not self.config_given and not os.path.exists(path):
                path, config = None, Config()
            else:
                config = load_config(path)
            config = with_listen(config, self["listen"])
            check_files(config)
            effective_level(config.logging.level, self.environ)
            if not self["worker_fds"]:
                from vaporproxy.app.workers import check_shareable

                check_shareable(config.server.listen, config.server.workers)
            elif len(self["worker_fds"]) != len(config.server.listen):
                raise ConfigError(
                    f"--worker-fds: {len(self['worker_fds'])} descriptors for"
                    f" {len(config.server.listen)} server.listen endpoints (expected one each, in order)"
                )
        except ConfigError as e:
            raise usage.UsageError(str(e))
        self["config_path"] = path
        self["parsed"] = config


def makeService(options: Options, reactor: Any = None) -> MultiService:
    """Build vaporproxy's service tree from parsed L{Options}."""
    if reactor is None:
        from twisted.internet import reactor
    from vaporproxy.console.registry import ConsoleRegistry
    from vaporproxy.ws.factory import ConsoleBridgeFactory
    from vaporproxy.vm.hosts import HostPolicy
    from vaporproxy.metrics import Metrics
    from vaporproxy.http.api import ConsoleAPI
    from vaporproxy.relay.planner import StagePlanner
    from vaporproxy.ws.autobahn_compat.event_loop import quicken

    config: Config = options["parsed"]
    environ = options.environ
    log_setup = log_setup_for(config.logging.level, config.logging.format, environ, getattr(options, "parent", None))
    root = VaporService(log_setup)
    log_startup(config)
    if config.server.workers > 1 and not options["worker_fds"]:
        return supervisor(root, options, reactor)
    quicken(reactor)  # (the reactor a console runs on: its events dispatched directly)

    pool, locator = libvirt_locator(config, reactor, root)
    token_store, limiter, redis = token_backend(config, reactor)
    host_policy = HostPolicy(config.console.allowed_hosts, reactor.nameResolver, clock=reactor)
    registry = ConsoleRegistry(reactor)
    metrics = Metrics(registry, token_store, reactor)
    audit = audit_trail(config, reactor, metrics, root)
    recordings = recording_store(config, reactor, pool, metrics, root)
    collaborators = dict(config=config, token_store=token_store, locator=locator, limiter=limiter,
                         host_policy=host_policy, registry=registry, reactor=reactor)  # fmt: skip
    bridge_factory = ConsoleBridgeFactory(observer=metrics, **collaborators)
    bridge_factory.planner = StagePlanner(config, reactor, metrics, recordings)
    bridge_factory.audit = audit
    shares = share_store(redis, reactor)
    api = ConsoleAPI(bridge_factory=bridge_factory, metrics=metrics, static_dirs=static_dirs(environ), cluster=redis,
                     audit=audit, recordings=recordings, shares=shares,
                     **collaborators)  # fmt: skip
    if redis is not None:
        follow_cluster(redis, registry, token_store, root)

    # Console WebSocket upgrades go from the listening port straight to the bridge, everything else
    # to the site (vaporproxy.ws.switch); both behind the guard (vaporproxy.http.guard).
    site, listening, guard = served(api, bridge_factory, config, reactor)
    listen(root, guard, config.server.listen, options["worker_fds"], reactor)
    purge_timer(config.console.cleanup_interval, token_store, reactor, shares).setServiceParent(root)

    def apply(new: Config) -> None:
        apply_reload(new, limiter=limiter, host_policy=host_policy, api=api, bridge_factory=bridge_factory,
                     log_setup=log_setup, environ=environ, token_store=token_store, guard=guard, site=site,
                     registry=registry, planner=bridge_factory.planner)  # fmt: skip

    ReloadService(options["config_path"], options["listen"], config, apply, reactor).setServiceParent(root)
    root.pieces.update(collaborators, bridge_factory=bridge_factory, api=api, metrics=metrics, site=site, audit=audit,
                       listening=listening, guard=guard)  # fmt: skip
    # Added last, so stopped first: live consoles get 1001 before the rest stops.
    ShutdownService(registry.close_all).setServiceParent(root)
    return root
