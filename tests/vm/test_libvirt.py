"""
Tests for L{vaporproxy.vm.libvirt}: the libvirt locator over a fake libvirt
module.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from vaporproxy.config import HypervisorConfig, SpiceTLSConfig
from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.interfaces import Graphics, IConsoleLocator, VMConsoles
from vaporproxy.vm.domain import domain_identity, graphics_from_domain_xml
from vaporproxy.vm.hosts import LIBVIRT_HANDOFF
from vaporproxy.vm.libvirt import MAX_CACHE_TTL, LibvirtConsoleLocator
from vaporproxy.vm.target import ConsoleTarget

from .domains import UUID1, UUID2, VNC_LIVE, domain


class FakeLibvirtError(Exception):
    def __init__(self, message: str, code: int, domain: int = 10):
        super().__init__(message)
        self.code = code
        self.domain = domain

    def get_error_code(self) -> int:
        return self.code

    def get_error_domain(self) -> int:
        return self.domain


class FakePool:
    """
    A thread pool that runs work only when told, and records whether work
    is being run.
    """

    def __init__(self) -> None:
        self.queue: List[Any] = []
        self.running = False

    def callInThreadWithCallback(self, onResult: Callable, f: Callable, *a: Any, **kw: Any) -> None:
        self.queue.append((onResult, f, a, kw))

    def run(self) -> int:
        n = 0
        while self.queue:
            onResult, f, a, kw = self.queue.pop(0)
            self.running = True
            try:
                result = f(*a, **kw)
            except BaseException:
                ok, result = False, Failure()
            else:
                ok = True
            finally:
                self.running = False
            onResult(ok, result)
            n += 1
        return n


class FakeReactor:
    def __init__(self) -> None:
        self.pending: List[Any] = []
        self.now = 1000.0

    def seconds(self) -> float:
        return self.now

    def callFromThread(self, f: Callable, *a: Any, **kw: Any) -> None:
        self.pending.append((f, a, kw))

    def run(self) -> int:
        n = 0
        while self.pending:
            f, a, kw = self.pending.pop(0)
            f(*a, **kw)
            n += 1
        return n


class FakeDomain:
    def __init__(self, lv: "FakeLibvirt", xml: bytes, active: bool = True):
        self.lv = lv
        self.xml = xml.decode()
        self.active = active
        self.uuid, self.dname = domain_identity(xml)

    def XMLDesc(self, flags: int) -> str:
        self.lv.record("XMLDesc", flags)
        return self.xml

    def isActive(self) -> int:
        self.lv.record("isActive")
        return int(self.active)

    def UUIDString(self) -> str:
        return self.uuid or ""

    def name(self) -> str:
        return self.dname or ""

    def openGraphicsFD(self, idx: int, flags: int) -> int:
        self.lv.record("openGraphicsFD", idx, flags)
        if self.lv.graphics_error is not None:
            raise self.lv.graphics_error
        return 1000 + idx


class FakeConnection:
    def __init__(self, lv: "FakeLibvirt", uri: str, domains: List[FakeDomain]):
        self.lv = lv
        self.uri = uri
        self.domains = domains
        self.alive = True
        self.closed = False
        self.fail_next: List[FakeLibvirtError] = []

    def _call(self, name: str, *args: Any) -> None:
        self.lv.record(name, self.uri, *args)
        if self.closed:
            raise FakeLibvirtError("invalid connection pointer", 6)
        if self.fail_next:
            raise self.fail_next.pop(0)

    def isAlive(self) -> int:
        self._call("isAlive")
        return int(self.alive)

    def lookupByUUIDString(self, ref: str) -> FakeDomain:
        self._call("lookupByUUIDString", ref)
        if len(ref.replace("-", "")) != 32 or ref in self.lv.invalid_uuids:
            raise FakeLibvirtError("Invalid UUID", 8)
        for d in self.domains:
            if d.uuid == ref.lower():
                return d
        raise FakeLibvirtError("Domain not found", 42)

    def lookupByName(self, ref: str) -> FakeDomain:
        self._call("lookupByName", ref)
        for d in self.domains:
            if d.dname == ref:
                return d
        raise FakeLibvirtError("Domain not found", 42)

    def getLibVersion(self) -> int:
        self._call("getLibVersion")
        return 9000000

    def close(self) -> int:
        self.lv.record("close", self.uri)
        self.closed = True
        return 0


class FakeLibvirt:
    """
    The parts of the libvirt module the locator uses.
    """

    libvirtError = FakeLibvirtError
    VIR_DOMAIN_XML_SECURE = 1

    def __init__(self, pool: FakePool) -> None:
        self.pool = pool
        self.hosts: Dict[str, List[FakeDomain]] = {}
        self.unreachable: Dict[str, str] = {}
        self.connections: List[FakeConnection] = []
        self.calls: List[tuple] = []
        self.off_pool: List[tuple] = []
        self.handlers: List[Any] = []
        self.invalid_uuids: set = set()
        self.graphics_error: Optional[FakeLibvirtError] = None

    def record(self, *call: Any) -> None:
        self.calls.append(call)
        if not self.pool.running:
            self.off_pool.append(call)

    def registerErrorHandler(self, f: Any, ctx: Any) -> None:
        self.handlers.append((f, ctx))

    def open(self, uri: str) -> FakeConnection:
        self.record("open", uri)
        if uri in self.unreachable:
            raise FakeLibvirtError(self.unreachable[uri], 38, 7)
        conn = FakeConnection(self, uri, self.hosts.setdefault(uri, []))
        self.connections.append(conn)
        return conn


class FakeLibvirtCase(SynchronousTestCase):
    """
    A test case with a fake libvirt module, pool and reactor, and L{drive}.
    """

    def setUp(self) -> None:
        self.pool = FakePool()
        self.reactor = FakeReactor()
        self.lv = FakeLibvirt(self.pool)

    def drive(self, d: Any) -> Any:
        """
        Run the pool and the reactor's thread calls until nothing is left.
        """
        while self.pool.run() + self.reactor.run():
            pass
        return d


class LibvirtConsoleLocatorTests(FakeLibvirtCase):
    """
    Tests for L{LibvirtConsoleLocator} with a fake libvirt module, pool and
    reactor.
    """

    def setUp(self) -> None:
        super().setUp()
        self.lv.hosts["qemu+ssh://h1/system"] = [FakeDomain(self.lv, VNC_LIVE)]
        self.lv.hosts["qemu+ssh://h2/system"] = [
            FakeDomain(self.lv, domain("<graphics type='spice' port='5930' listen='0.0.0.0'/>", "db2", UUID2))
        ]
        self.locator = LibvirtConsoleLocator(
            [HypervisorConfig("qemu+ssh://h1/system"), HypervisorConfig("qemu+ssh://h2/system", "198.51.100.7")],
            self.reactor,
            self.pool,  # type: ignore[arg-type]
            libvirt_module=self.lv,
            # These tests are about the libvirt path: no lookup cache
            # (LocatorCacheTests covers it).
            cache_ttl=0,
        )

    def calls(self, name: str) -> List[tuple]:
        return [c for c in self.lv.calls if c[0] == name]

    def test_interface(self) -> None:
        """
        When built, the locator provides IConsoleLocator and silenced
        libvirt's error printing.
        """
        verifyObject(IConsoleLocator, self.locator)
        self.assertEqual(len(self.lv.handlers), 1)
        self.assertIsNone(self.lv.handlers[0][0](None, None))

    def test_localAndSpiceTLS(self) -> None:
        """
        When a VM is found, it says whether its hypervisor is local and has spice_tls, as the hypervisor's settings say.
        """
        lv = FakeLibvirt(self.pool)
        lv.hosts["qemu:///system"] = [FakeDomain(lv, VNC_LIVE)]
        lv.hosts["qemu+ssh://h1/system"] = [FakeDomain(lv, domain("", "db2", UUID2))]
        locator = LibvirtConsoleLocator(
            [HypervisorConfig("qemu:///system", spice_tls=SpiceTLSConfig()), HypervisorConfig("qemu+ssh://h1/system")],
            self.reactor,
            self.pool,  # type: ignore[arg-type]
            libvirt_module=lv,
            cache_ttl=0,
        )
        web1 = self.successResultOf(self.drive(locator.locate("web1")))
        db2 = self.successResultOf(self.drive(locator.locate("db2")))
        self.assertEqual([(web1.local, web1.spice_tls), (db2.local, db2.spice_tls)], [(True, True), (False, False)])

    def test_openGraphics(self) -> None:
        """
        When a console without a listener is opened, libvirt's openGraphicsFD is called on the pool with the device index and SKIPAUTH, and its descriptor is the answer.
        """
        g = Graphics("vnc", 0, None, listen_type="none", device=2)
        target = ConsoleTarget(LIBVIRT_HANDOFF, g, "qemu+ssh://h1/system", LIBVIRT_HANDOFF, UUID1)
        d = self.locator.open_graphics(target)
        self.assertNoResult(d)
        self.assertEqual(self.successResultOf(self.drive(d)), 1002)
        self.assertEqual(self.calls("openGraphicsFD"), [("openGraphicsFD", 2, 1)])
        self.assertEqual(self.lv.off_pool, [])

    def test_openGraphicsFails(self) -> None:
        """
        When libvirt refuses to open the graphics, the answer is CONNECTION_FAILED and the reason is logged.
        """
        events: List[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.lv.graphics_error = FakeLibvirtError("Operation not supported: can't open graphics", 84)
        target = ConsoleTarget(LIBVIRT_HANDOFF, Graphics("spice", 0, None, listen_type="none"), "qemu+ssh://h1/system", "", UUID1)
        error = self.failureResultOf(self.drive(self.locator.open_graphics(target)), ConsoleError).value
        self.assertIs(error.code, ErrorCode.CONNECTION_FAILED)
        self.assertIn("can't open graphics", [e for e in events if "detail" in e][-1]["detail"])

    def test_nothingBeforeThePoolRuns(self) -> None:
        """
        When locate is called, no libvirt call happens until the pool runs
        the work, and every call happens on the pool.
        """
        d = self.locator.locate("web1")
        self.assertEqual(self.lv.calls, [])
        self.assertNoResult(d)
        self.drive(d)
        self.assertTrue(self.lv.calls)
        self.assertEqual(self.lv.off_pool, [])

    def test_byName(self) -> None:
        """
        When a VM is looked up by name, its consoles, UUID, state and
        hypervisor are answered, from the secure XML.
        """
        result = self.successResultOf(self.drive(self.locator.locate("web1")))
        self.assertEqual(
            result,
            VMConsoles(UUID1, "web1", True, graphics_from_domain_xml(VNC_LIVE), "qemu+ssh://h1/system", None),
        )
        self.assertEqual(result.graphics[0].password, "s3cret")
        self.assertEqual(self.calls("XMLDesc"), [("XMLDesc", 1)])
        self.assertEqual(self.calls("lookupByUUIDString"), [])

    def test_byUUIDOnSecondHypervisor(self) -> None:
        """
        When a UUID is unknown to the first hypervisor, the second is asked
        and its console_host is carried.
        """
        result = self.successResultOf(self.drive(self.locator.locate(UUID2.upper())))
        self.assertEqual((result.name, result.hypervisor, result.console_host), ("db2", "qemu+ssh://h2/system", "198.51.100.7"))
        self.assertEqual(
            [c[1] for c in self.calls("lookupByUUIDString")],
            ["qemu+ssh://h1/system", "qemu+ssh://h2/system"],
        )
        self.assertEqual(self.calls("lookupByName"), [])

    def test_uuidInvalidArgFallsBackToName(self) -> None:
        """
        When the UUID lookup says invalid argument, the ref is looked up by
        name.
        """
        ref = "0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d"
        self.lv.invalid_uuids.add(ref)
        self.lv.hosts["qemu+ssh://h1/system"].append(
            FakeDomain(self.lv, domain("", name=ref, uuid="11111111-2222-3333-4444-555555555555"))
        )
        result = self.successResultOf(self.drive(self.locator.locate(ref)))
        self.assertEqual(result.uuid, "11111111-2222-3333-4444-555555555555")
        self.assertEqual([c[2] for c in self.calls("lookupByName")], [ref])

    def test_notFound(self) -> None:
        """
        When no hypervisor knows the VM, VM_NOT_FOUND.
        """
        f = self.failureResultOf(self.drive(self.locator.locate("nope")), ConsoleError)
        self.assertIs(f.value.code, ErrorCode.VM_NOT_FOUND)

    def test_emptyRef(self) -> None:
        """
        When the ref is empty, VM_NOT_FOUND without any libvirt call.
        """
        f = self.failureResultOf(self.drive(self.locator.locate("")), ConsoleError)
        self.assertIs(f.value.code, ErrorCode.VM_NOT_FOUND)
        self.assertEqual(self.lv.calls, [])

    def test_oneConnectionPerURI(self) -> None:
        """
        When several lookups are made, each hypervisor is opened once.
        """
        for _ in range(3):
            self.successResultOf(self.drive(self.locator.locate("db2")))
        self.assertEqual(
            [c[1] for c in self.calls("open")], ["qemu+ssh://h1/system", "qemu+ssh://h2/system"]
        )

    def test_reconnectWhenNotAlive(self) -> None:
        """
        When the cached connection is no longer alive, it is closed and a
        new one opened.
        """
        self.successResultOf(self.drive(self.locator.locate("web1")))
        first = self.lv.connections[0]
        first.alive = False
        self.successResultOf(self.drive(self.locator.locate("web1")))
        self.assertTrue(first.closed)
        self.assertEqual(len(self.calls("open")), 2)

    def test_reconnectWhenIsAliveFails(self) -> None:
        """
        When isAlive itself fails (a closed connection pointer), the
        connection is replaced.
        """
        self.successResultOf(self.drive(self.locator.locate("web1")))
        first = self.lv.connections[0]
        first.fail_next = [FakeLibvirtError("invalid connection pointer", 6)]
        result = self.successResultOf(self.drive(self.locator.locate("web1")))
        self.assertEqual(result.name, "web1")
        self.assertEqual(len(self.calls("open")), 2)
        self.assertTrue(first.closed)

    def test_retryAfterLookupFailsWithConnectionError(self) -> None:
        """
        When the lookup itself fails with an RPC error on a connection that
        looked alive, the connection is replaced and the lookup retried.
        """
        self.successResultOf(self.drive(self.locator.locate("web1")))
        first = self.lv.connections[0]
        original = first.lookupByName

        def broken(ref: str) -> Any:
            first.lookupByName = original  # type: ignore[method-assign]
            raise FakeLibvirtError("End of file while reading data", 38, 7)

        first.lookupByName = broken  # type: ignore[method-assign]
        result = self.successResultOf(self.drive(self.locator.locate("web1")))
        self.assertEqual(result.uuid, UUID1)
        self.assertTrue(first.closed)
        self.assertEqual(len(self.lv.connections), 2)

    def test_unreachableThenFound(self) -> None:
        """
        When the first hypervisor is unreachable but the second has the VM,
        the VM is answered.
        """
        self.lv.unreachable["qemu+ssh://h1/system"] = "unable to connect to server at 'h1:22'"
        result = self.successResultOf(self.drive(self.locator.locate("db2")))
        self.assertEqual(result.uuid, UUID2)
        self.flushLoggedErrors()

    def test_unreachableAndNotFound(self) -> None:
        """
        When a hypervisor is unreachable and no other has the VM,
        INTERNAL_ERROR with a message that names no host.
        """
        self.lv.unreachable["qemu+ssh://h1/system"] = "unable to connect to server at 'h1:22'"
        f = self.failureResultOf(self.drive(self.locator.locate("nope")), ConsoleError)
        self.assertIs(f.value.code, ErrorCode.INTERNAL_ERROR)
        self.assertNotIn("h1", f.value.message)

    def test_unreachableBackoff(self) -> None:
        """
        When a hypervisor cannot be opened, it is not tried again until the
        backoff has passed, and then it is.
        """
        self.lv.unreachable["qemu+ssh://h1/system"] = "connection refused"
        self.successResultOf(self.drive(self.locator.locate("db2")))
        self.successResultOf(self.drive(self.locator.locate("db2")))
        self.assertEqual(len([c for c in self.calls("open") if c[1] == "qemu+ssh://h1/system"]), 1)
        del self.lv.unreachable["qemu+ssh://h1/system"]
        self.reactor.now += 2.5
        result = self.successResultOf(self.drive(self.locator.locate("web1")))
        self.assertEqual(result.hypervisor, "qemu+ssh://h1/system")

    def test_poolLogsGoThroughReactor(self) -> None:
        """
        When the pool side logs (a reconnect), the event is emitted only
        when the reactor runs the queued call.
        """
        events: List[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        d = self.locator.locate("web1")
        self.pool.run()
        self.assertFalse([e for e in events if e.get("log_namespace") == "vaporproxy.consoles"])
        self.reactor.run()
        self.drive(d)
        self.assertTrue([e for e in events if "connected to hypervisor" in e.get("log_format", "")])

    def test_secureXMLRefused(self) -> None:
        """
        When the secure XML is refused, the plain XML is used.
        """
        dom = self.lv.hosts["qemu+ssh://h1/system"][0]
        plain = dom.XMLDesc

        def xmldesc(flags: int) -> str:
            if flags:
                raise FakeLibvirtError("operation forbidden: read only access", 55)
            return plain(flags)

        dom.XMLDesc = xmldesc  # type: ignore[method-assign]
        result = self.successResultOf(self.drive(self.locator.locate("web1")))
        self.assertEqual(result.graphics[0].port, 5901)

    def test_stoppedDomain(self) -> None:
        """
        When the domain is not active, running is false.
        """
        self.lv.hosts["qemu+ssh://h1/system"].append(
            FakeDomain(self.lv, domain("", "off1", "11111111-2222-3333-4444-555555555555"), active=False)
        )
        result = self.successResultOf(self.drive(self.locator.locate("off1")))
        self.assertFalse(result.running)

    def test_badXML(self) -> None:
        """
        When a hypervisor gives malformed XML, INTERNAL_ERROR.
        """
        self.lv.hosts["qemu+ssh://h1/system"][0].xml = "<domain><oops"
        f = self.failureResultOf(self.drive(self.locator.locate("web1")), ConsoleError)
        self.assertIs(f.value.code, ErrorCode.INTERNAL_ERROR)
        self.flushLoggedErrors()

    def test_check(self) -> None:
        """
        When checked, every hypervisor reports ok or a short error naming no
        host.
        """
        self.lv.unreachable["qemu+ssh://h2/system"] = "unable to connect to server at 'h2:22'"
        result = self.successResultOf(self.drive(self.locator.check()))
        self.assertEqual(result, {"qemu+ssh://h1/system": "ok", "qemu+ssh://h2/system": "unreachable"})
        self.assertEqual(self.lv.off_pool, [])

    def test_close(self) -> None:
        """
        When closed, every cached connection is closed.
        """
        self.successResultOf(self.drive(self.locator.locate("db2")))
        self.successResultOf(self.drive(self.locator.close()))
        self.assertTrue(all(c.closed for c in self.lv.connections))


class LocatorCacheTests(FakeLibvirtCase):
    """
    Tests for the short-lived lookup cache of L{LibvirtConsoleLocator}.
    """

    def setUp(self) -> None:
        super().setUp()
        self.web1 = FakeDomain(self.lv, VNC_LIVE)
        self.lv.hosts["qemu+ssh://h1/system"] = [self.web1]
        self.locator = LibvirtConsoleLocator(
            [HypervisorConfig("qemu+ssh://h1/system")],
            self.reactor,
            self.pool,  # type: ignore[arg-type]
            libvirt_module=self.lv,
            cache_ttl=1.0,
        )

    def lookups(self) -> int:
        return len([c for c in self.lv.calls if c[0] in ("lookupByName", "lookupByUUIDString")])

    def test_repeatWithinTTLAnsweredAtOnce(self) -> None:
        """
        When a running VM is looked up again within the TTL, the answer is
        given at once, without a pool hop or a libvirt call.
        """
        first = self.successResultOf(self.drive(self.locator.locate("web1")))
        calls = len(self.lv.calls)
        self.reactor.now += 0.9
        d = self.locator.locate("web1")
        self.assertEqual(self.pool.queue, [])
        self.assertIs(self.successResultOf(d), first)
        self.assertEqual(len(self.lv.calls), calls)

    def test_uuidHitsAfterNameLookup(self) -> None:
        """
        When a VM was looked up by name, a lookup by its UUID in any
        spelling within the TTL is answered from the cache.
        """
        first = self.successResultOf(self.drive(self.locator.locate("web1")))
        for ref in (UUID1, UUID1.upper(), UUID1.replace("-", "")):
            self.assertIs(self.successResultOf(self.locator.locate(ref)), first)
        self.assertEqual(self.lookups(), 1)

    def test_expiresAfterTTL(self) -> None:
        """
        When the TTL has passed, the VM is looked up in libvirt again and a
        change (here a new password) is seen.
        """
        self.successResultOf(self.drive(self.locator.locate("web1")))
        self.web1.xml = self.web1.xml.replace("s3cret", "n3w")
        self.reactor.now += 1.0
        d = self.locator.locate("web1")
        self.assertNoResult(d)
        result = self.successResultOf(self.drive(d))
        self.assertEqual(result.graphics[0].password, "n3w")
        self.assertEqual(self.lookups(), 2)

    def test_stoppedVMNotCached(self) -> None:
        """
        When the VM is not running, the answer is not cached: the next
        lookup asks libvirt (and sees it started).
        """
        self.web1.active = False
        self.assertFalse(self.successResultOf(self.drive(self.locator.locate("web1"))).running)
        self.web1.active = True
        d = self.locator.locate("web1")
        self.assertNoResult(d)
        self.assertTrue(self.successResultOf(self.drive(d)).running)

    def test_stoppedVMDropsOtherEntries(self) -> None:
        """
        When a lookup finds the VM stopped, the entry cached under its UUID
        is dropped too: the console WebSocket, which looks up by UUID,
        sees the VM stopped.
        """
        self.successResultOf(self.drive(self.locator.locate(UUID1)))
        self.web1.active = False
        self.assertFalse(self.successResultOf(self.drive(self.locator.locate("web1"))).running)
        d = self.locator.locate(UUID1)
        self.assertNoResult(d)
        self.assertFalse(self.successResultOf(self.drive(d)).running)

    def test_failureNotCachedAndDropsEntry(self) -> None:
        """
        When a lookup fails (the VM is gone), nothing is cached for it and
        the old entry is dropped: the next lookup asks libvirt again.
        """
        self.successResultOf(self.drive(self.locator.locate("web1")))
        self.reactor.now += 1.0
        self.lv.hosts["qemu+ssh://h1/system"].remove(self.web1)
        f = self.failureResultOf(self.drive(self.locator.locate("web1")), ConsoleError)
        self.assertIs(f.value.code, ErrorCode.VM_NOT_FOUND)
        self.reactor.now -= 0.5  # even a clock going back finds no entry
        d = self.locator.locate("web1")
        self.assertNoResult(d)
        self.failureResultOf(self.drive(d), ConsoleError)

    def test_invalidateDropsEveryEntryOfTheVM(self) -> None:
        """
        When invalidated by name, the entries under the name and the UUID
        are both dropped; invalidate() with no argument drops everything.
        """
        self.successResultOf(self.drive(self.locator.locate("web1")))
        self.locator.invalidate("web1")
        d = self.locator.locate(UUID1)
        self.assertNoResult(d)
        self.successResultOf(self.drive(d))
        self.locator.invalidate()
        d = self.locator.locate(UUID1)
        self.assertNoResult(d)
        self.successResultOf(self.drive(d))

    def test_closeEmptiesCache(self) -> None:
        """
        When closed, the cache is emptied.
        """
        self.successResultOf(self.drive(self.locator.locate("web1")))
        self.successResultOf(self.drive(self.locator.close()))
        d = self.locator.locate("web1")
        self.assertNoResult(d)

    def test_zeroTTLTurnsCacheOff(self) -> None:
        """
        When cache_ttl is 0, every lookup asks libvirt.
        """
        locator = LibvirtConsoleLocator(
            [HypervisorConfig("qemu+ssh://h1/system")], self.reactor, self.pool,  # type: ignore[arg-type]
            libvirt_module=self.lv, cache_ttl=0,
        )
        self.successResultOf(self.drive(locator.locate("web1")))
        d = locator.locate("web1")
        self.assertNoResult(d)
        self.successResultOf(self.drive(d))
        self.assertEqual(self.lookups(), 2)

    def test_ttlBounded(self) -> None:
        """
        When cache_ttl is negative or above MAX_CACHE_TTL, ValueError.
        """
        for ttl in (-1, MAX_CACHE_TTL + 0.1):
            self.assertRaises(
                ValueError, LibvirtConsoleLocator, [], self.reactor, self.pool,
                libvirt_module=self.lv, cache_ttl=ttl,
            )
