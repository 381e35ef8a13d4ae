"""
Tests for L{vaporproxy.vm.libvirt}: the domain XML parser, console selection,
the dial address, and the libvirt locator over a fake libvirt module.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from vaporproxy.config import HypervisorConfig
from vaporproxy.vm.libvirt import (
    MAX_CACHE_TTL,
    LibvirtConsoleLocator,
    dial_host,
    domain_identity,
    graphics_from_domain_xml,
    hypervisor_host,
    select_console,
)
from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.interfaces import Graphics, IConsoleLocator, VMConsoles

UUID1 = "6c3f0d0e-3a4b-4f0e-9a43-0b1d2c3e4f51"
UUID2 = "0a9b8c7d-6e5f-4a3b-2c1d-0e9f8a7b6c5d"


def domain(devices: str, name: str = "web1", uuid: str = UUID1, running: bool = True) -> bytes:
    """
    A domain XML shaped like what libvirt's live XMLDesc gives.
    """
    domid = " id='3'" if running else ""
    return f"""<domain type='kvm'{domid}>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='KiB'>1048576</memory>
  <vcpu placement='static'>1</vcpu>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type><boot dev='hd'/></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><source file='/var/lib/libvirt/images/{name}.qcow2'/>
      <target dev='vda' bus='virtio'/></disk>
    <input type='tablet' bus='usb'/>
{devices}
    <video><model type='qxl' ram='65536' vram='65536' heads='1' primary='yes'/></video>
  </devices>
</domain>""".encode()


VNC_LIVE = domain(
    """    <graphics type='vnc' port='5901' autoport='yes' listen='127.0.0.1' passwd='s3cret'>
      <listen type='address' address='127.0.0.1'/>
    </graphics>"""
)

SPICE_LIVE = domain(
    """    <graphics type='spice' port='5930' tlsPort='5931' autoport='yes' listen='0.0.0.0'>
      <listen type='address' address='0.0.0.0'/>
      <channel name='main' mode='secure'/>
      <image compression='auto_glz'/>
    </graphics>"""
)

BOTH = domain(
    """    <graphics type='spice' port='5930' autoport='no' listen='10.0.0.5'/>
    <graphics type='vnc' port='5901' autoport='no' listen='10.0.0.5'/>
    <graphics type='vnc' port='5902' autoport='no' listen='10.0.0.6' passwd=''/>"""
)

SHUT_OFF_AUTOPORT = domain(
    """    <graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1'>
      <listen type='address' address='127.0.0.1'/>
    </graphics>""",
    running=False,
)


class GraphicsFromDomainXMLTests(SynchronousTestCase):
    """
    Tests for L{graphics_from_domain_xml}.
    """

    def test_vncWithPassword(self) -> None:
        """
        When a live domain has a VNC device with a password, its port,
        listen address and password are read.
        """
        self.assertEqual(
            graphics_from_domain_xml(VNC_LIVE),
            (Graphics("vnc", 0, 5901, None, "127.0.0.1", "s3cret", True),),
        )

    def test_spiceWithTLSPort(self) -> None:
        """
        When a SPICE device has port and tlsPort, both are read and there
        is no password.
        """
        (g,) = graphics_from_domain_xml(SPICE_LIVE)
        self.assertEqual((g.type, g.port, g.tls_port, g.listen), ("spice", 5930, 5931, "0.0.0.0"))
        self.assertIsNone(g.password)
        self.assertFalse(g.has_password)

    def test_severalDisplaysIndexedPerType(self) -> None:
        """
        When a domain has several devices, they come in document order with
        an index counted per type.
        """
        found = graphics_from_domain_xml(BOTH)
        self.assertEqual(
            [(g.type, g.index, g.port, g.listen) for g in found],
            [("spice", 0, 5930, "10.0.0.5"), ("vnc", 0, 5901, "10.0.0.5"), ("vnc", 1, 5902, "10.0.0.6")],
        )

    def test_emptyPasswordIsPresentButNotSet(self) -> None:
        """
        When passwd is an empty string it is kept, and has_password is false.
        """
        g = graphics_from_domain_xml(BOTH)[2]
        self.assertEqual(g.password, "")
        self.assertFalse(g.has_password)

    def test_autoportMinusOneHasNoPort(self) -> None:
        """
        When autoport is on and the port is -1 (not assigned), port is None.
        """
        (g,) = graphics_from_domain_xml(SHUT_OFF_AUTOPORT)
        self.assertIsNone(g.port)
        self.assertTrue(g.autoport)

    def test_missingPortIsNone(self) -> None:
        """
        When a device has no port attribute at all, port is None.
        """
        (g,) = graphics_from_domain_xml(domain("<graphics type='vnc' autoport='yes'/>"))
        self.assertEqual((g.port, g.listen), (None, None))

    def test_listenChildWinsOverAttribute(self) -> None:
        """
        When the listen attribute and a <listen type='address'> child
        disagree, the child's address is used.
        """
        (g,) = graphics_from_domain_xml(
            domain(
                "<graphics type='vnc' port='5905' listen='0.0.0.0'>"
                "<listen type='address' address='192.168.1.20'/></graphics>"
            )
        )
        self.assertEqual(g.listen, "192.168.1.20")

    def test_listenChildWithoutAddressFallsBackToAttribute(self) -> None:
        """
        When the <listen> child carries no address, the listen attribute is
        used.
        """
        (g,) = graphics_from_domain_xml(
            domain(
                "<graphics type='vnc' port='5905' listen='192.168.1.21'>"
                "<listen type='address'/></graphics>"
            )
        )
        self.assertEqual(g.listen, "192.168.1.21")

    def test_listenOnlyAttribute(self) -> None:
        """
        When only the listen attribute is given, it is the listen address.
        """
        (g,) = graphics_from_domain_xml(domain("<graphics type='spice' port='5930' listen='::1'/>"))
        self.assertEqual(g.listen, "::1")

    def test_listenNetworkUsesResolvedAddress(self) -> None:
        """
        When a <listen type='network'> child carries the address libvirt
        resolved, that address is used.
        """
        (g,) = graphics_from_domain_xml(
            domain(
                "<graphics type='vnc' port='5907'>"
                "<listen type='network' network='mgmt' address='172.16.0.9'/></graphics>"
            )
        )
        self.assertEqual((g.port, g.listen), (5907, "172.16.0.9"))

    def test_listenSocketHasNoTCPConsole(self) -> None:
        """
        When a device listens on a UNIX socket, it has no port.
        """
        (g,) = graphics_from_domain_xml(
            domain(
                "<graphics type='vnc' port='5901'>"
                "<listen type='socket' socket='/run/libvirt/qemu/vnc.sock'/></graphics>"
            )
        )
        self.assertEqual((g.type, g.port, g.listen), ("vnc", None, None))

    def test_listenNoneHasNoTCPConsole(self) -> None:
        """
        When a SPICE device has <listen type='none'/>, it has no ports.
        """
        (g,) = graphics_from_domain_xml(
            domain("<graphics type='spice' port='5930' tlsPort='5931'><listen type='none'/></graphics>")
        )
        self.assertEqual((g.port, g.tls_port), (None, None))

    def test_socketAttributeHasNoTCPConsole(self) -> None:
        """
        When a VNC device has a socket attribute, it has no port.
        """
        (g,) = graphics_from_domain_xml(domain("<graphics type='vnc' socket='/tmp/vnc.sock'/>"))
        self.assertIsNone(g.port)

    def test_otherTypesIgnored(self) -> None:
        """
        When a domain has sdl, rdp, egl-headless and dbus devices, only VNC
        and SPICE devices are returned.
        """
        found = graphics_from_domain_xml(
            domain(
                "<graphics type='sdl' display=':0.0'/>"
                "<graphics type='rdp' port='3389'/>"
                "<graphics type='egl-headless'/>"
                "<graphics type='dbus'/>"
                "<graphics type='vnc' port='5910'/>"
            )
        )
        self.assertEqual([(g.type, g.index, g.port) for g in found], [("vnc", 0, 5910)])

    def test_noGraphics(self) -> None:
        """
        When a domain has no graphics device, the result is empty.
        """
        self.assertEqual(graphics_from_domain_xml(domain("")), ())

    def test_nonNumericAndOutOfRangePortsAreNone(self) -> None:
        """
        When a port is not a number or out of range, it is None.
        """
        found = graphics_from_domain_xml(
            domain("<graphics type='vnc' port='abc'/><graphics type='vnc' port='70000'/><graphics type='vnc' port='0'/>")
        )
        self.assertEqual([g.port for g in found], [None, None, None])

    def test_acceptsText(self) -> None:
        """
        When given str with an XML declaration (as libvirt's binding
        returns), it is parsed.
        """
        text = "<?xml version='1.0' encoding='UTF-8'?>\n" + VNC_LIVE.decode()
        self.assertEqual(graphics_from_domain_xml(text)[0].port, 5901)  # type: ignore[arg-type]

    def test_identity(self) -> None:
        """
        When asked, the domain's UUID (lower-case) and name are read.
        """
        self.assertEqual(
            domain_identity(domain("", name="db2", uuid=UUID2.upper())), (UUID2, "db2")
        )

    def assertInternalError(self, xml: bytes) -> ConsoleError:
        error = self.assertRaises(ConsoleError, graphics_from_domain_xml, xml)
        self.assertIs(error.code, ErrorCode.INTERNAL_ERROR)
        return error

    def test_malformed(self) -> None:
        """
        When the XML is malformed, INTERNAL_ERROR with a client-safe message
        is raised.
        """
        error = self.assertInternalError(b"<domain><devices><graphics type='vnc'")
        self.assertNotIn("line", error.message)
        self.assertNotIn("graphics", error.message)

    def test_emptyInput(self) -> None:
        """
        When the XML is empty, INTERNAL_ERROR is raised.
        """
        self.assertInternalError(b"")

    def test_wrongRoot(self) -> None:
        """
        When the root element is not <domain>, INTERNAL_ERROR is raised.
        """
        self.assertInternalError(b"<network><name>default</name></network>")

    def test_billionLaughsRefused(self) -> None:
        """
        When the XML declares nested entities (billion laughs), it is
        refused without expansion.
        """
        xml = (
            b'<?xml version="1.0"?>\n<!DOCTYPE domain [\n<!ENTITY lol "lol">\n'
            + b"".join(
                b'<!ENTITY lol%d "%s">\n' % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
                for i in range(1, 10)
            )
            + b"]>\n<domain><name>&lol9;</name><devices><graphics type='vnc' port='5901'/></devices></domain>"
        )
        self.assertInternalError(xml)

    def test_externalEntityRefused(self) -> None:
        """
        When the XML references an external entity (XXE), it is refused.
        """
        xml = (
            b'<?xml version="1.0"?><!DOCTYPE domain [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
            b"<domain><devices><graphics type='vnc' port='5901' passwd='&xxe;'/></devices></domain>"
        )
        self.assertInternalError(xml)

    def test_externalDTDRefused(self) -> None:
        """
        When the XML names an external DTD, it is refused.
        """
        self.assertInternalError(
            b'<!DOCTYPE domain SYSTEM "http://example.invalid/d.dtd"><domain/>'
        )

    def test_utf16DoctypeRefused(self) -> None:
        """
        When a DTD hides in a UTF-16 document (past a byte scan), the
        parsed document is still refused.
        """
        xml = '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE domain [<!ENTITY a "b">]><domain/>'
        self.assertInternalError(xml.encode("utf-16"))

    def test_tooLarge(self) -> None:
        """
        When the XML is larger than the cap, it is refused.
        """
        self.assertInternalError(b"<domain>" + b" " * (5 * 1024 * 1024) + b"</domain>")


def vm(*graphics: Graphics, running: bool = True, hypervisor: str = "qemu:///system",
       console_host: Optional[str] = None) -> VMConsoles:
    return VMConsoles(UUID1, "web1", running, tuple(graphics), hypervisor, console_host)


class SelectConsoleTests(SynchronousTestCase):
    """
    Tests for L{select_console}.
    """

    spice0 = Graphics("spice", 0, 5930, 5931, "127.0.0.1")
    vnc0 = Graphics("vnc", 0, 5901, None, "127.0.0.1")
    vnc1 = Graphics("vnc", 1, 5902, None, "127.0.0.1")

    def assertCode(self, code: ErrorCode, v: VMConsoles, t: Optional[str], d: Optional[int]) -> str:
        error = self.assertRaises(ConsoleError, select_console, v, t, d)
        self.assertIs(error.code, code)
        return error.message

    def test_firstInDocumentOrder(self) -> None:
        """
        When no type is given, the first device in document order is chosen.
        """
        self.assertEqual(select_console(vm(self.spice0, self.vnc0), None, None), self.spice0)

    def test_byType(self) -> None:
        """
        When a type is given, the first device of that type is chosen.
        """
        self.assertEqual(select_console(vm(self.spice0, self.vnc0, self.vnc1), "vnc", None), self.vnc0)

    def test_byTypeAndDisplay(self) -> None:
        """
        When a type and a display are given, that display is chosen.
        """
        self.assertEqual(select_console(vm(self.spice0, self.vnc0, self.vnc1), "vnc", 1), self.vnc1)

    def test_displayWithoutType(self) -> None:
        """
        When only a display is given, the first device with that index is
        chosen.
        """
        self.assertEqual(select_console(vm(self.spice0, self.vnc0, self.vnc1), None, 1), self.vnc1)

    def test_notRunning(self) -> None:
        """
        When the VM is not running, NO_CONSOLE_AVAILABLE says so.
        """
        message = self.assertCode(ErrorCode.NO_CONSOLE_AVAILABLE, vm(self.vnc0, running=False), None, None)
        self.assertIn("not running", message)

    def test_noGraphics(self) -> None:
        """
        When the VM has no graphics device, NO_CONSOLE_AVAILABLE says so.
        """
        message = self.assertCode(ErrorCode.NO_CONSOLE_AVAILABLE, vm(), "vnc", None)
        self.assertIn("no graphical console", message)

    def test_noneOfType(self) -> None:
        """
        When the VM has no device of the asked type, NO_CONSOLE_AVAILABLE
        names the type.
        """
        message = self.assertCode(ErrorCode.NO_CONSOLE_AVAILABLE, vm(self.vnc0), "spice", None)
        self.assertIn("SPICE", message)

    def test_noSuchDisplay(self) -> None:
        """
        When the display index does not exist, NO_CONSOLE_AVAILABLE names it.
        """
        message = self.assertCode(ErrorCode.NO_CONSOLE_AVAILABLE, vm(self.vnc0), "vnc", 3)
        self.assertIn("display 3", message)

    def test_noPortYet(self) -> None:
        """
        When the chosen device has no port, NO_CONSOLE_AVAILABLE says so.
        """
        message = self.assertCode(
            ErrorCode.NO_CONSOLE_AVAILABLE, vm(Graphics("vnc", 0, None, autoport=True)), None, None
        )
        self.assertIn("no TCP port", message)

    def test_unknownType(self) -> None:
        """
        When the type is neither vnc nor spice, BAD_REQUEST is raised, even
        for a stopped VM.
        """
        self.assertCode(ErrorCode.BAD_REQUEST, vm(self.vnc0, running=False), "rdp", None)

    def test_negativeDisplay(self) -> None:
        """
        When the display is negative, BAD_REQUEST is raised.
        """
        self.assertCode(ErrorCode.BAD_REQUEST, vm(self.vnc0), "vnc", -1)


class DialHostTests(SynchronousTestCase):
    """
    Tests for L{dial_host} and L{hypervisor_host}.
    """

    def test_specificListen(self) -> None:
        """
        When the console listens on a specific address, that address is
        dialled.
        """
        g = Graphics("vnc", 0, 5901, listen="10.1.2.3")
        self.assertEqual(dial_host(vm(g, console_host="192.0.2.1"), g), "10.1.2.3")

    def test_wildcardUsesConsoleHost(self) -> None:
        """
        When the console listens on 0.0.0.0 and console_host is set, the
        console_host is dialled.
        """
        g = Graphics("vnc", 0, 5901, listen="0.0.0.0")
        self.assertEqual(
            dial_host(vm(g, hypervisor="qemu+ssh://h1/system", console_host="192.0.2.1"), g),
            "192.0.2.1",
        )

    def test_wildcardLocalURI(self) -> None:
        """
        When the console listens on a wildcard and the hypervisor is local,
        127.0.0.1 is dialled.
        """
        for listen in ("0.0.0.0", "::", "", None, "[::]", "0:0:0:0:0:0:0:0"):
            g = Graphics("spice", 0, 5930, listen=listen)
            self.assertEqual(dial_host(vm(g, hypervisor="qemu:///system"), g), "127.0.0.1", listen)

    def test_wildcardRemoteURI(self) -> None:
        """
        When the console listens on a wildcard and the hypervisor is
        remote, the URI's host is dialled.
        """
        g = Graphics("vnc", 0, 5901, listen="::")
        self.assertEqual(dial_host(vm(g, hypervisor="qemu+ssh://root@kvm7.example:2222/system"), g), "kvm7.example")

    def test_loopbackOfRemoteHypervisor(self) -> None:
        """
        When a console listens on loopback of a remote hypervisor,
        NO_CONSOLE_AVAILABLE rather than dialling this machine.
        """
        for listen in ("127.0.0.1", "::1", "localhost"):
            g = Graphics("vnc", 0, 5901, listen=listen)
            error = self.assertRaises(ConsoleError, dial_host, vm(g, hypervisor="qemu+ssh://kvm7/system"), g)
            self.assertIs(error.code, ErrorCode.NO_CONSOLE_AVAILABLE)
            self.assertNotIn("kvm7", error.message)

    def test_loopbackOfLoopbackURI(self) -> None:
        """
        When a remote-style URI names this machine, a loopback listen
        address is dialled.
        """
        g = Graphics("vnc", 0, 5901, listen="127.0.0.1")
        self.assertEqual(dial_host(vm(g, hypervisor="qemu+tcp://localhost/system"), g), "127.0.0.1")
        self.assertEqual(dial_host(vm(g, hypervisor="test:///tmp/node.xml"), g), "127.0.0.1")

    def test_hypervisorHost(self) -> None:
        """
        When URIs are local, remote, IPv6 or test-driver files, their host
        part is found or None.
        """
        self.assertIsNone(hypervisor_host("qemu:///system"))
        self.assertIsNone(hypervisor_host("test:///tmp/node.xml"))
        self.assertEqual(hypervisor_host("qemu+tls://[2001:db8::5]/system"), "2001:db8::5")
        self.assertEqual(hypervisor_host("qemu+tcp://h2:16509/system"), "h2")


# ---------------------------------------------------------------------------
# A fake libvirt module, pool and reactor
# ---------------------------------------------------------------------------


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


class LibvirtConsoleLocatorTests(SynchronousTestCase):
    """
    Tests for L{LibvirtConsoleLocator} with a fake libvirt module, pool and
    reactor.
    """

    def setUp(self) -> None:
        self.pool = FakePool()
        self.reactor = FakeReactor()
        self.lv = FakeLibvirt(self.pool)
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

    def drive(self, d: Any) -> Any:
        """
        Run the pool and the reactor's thread calls until nothing is left.
        """
        while self.pool.run() + self.reactor.run():
            pass
        return d

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


class LocatorCacheTests(SynchronousTestCase):
    """
    Tests for the short-lived lookup cache of L{LibvirtConsoleLocator}.
    """

    def setUp(self) -> None:
        self.pool = FakePool()
        self.reactor = FakeReactor()
        self.lv = FakeLibvirt(self.pool)
        self.web1 = FakeDomain(self.lv, VNC_LIVE)
        self.lv.hosts["qemu+ssh://h1/system"] = [self.web1]
        self.locator = LibvirtConsoleLocator(
            [HypervisorConfig("qemu+ssh://h1/system")],
            self.reactor,
            self.pool,  # type: ignore[arg-type]
            libvirt_module=self.lv,
            cache_ttl=1.0,
        )

    def drive(self, d: Any) -> Any:
        """
        Run the pool and the reactor's thread calls until nothing is left.
        """
        while self.pool.run() + self.reactor.run():
            pass
        return d

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
