"""
Finding a VM's graphics consoles: the libvirt locator.

The domain XML is parsed by L{vaporproxy.vm.domain} (pure); which console
and where to dial it is L{vaporproxy.vm.target}.

L{LibvirtConsoleLocator}: every libvirt call is blocking, so each
one runs on a dedicated thread pool (C{deferToThreadPool}); the reactor
thread never waits for libvirt.  It keeps one read-write connection per
hypervisor URI (C{passwd} needs C{VIR_DOMAIN_XML_SECURE}, which read-only
connections refuse) and reopens it when it breaks (L{vaporproxy.vm.connections}).

Lookups of running VMs are cached for C{cache_ttl} seconds (1 s by default,
at most L{MAX_CACHE_TTL}; L{vaporproxy.vm.lookup_cache}).  See
L{LibvirtConsoleLocator} for what a cached answer may miss.

The locator is the reactor side; L{_PoolSide} holds the calls that block,
which run on the thread pool only.
"""

from __future__ import annotations

from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple, TypeVar

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from vaporproxy.config import HypervisorConfig
from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.interfaces import IConsoleLocator, VMConsoles
from vaporproxy.vm.connections import Connections, HypervisorFailed, error_code
from vaporproxy.vm.domain import DomainXMLError, console_error, graphics_of, identity_of, parse_domain
from vaporproxy.vm.lookup_cache import UUID_RE, LookupCache
from vaporproxy.vm.target import hypervisor_host

log = Logger(namespace="vaporproxy.consoles")

_T = TypeVar("_T")

#: libvirt's "no such domain" and "invalid argument" error codes.
VIR_ERR_NO_DOMAIN = 42
VIR_ERR_INVALID_ARG = 8

#: The longest lookup cache lifetime accepted (seconds).
MAX_CACHE_TTL = 2.0

# ---------------------------------------------------------------------------
# The libvirt locator
# ---------------------------------------------------------------------------


def is_local(config: HypervisorConfig) -> bool:
    """
    Whether the proxy runs on the hypervisor's host: its C{local} setting,
    else whether its URI names no host (C{qemu:///system}).
    """
    if config.local is not None:
        return config.local
    return hypervisor_host(config.uri) is None


def _import_libvirt() -> Any:
    import libvirt  # noqa: imported lazily: twistd --help stays fast

    return libvirt


@implementer(IConsoleLocator)
class LibvirtConsoleLocator:
    """
    An L{IConsoleLocator} over libvirt hypervisors, tried in order.

    Every libvirt call runs on C{threadpool} (which the caller starts and
    stops).  One read-write connection per URI is opened lazily, cached,
    and reopened once when a call fails with a connection-level error or
    the connection is no longer alive.

    A hypervisor that cannot be opened is not tried again for
    C{reopen_backoff} seconds: lookups fail fast instead of tying up pool
    threads in connection timeouts.

    A successful lookup of a I{running} VM is cached for C{cache_ttl}
    seconds (by the reference asked for and by the VM's UUID), and answered
    from the cache without a pool hop.  Stopped VMs, unknown VMs and
    failures are never cached, and a failed lookup drops what was cached
    for that reference.  L{invalidate} drops entries on demand (the bridge
    should call it when dialling a console or its handshake fails).

    The trade-off: for up to C{cache_ttl} seconds after a change, an
    answer may describe the VM as it was.  A console WebSocket opened in
    that window for a VM that was shut off dials a port nobody listens on
    (CONNECTION_FAILED); after a password change the guard offers the old
    password and the VM refuses it (the console fails, nothing is leaked);
    a VM port that was freed I{and} taken by another VM within the window
    would be dialled with the first VM's (old) password, which the second
    VM refuses unless both have none.  Every check that matters -- the
    token, its VM, the client address, the allowed hosts, the limits --
    is still made per console; only the description of the VM is reused.
    C{cache_ttl=0} turns the cache off.

    @param reactor: provides C{callFromThread} and C{seconds}.
    @param libvirt_module: the C{libvirt} module, or a fake of it for tests.
    @param cache_ttl: seconds a running VM's description is reused
        (0 to 2).
    """

    def __init__(
        self,
        hypervisors: Sequence[HypervisorConfig],
        reactor: Any,
        threadpool: ThreadPool,
        *,
        libvirt_module: Any = None,
        reopen_backoff: float = 2.0,
        cache_ttl: float = 1.0,
    ):
        if not 0 <= cache_ttl <= MAX_CACHE_TTL:
            raise ValueError(f"cache_ttl must be between 0 and {MAX_CACHE_TTL} seconds")
        self._reactor = reactor
        self._cache = LookupCache(cache_ttl, reactor.seconds)
        self._pool = threadpool
        libvirt = libvirt_module if libvirt_module is not None else _import_libvirt()
        # libvirt prints every error to stderr unless a handler is set.
        libvirt.registerErrorHandler(lambda ctx, err: None, None)
        self._connections = Connections(hypervisors, libvirt, reactor.seconds, reopen_backoff, self._log_from_pool)
        self._slots = self._connections.slots
        self._order = self._connections.order
        self._blocking = _PoolSide(libvirt, self._connections, self._log_from_pool)

    # -- reactor side ------------------------------------------------------

    def _log_from_pool(self, level: str, format: str, **kw: Any) -> None:
        """
        Log from a pool thread: the event is emitted on the reactor thread,
        as observers are not thread-safe.
        """
        self._reactor.callFromThread(getattr(log, level), format, **kw)

    def _in_pool(self, f: Callable[..., _T], *args: Any) -> "Deferred[_T]":
        return deferToThreadPool(self._reactor, self._pool, f, *args)

    def locate(self, vm_ref: str) -> "Deferred[VMConsoles]":
        """
        Look up C{vm_ref} (UUID or name) on each hypervisor in order; a
        running VM looked up less than C{cache_ttl} seconds ago is answered
        at once from the cache.
        """
        cached = self._cache.get(vm_ref)
        if cached is not None:
            return succeed(cached)
        return Deferred.fromCoroutine(self._locate(vm_ref))

    def invalidate(self, vm_ref: Optional[str] = None) -> None:
        """
        Forget the cached lookup of C{vm_ref} (a name or UUID; for a cached
        VM both its entries go), or of every VM when C{None}.
        """
        self._cache.invalidate(vm_ref)

    async def _locate(self, vm_ref: str) -> VMConsoles:
        if not isinstance(vm_ref, str) or not vm_ref or len(vm_ref) > 1024:
            raise ConsoleError(ErrorCode.VM_NOT_FOUND)
        try:
            vm = await self._locate_uncached(vm_ref)
        except BaseException:
            self.invalidate(vm_ref)
            raise
        if vm.running:
            self._cache.remember(vm_ref, vm)
        else:
            # A stopped VM: whatever was cached for it is out of date.
            self.invalidate(vm_ref)
            self.invalidate(vm.uuid)
        return vm

    async def _locate_uncached(self, vm_ref: str) -> VMConsoles:
        failed: List[str] = []
        for uri in self._order:
            try:
                vm = await self._in_pool(self._blocking.locate_on, uri, vm_ref)
            except DomainXMLError as e:
                raise console_error(e, uri=uri, vm_ref=vm_ref) from None
            except HypervisorFailed as e:
                log.error(
                    "hypervisor {uri} failed looking up {vm_ref!r}: {detail}",
                    uri=uri,
                    vm_ref=vm_ref,
                    detail=e.detail,
                )
                failed.append(uri)
                continue
            except Exception:
                log.failure("looking up {vm_ref!r} on {uri}", vm_ref=vm_ref, uri=uri)
                failed.append(uri)
                continue
            if vm is not None:
                log.debug("found {vm_ref!r} on {uri}", vm_ref=vm_ref, uri=uri)
                return vm
        if failed:
            raise ConsoleError(
                ErrorCode.INTERNAL_ERROR, "The virtualization host could not be reached"
            )
        raise ConsoleError(ErrorCode.VM_NOT_FOUND)

    def open_graphics(self, target: Any) -> "Deferred[int]":
        """
        A connected socket (its file descriptor, which the caller closes)
        to console C{target.graphics} of VM C{target.vm_uuid}, from libvirt
        (C{virDomainOpenGraphicsFD} with C{SKIPAUTH}: QEMU's C{add_client}
        with C{skipauth}, so the VM asks no password); for consoles with no
        listener.  Fails with CONNECTION_FAILED (the reason is logged).
        """
        uri, vm_uuid, device = target.hypervisor, target.vm_uuid, target.graphics.device
        d = self._in_pool(self._blocking.open_graphics_on, uri, vm_uuid, device)

        def failed(f: Any) -> None:
            detail = f.value.detail if f.check(HypervisorFailed) else str(f.value)
            log.warn(
                "libvirt did not open graphics {device} of {vm_uuid} on {uri}: {detail}",
                device=device,
                vm_uuid=vm_uuid,
                uri=uri,
                detail=detail,
            )
            raise ConsoleError(ErrorCode.CONNECTION_FAILED)

        d.addErrback(failed)
        return d

    def check(self) -> "Deferred[Mapping[str, str]]":
        """
        C{{uri: "ok" | short error}} for every hypervisor (for /readyz).
        The short error names no host; the detail is logged.
        """

        def one(uri: str) -> Deferred:
            d = self._in_pool(self._blocking.check_on, uri)

            def failed(f: Any) -> Tuple[str, str]:
                if f.check(HypervisorFailed):
                    log.warn("hypervisor {uri} not ready: {detail}", uri=uri, detail=f.value.detail)
                    return uri, f.value.short
                log.failure("checking hypervisor {uri}", f, uri=uri)
                return uri, "error"

            d.addCallbacks(lambda _: (uri, "ok"), failed)
            return d

        d = gatherResults([one(uri) for uri in self._order])
        d.addCallback(dict)
        return d

    def close(self) -> "Deferred[None]":
        """
        Close every cached connection (at shutdown, before the pool stops).
        """
        self._cache.invalidate()
        # Only hypervisors with an open connection need the pool.
        open_uris = [uri for uri in self._order if self._slots[uri].conn is not None]
        return gatherResults(
            [self._in_pool(self._connections.drop, uri, None) for uri in open_uris]
        ).addCallback(lambda _: None)


class _PoolSide:
    """
    The locator's libvirt calls: every method blocks, so runs on the
    thread pool only (logging through C{log_from_pool}).
    """

    def __init__(self, libvirt: Any, connections: Connections, log_from_pool: Callable[..., None]):
        self._libvirt = libvirt
        self._connections = connections
        self._slots = connections.slots
        self._log_from_pool = log_from_pool

    def _lookup(self, conn: Any, vm_ref: str) -> Any:
        if UUID_RE.match(vm_ref):
            try:
                return conn.lookupByUUIDString(vm_ref)
            except self._libvirt.libvirtError as e:
                if error_code(e)[0] != VIR_ERR_INVALID_ARG:
                    raise
        return conn.lookupByName(vm_ref)

    def _describe(self, uri: str, dom: Any) -> VMConsoles:
        lv = self._libvirt
        try:
            xml = dom.XMLDesc(lv.VIR_DOMAIN_XML_SECURE)
        except lv.libvirtError as e:
            if self._connections.is_connection_error(e) or error_code(e)[0] == VIR_ERR_NO_DOMAIN:
                raise
            # A read-only or restricted connection refuses the secure XML:
            # go on without passwords, but say so.
            self._log_from_pool(
                "warn",
                "{uri} refused the secure domain XML ({error}); console passwords unknown",
                uri=uri,
                error=str(e),
            )
            xml = dom.XMLDesc(0)
        running = bool(dom.isActive())
        config = self._slots[uri].config
        root = parse_domain(xml)
        graphics = graphics_of(root)
        uuid, name = identity_of(root)
        return VMConsoles(
            uuid=uuid or dom.UUIDString().lower(),
            name=name or dom.name(),
            running=running,
            graphics=graphics,
            hypervisor=uri,
            console_host=config.console_host,
            local=is_local(config),
            spice_tls=config.spice_tls is not None,
            open_graphics=config.open_graphics,
        )

    def locate_on(self, uri: str, vm_ref: str) -> Optional[VMConsoles]:
        """
        C{vm_ref} on hypervisor C{uri}, or C{None} when it does not know it.
        """

        def action(conn: Any) -> VMConsoles:
            return self._describe(uri, self._lookup(conn, vm_ref))

        try:
            return self._connections.with_connection(uri, action)
        except self._libvirt.libvirtError as e:
            code, _ = error_code(e)
            if code == VIR_ERR_NO_DOMAIN:
                return None
            if code == VIR_ERR_INVALID_ARG:
                # Not a name libvirt accepts: no such domain here.
                return None
            raise HypervisorFailed(f"libvirt error {code}: {e}", f"error (libvirt code {code})") from None

    def open_graphics_on(self, uri: str, vm_uuid: str, device: int) -> int:
        if uri not in self._slots:
            raise HypervisorFailed(f"{uri} is not a configured hypervisor", "unknown")
        flags = getattr(self._libvirt, "VIR_DOMAIN_OPEN_GRAPHICS_SKIPAUTH", 1)

        def action(conn: Any) -> int:
            return conn.lookupByUUIDString(vm_uuid).openGraphicsFD(device, flags)

        return self._connections.with_connection(uri, action)

    def check_on(self, uri: str) -> None:
        try:
            self._connections.with_connection(uri, lambda conn: conn.getLibVersion())
        except self._libvirt.libvirtError as e:
            code, _ = error_code(e)
            raise HypervisorFailed(f"libvirt error {code}: {e}", f"error (libvirt code {code})") from None
