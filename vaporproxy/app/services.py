"""
The process's services: the root service, the libvirt thread pool, the
Redis backend, the shutdown steps and the token purge timer's body.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.python.components import Componentized
from twisted.python.threadpool import ThreadPool

from vaporproxy.config import Config
from vaporproxy.logs import LogSetup

log = Logger(namespace="vaporproxy.tap")


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


def libvirt_locator(config: Config, reactor: Any, parent: Any) -> Tuple[ThreadPool, Any]:
    """
    The libvirt thread pool and the locator on it.  The pool is a service
    of C{parent} that stops after the locator has closed its connections.
    """
    from vaporproxy.vm.libvirt import LibvirtConsoleLocator

    pool = ThreadPool(minthreads=0, maxthreads=max(4, 2 * len(config.hypervisors)), name="vaporproxy-libvirt")
    pool_service = ThreadPoolService(pool, reactor)
    pool_service.setServiceParent(parent)
    locator = LibvirtConsoleLocator(config.hypervisors, reactor, pool)
    pool_service.before_stop = locator.close
    return pool, locator


def follow_cluster(redis: Any, registry: Any, token_store: Any, parent: Any) -> None:
    """
    On Redis, close this process's consoles when any process terminates a
    VM's consoles or revokes a share, and run the backend as a service of
    C{parent} (add it before the listeners: started before them, stopped
    after them).
    """
    from vaporproxy.http.revocation import terminate_share

    redis.on_terminate(registry.terminate_vm)
    redis.on_share_revoked(lambda share_id: terminate_share(registry, token_store, share_id))
    RedisService(redis).setServiceParent(parent)


def token_backend(config: Config, reactor: Any) -> Any:
    """
    (token_store, limiter, redis backend or None) for C{tokens.backend};
    the token store refuses tokens whose credential a reload revoked
    (L{vaporproxy.http.revocation}).
    """
    from vaporproxy.http.revocation import Revocation, RevokingTokenStore

    revocation = Revocation(config.auth)
    if config.tokens.backend == "redis":
        from vaporproxy.stores.redis import connect_redis

        backend = connect_redis(config.tokens, config.console, reactor)
        return RevokingTokenStore(backend.token_store, revocation), backend.limiter, backend
    from vaporproxy.stores.limits import MemoryLimiter
    from vaporproxy.stores.tokens import MemoryTokenStore

    store = MemoryTokenStore(reactor, config.console.token_ttl)
    console = config.console
    limiter = MemoryLimiter(console.max_connections_per_vm, console.max_total_connections,
                            console.max_connections_per_user, console.max_connections_per_client)  # fmt: skip
    return RevokingTokenStore(store, revocation), limiter, None


def purge_tokens(token_store: Any, shares: Any = None) -> Deferred:
    """
    The cleanup timer's body: purge expired tokens.  Never fails (a failure
    would stop the timer for good): errors are logged.
    """

    def purged(count: int) -> None:
        if count:
            log.debug("purged {count} expired tokens", count=count)

    if shares is not None:
        shares.purge()
    d = maybeDeferred(token_store.purge)
    d.addCallback(purged)
    d.addErrback(lambda f: log.failure("token purge failed; will retry", f, level=LogLevel.error))
    return d


def purge_timer(interval: float, token_store: Any, clock: Any, shares: Any = None) -> TimerService:
    """
    The service that purges expired tokens (and share links) every
    C{interval} seconds.
    """
    timer = TimerService(interval, purge_tokens, token_store, shares)
    timer.clock = clock
    return timer


def audit_trail(config: Config, reactor: Any, metrics: Any, parent: Any) -> Any:
    """
    The L{vaporproxy.audit.AuditTrail} for C{audit.file} (or the log only),
    with its L{vaporproxy.filewriter.DiskWriter} added to C{parent} (added
    before the listeners: it stops after them, so the last consoles'
    closing events are written).
    """
    from vaporproxy.audit import AuditTrail
    from vaporproxy.filewriter import DiskWriter

    if config.audit.file is None:
        return AuditTrail(reactor, None, metrics.audit_event)
    writer = DiskWriter(reactor)
    writer.setServiceParent(parent)

    def dropped(why: str) -> None:
        log.error("audit file given up, events go on to the log only: {why}", why=why)
        metrics.audit_dropped(why)

    handle = writer.open(config.audit.file, flush_each=True, on_error=dropped)
    return AuditTrail(reactor, handle, metrics.audit_event)


def recording_store(config: Config, reactor: Any, pool: Any, metrics: Any, parent: Any) -> Any:
    """
    The L{vaporproxy.recordings.store.RecordingStore} when C{recording} is
    enabled (its directory made, mode 0700), with its disk writer and a
    cleanup loop (retention, C{max_total_size}, the on-disk figures) every
    C{console.cleanup_interval}; else C{None}.
    """
    if not config.recording.enabled:
        return None
    import os

    from twisted.internet.threads import deferToThreadPool

    from vaporproxy.filewriter import DiskWriter
    from vaporproxy.recordings.store import RecordingStore, list_directory

    from vaporproxy.recordings.heap import keep_freed_heap

    recording = config.recording
    os.makedirs(recording.dir, mode=0o700, exist_ok=True)
    keep_freed_heap()  # the writer frees records a batch at a time (issue 10)
    writer = DiskWriter(reactor)
    writer.setServiceParent(parent)
    store = RecordingStore(
        recording.dir,
        writer,
        reactor,
        lambda f, *args: deferToThreadPool(reactor, pool, f, *args),
        include_input=recording.include_input,
        retention_s=recording.retention,
        max_total_size=recording.max_total_size,
        on_dropped=metrics.recording_dropped,
    )
    metrics.watch_recordings(store.written)

    def cleanup() -> Deferred:
        d = store.cleanup()
        d.addCallback(lambda _: store._run(list_directory, store.directory, list(store.live)))
        d.addCallback(lambda found: metrics.recordings_on_disk(len(found), sum(m["size"] for m in found)))
        d.addErrback(lambda f: log.failure("recording cleanup failed; will retry", f, level=LogLevel.error))
        return d

    timer = TimerService(config.console.cleanup_interval, cleanup)
    timer.clock = reactor
    timer.setServiceParent(parent)
    return store


def share_store(redis: Any, reactor: Any) -> Any:
    """
    The share links' store: in Redis with the Redis backend (every node
    sees them), else in memory (its expired shares purged with the tokens).
    """
    if redis is not None:
        from vaporproxy.stores.redis_shares import RedisShareStore

        return RedisShareStore(redis.client, reactor)
    from vaporproxy.stores.shares import MemoryShareStore

    return MemoryShareStore(reactor)
