"""
C{twistd vaporproxy}: the command-line options and the composition root.

L{makeService} is the one place where vaporproxy's pieces are built and
wired together.  Collaborator modules are imported inside it, so that
C{twistd --help} stays fast and libvirt/txredisapi load only when the
sub-command actually runs.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.python import usage
from twisted.python.components import Componentized
from twisted.python.threadpool import ThreadPool

from vaporproxy.config import Config, ConfigError, load_config, with_listen
from vaporproxy.logs import LogSetup, effective_level, log_setup_for

log = Logger(namespace="vaporproxy.tap")

DEFAULT_CONFIG = "vapor.conf"

#: Settings that SIGHUP cannot change in a running process.
RESTART_ONLY = (
    ("server.listen", lambda c: c.server.listen),
    ("server.workers", lambda c: c.server.workers),
    ("tokens", lambda c: c.tokens),
    ("console.cleanup_interval", lambda c: c.console.cleanup_interval),
    ("hypervisors", lambda c: c.hypervisors),
    ("logging.format", lambda c: c.logging.format),
)


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


class VaporService(MultiService):
    """
    The root service.  When twistd makes it a child of its application it
    also gives the application our log observer (see L{vaporproxy.logs}).
    """

    def __init__(self, log_setup: LogSetup):
        super().__init__()
        self.log_setup = log_setup
        #: The wired pieces by name (for tests and debugging).
        self.pieces: Dict[str, Any] = {}

    def setServiceParent(self, parent: Any) -> None:
        if isinstance(parent, Componentized) and parent.getComponent(ILogObserver) is None:
            parent.setComponent(ILogObserver, self.log_setup.observer)
            self.log_setup.install()
        super().setServiceParent(parent)


class ThreadPoolService(Service):
    """
    Starts and stops a thread pool with the service tree.

    @ivar before_stop: called (and waited for, at most C{close_timeout}
        seconds) before the pool stops: the locator closes its libvirt
        connections on the pool's threads.
    """

    close_timeout = 5.0

    def __init__(self, pool: ThreadPool, reactor: Any = None, before_stop: Optional[Callable[[], Any]] = None):
        self.pool = pool
        self.reactor = reactor
        self.before_stop = before_stop

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> Deferred:
        super().stopService()
        if self.before_stop is None:
            self.pool.stop()
            return succeed(None)
        d = maybeDeferred(self.before_stop)
        if self.reactor is not None:
            d.addTimeout(self.close_timeout, self.reactor)
        d.addErrback(lambda f: log.failure("closing before the thread pool stops failed", f))
        d.addBoth(lambda _: self.pool.stop())
        return d


class RedisService(Service):
    """
    Starts the Redis backend (connections, subscription, renewal and report
    loops) with the service tree, after twistd has daemonized, and closes it
    at stop.
    """

    name = "redis"

    def __init__(self, backend: Any):
        self.backend = backend

    def startService(self) -> None:
        super().startService()
        self.backend.start()

    def stopService(self) -> Deferred:
        super().stopService()
        d = maybeDeferred(self.backend.close)
        d.addErrback(lambda f: log.failure("closing the Redis backend failed", f))
        return d


class ShutdownService(Service):
    """
    Calls each of C{steps} in order at shutdown, waiting for any Deferred
    and logging (not raising) failures.
    """

    def __init__(self, *steps: Callable[[], Any]):
        self.steps = steps

    async def _stop(self) -> None:
        for step in self.steps:
            try:
                await maybeDeferred(step)
            except Exception:
                log.failure("shutdown step {step!r} failed", step=step)

    def stopService(self) -> Deferred:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())


class ReloadService(Service):
    """
    Reloads the config file on SIGHUP and hands the new config to C{apply}.

    A file that does not parse is logged and the running config is kept.
    """

    name = "reload"

    def __init__(
        self,
        path: Optional[str],
        listen: Sequence[str],
        config: Config,
        apply: Callable[[Config], None],
        reactor: Any,
    ):
        self.path = path
        self.listen = list(listen)
        self.config = config
        self.apply = apply
        self.reactor = reactor
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGHUP, self._on_signal)

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> bool:
        """
        Read the file again and apply it; answer whether it was applied.
        """
        if self.path is None:
            log.warn("SIGHUP: no config file was given; nothing to reload")
            return False
        try:
            new = with_listen(load_config(self.path), self.listen)
            check_files(new)
        except ConfigError as e:
            log.error("SIGHUP: {path} not reloaded, keeping the running config: {error}", path=self.path, error=str(e))
            return False
        stale = [key for key, get in RESTART_ONLY if get(new) != get(self.config)]
        if stale:
            log.warn("SIGHUP: {keys} changed; restart to apply", keys=", ".join(stale))
        try:
            self.apply(new)
        except Exception:
            log.failure("SIGHUP: applying {path} failed", path=self.path)
            return False
        self.config = new
        log.info("SIGHUP: reloaded {path}", path=self.path)
        log_limits(new)
        return True


def static_dirs(environ: Mapping[str, str]) -> Dict[str, str]:
    """
    Where the noVNC and spice-html5 files are: C{VAPOR_NOVNC_DIR} /
    C{VAPOR_SPICE_HTML5_DIR}, else the first existing of the usual places.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = {
        "novnc": [
            environ.get("VAPOR_NOVNC_DIR"),
            os.path.join(here, "static", "novnc"),
            os.path.join(os.path.dirname(here), "node_modules", "@novnc", "novnc"),
            "/usr/share/novnc",
        ],
        "spice-html5": [
            environ.get("VAPOR_SPICE_HTML5_DIR"),
            os.path.join(here, "static", "spice-html5"),
            "/usr/share/spice-html5",
        ],
    }
    found = {}
    for name, paths in candidates.items():
        for path in paths:
            if path and os.path.isdir(path):
                found[name] = path
                break
    return found


def _token_backend(config: Config, reactor: Any) -> Any:
    """
    (token_store, limiter, redis backend or None) for C{tokens.backend}.
    """
    if config.tokens.backend == "redis":
        from vaporproxy.stores.redis import connect_redis

        backend = connect_redis(config.tokens, config.console, reactor)
        return backend.token_store, backend.limiter, backend
    from vaporproxy.stores.limits import MemoryLimiter
    from vaporproxy.stores.tokens import MemoryTokenStore

    store = MemoryTokenStore(reactor, config.console.token_ttl)
    limiter = MemoryLimiter(config.console.max_connections_per_vm, config.console.max_total_connections)
    return store, limiter, None


def purge_tokens(token_store: Any) -> Deferred:
    """
    The cleanup timer's body: purge expired tokens.  Never fails (a failure
    would stop the timer for good): errors are logged.
    """

    def purged(count: int) -> None:
        if count:
            log.debug("purged {count} expired tokens", count=count)

    d = maybeDeferred(token_store.purge)
    d.addCallback(purged)
    d.addErrback(lambda f: log.failure("token purge failed; will retry", f, level=LogLevel.error))
    return d


def check_files(config: Config) -> None:
    """
    Load the files a config refers to (the JWT key, the hypervisors'
    C{vnc_tls} CA, certificate and key files) so that a bad one stops
    start-up with a one-line error, and a SIGHUP with a bad one changes
    nothing, instead of failing half-way through applying it.

    @raise ConfigError: naming the key of the first unusable file.
    """
    if config.auth.jwt is not None:
        from vaporproxy.http.auth import load_jwt_key

        load_jwt_key(config.auth.jwt)
    if any(h.vnc_tls is not None for h in config.hypervisors):
        from vaporproxy.guards.rfb import vnc_tls_by_uri

        vnc_tls_by_uri(config.hypervisors)


def apply_reload(config: Config, *, limiter: Any, host_policy: Any, api: Any, bridge_factory: Any,
                 log_setup: LogSetup, environ: Mapping[str, str], token_store: Any = None) -> None:  # fmt: skip
    """
    Apply what SIGHUP may change to the running pieces: the steps that may
    still refuse the new config (they load files) first, so a refusal
    leaves everything as it was.
    """
    console = config.console
    api.reload(config)
    bridge_factory.reload(config)
    if token_store is not None:
        token_store.ttl = console.token_ttl  # tokens issued from now on
    limiter.set_limits(console.max_connections_per_vm, console.max_total_connections)
    host_policy.set_allowed(console.allowed_hosts)
    try:
        log_setup.set_level(effective_level(config.logging.level, environ))
    except ConfigError as e:
        log.error("{error}", error=str(e))


def log_startup(config: Config) -> None:
    import autobahn
    import autobahn.websocket

    nvx = bool(getattr(autobahn.websocket, "USES_NVX", False))
    log.info("vaporproxy starting: autobahn {version}, native WebSocket acceleration (NVX) {nvx}",
             version=autobahn.__version__, nvx="on" if nvx else "off")  # fmt: skip
    if not nvx:
        log.warn("autobahn NVX is off: WebSocket masking and UTF-8 checks run in pure Python (slower)")
    log.info("tokens: {backend}; listening on {listen}", backend=config.tokens.backend,
             listen=", ".join(config.server.listen))  # fmt: skip
    log_limits(config)


def log_limits(config: Config) -> None:
    console = config.console
    log.debug("config: {per_vm} consoles per VM, {total} in total, token_ttl {ttl}s, "
              "allowed hosts {hosts}, hypervisors {uris}", per_vm=console.max_connections_per_vm,
              total=console.max_total_connections, ttl=console.token_ttl,
              hosts=", ".join(console.allowed_hosts), uris=", ".join(h.uri for h in config.hypervisors))  # fmt: skip


def _listen(root: MultiService, site: Any, listen: Sequence[str], worker_fds: Sequence[int], reactor: Any) -> None:
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


def _supervisor(root: VaporService, options: Options, reactor: Any) -> VaporService:
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


def makeService(options: Options, reactor: Any = None) -> MultiService:
    """
    Build vaporproxy's service tree from parsed L{Options}.
    """
    if reactor is None:
        from twisted.internet import reactor
    from vaporproxy.console.registry import ConsoleRegistry
    from vaporproxy.ws.factory import ConsoleBridgeFactory
    from vaporproxy.vm.libvirt import LibvirtConsoleLocator
    from vaporproxy.vm.hosts import HostPolicy
    from vaporproxy.metrics import Metrics
    from vaporproxy.ws.switch import SwitchFactory
    from vaporproxy.http.api import ConsoleAPI, ConsoleSite

    config: Config = options["parsed"]
    environ = options.environ
    log_setup = log_setup_for(config.logging.level, config.logging.format, environ, getattr(options, "parent", None))
    root = VaporService(log_setup)
    log_startup(config)
    if config.server.workers > 1 and not options["worker_fds"]:
        return _supervisor(root, options, reactor)

    pool = ThreadPool(minthreads=0, maxthreads=max(4, 2 * len(config.hypervisors)), name="vaporproxy-libvirt")
    pool_service = ThreadPoolService(pool, reactor)
    pool_service.setServiceParent(root)
    token_store, limiter, redis = _token_backend(config, reactor)
    locator = LibvirtConsoleLocator(config.hypervisors, reactor, pool)
    pool_service.before_stop = locator.close
    host_policy = HostPolicy(config.console.allowed_hosts, reactor.nameResolver, clock=reactor)
    registry = ConsoleRegistry(reactor)
    metrics = Metrics(registry, token_store, reactor)
    collaborators = dict(config=config, token_store=token_store, locator=locator, limiter=limiter,
                         host_policy=host_policy, registry=registry, reactor=reactor)  # fmt: skip
    bridge_factory = ConsoleBridgeFactory(observer=metrics, **collaborators)
    api = ConsoleAPI(bridge_factory=bridge_factory, metrics=metrics, static_dirs=static_dirs(environ), cluster=redis, **collaborators)
    if redis is not None:
        redis.on_terminate(registry.terminate_vm)
        # Before the listeners: started before them, stopped after them.
        RedisService(redis).setServiceParent(root)

    site = ConsoleSite(api.resource())
    site.access_log = config.logging.access_log
    # Console WebSocket upgrades go from the listening port straight to the
    # bridge; everything else to the site (vaporproxy.ws.switch).
    listening = SwitchFactory(site, bridge_factory, reactor)
    _listen(root, listening, config.server.listen, options["worker_fds"], reactor)
    cleanup = TimerService(config.console.cleanup_interval, purge_tokens, token_store)
    cleanup.clock = reactor
    cleanup.setServiceParent(root)

    def apply(new: Config) -> None:
        apply_reload(new, limiter=limiter, host_policy=host_policy, api=api, bridge_factory=bridge_factory,
                     log_setup=log_setup, environ=environ, token_store=token_store)  # fmt: skip
        site.access_log = new.logging.access_log

    ReloadService(options["config_path"], options["listen"], config, apply, reactor).setServiceParent(root)
    root.pieces.update(collaborators, bridge_factory=bridge_factory, api=api, metrics=metrics, site=site,
                       listening=listening)  # fmt: skip
    # Added last, so stopped first: live consoles get 1001 before the rest stops.
    ShutdownService(registry.close_all).setServiceParent(root)
    return root
