"""
Integration tests for L{vaporproxy.vm.libvirt.LibvirtConsoleLocator} against
libvirt's own test driver (node files written here), with a real thread
pool and the real reactor.
"""

from __future__ import annotations

import os
from typing import Any, List, Sequence

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from vaporproxy.config import HypervisorConfig
from vaporproxy.vm.libvirt import LibvirtConsoleLocator
from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.interfaces import Graphics

from .libvirt_fixtures import domain_xml, graphics_xml, node_uri, write_node_file

try:
    import libvirt
except ImportError:  # pragma: no cover
    libvirt = None

UUID_VNC = "3f2504e0-4f89-41d3-9a0c-0305e82c3301"
UUID_SPICE = "3f2504e0-4f89-41d3-9a0c-0305e82c3302"
UUID_OFF = "3f2504e0-4f89-41d3-9a0c-0305e82c3303"
UUID_OTHER = "3f2504e0-4f89-41d3-9a0c-0305e82c3304"

FIRST_NODE = [
    domain_xml("vm-vnc", UUID_VNC, [graphics_xml("vnc", 5901, passwd="vnc-pass")]),
    domain_xml(
        "vm-spice",
        UUID_SPICE,
        [graphics_xml("spice", 5930, tls_port=5931, listen="0.0.0.0"), graphics_xml("vnc", 5902)],
    ),
    domain_xml("vm-off", UUID_OFF, [graphics_xml("vnc", autoport=True)], running=False),
]

SECOND_NODE = [
    domain_xml("vm-other", UUID_OTHER, [graphics_xml("vnc", 5990, listen="127.0.0.2")]),
    # Same name as on the first node: the first hypervisor wins.
    domain_xml("vm-vnc", "3f2504e0-4f89-41d3-9a0c-0305e82c33ff", [graphics_xml("vnc", 5999)]),
]


class LibvirtLocatorIntegrationTests(TestCase):
    """
    Tests for L{LibvirtConsoleLocator} with libvirt's test driver.
    """

    if libvirt is None:
        skip = "libvirt-python is not installed"

    def setUp(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        self.first = node_uri(write_node_file(directory, FIRST_NODE, "first.xml"))
        self.second = node_uri(write_node_file(directory, SECOND_NODE, "second.xml"))
        # Nothing listens on port 1: opening fails with a connection error.
        self.missing = "qemu+tcp://127.0.0.1:1/system"
        self.pool = ThreadPool(minthreads=1, maxthreads=4, name="test-libvirt")
        self.pool.start()
        self.addCleanup(self.pool.stop)

    def locator(self, uris: Sequence[str], console_host: Any = None) -> Any:
        locator = LibvirtConsoleLocator(
            [HypervisorConfig(uri, console_host) for uri in uris], reactor, self.pool
        )
        self.addCleanup(locator.close)
        return locator

    async def _locateMany(self, locator: Any, refs: List[str]) -> List[Any]:
        return [await locator.locate(ref) for ref in refs]

    def test_byUUIDWithPassword(self) -> None:
        """
        When a running domain is looked up by UUID, its VNC console comes
        with the password (read-write connection, secure XML).
        """
        d = self.locator([self.first]).locate(UUID_VNC.upper())

        def check(vm: Any) -> None:
            self.assertEqual((vm.uuid, vm.name, vm.running, vm.hypervisor), (UUID_VNC, "vm-vnc", True, self.first))
            self.assertEqual(vm.graphics, (Graphics("vnc", 0, 5901, None, "127.0.0.1", "vnc-pass", False),))

        return d.addCallback(check)

    def test_byName(self) -> None:
        """
        When a domain is looked up by name, its SPICE and VNC devices come
        in document order.
        """
        d = self.locator([self.first], console_host="192.0.2.10").locate("vm-spice")

        def check(vm: Any) -> None:
            self.assertEqual(vm.uuid, UUID_SPICE)
            self.assertEqual(vm.console_host, "192.0.2.10")
            self.assertEqual(
                [(g.type, g.index, g.port, g.tls_port, g.listen) for g in vm.graphics],
                [("spice", 0, 5930, 5931, "0.0.0.0"), ("vnc", 0, 5902, None, "127.0.0.1")],
            )

        return d.addCallback(check)

    def test_shutOff(self) -> None:
        """
        When a domain is shut off, running is false and its autoport
        console has no port.
        """
        d = self.locator([self.first]).locate(UUID_OFF)

        def check(vm: Any) -> None:
            self.assertFalse(vm.running)
            self.assertEqual((vm.graphics[0].port, vm.graphics[0].autoport), (None, True))

        return d.addCallback(check)

    def test_unknown(self) -> None:
        """
        When neither hypervisor knows the UUID or name, VM_NOT_FOUND.
        """
        locator = self.locator([self.first, self.second])

        async def run() -> None:
            for ref in ["no-such-vm", "3f2504e0-4f89-41d3-9a0c-0305e82c0000"]:
                try:
                    await locator.locate(ref)
                except ConsoleError as e:
                    self.assertIs(e.code, ErrorCode.VM_NOT_FOUND)
                else:
                    self.fail(f"{ref} was found")

        return Deferred.fromCoroutine(run())

    def test_severalHypervisorsInOrder(self) -> None:
        """
        When several hypervisors are configured, a VM only on the second is
        found there, and a name on both is answered by the first.
        """
        locator = self.locator([self.first, self.second])
        d = Deferred.fromCoroutine(self._locateMany(locator, ["vm-other", "vm-vnc"]))

        def check(vms: List[Any]) -> None:
            other, vnc = vms
            self.assertEqual((other.uuid, other.hypervisor, other.graphics[0].listen), (UUID_OTHER, self.second, "127.0.0.2"))
            self.assertEqual((vnc.uuid, vnc.hypervisor), (UUID_VNC, self.first))

        return d.addCallback(check)

    def test_unreachableHypervisorSkipped(self) -> None:
        """
        When the first hypervisor cannot be opened, the second is asked;
        when no other has the VM, INTERNAL_ERROR that names no path.
        """
        locator = self.locator([self.missing, self.second])

        async def run() -> None:
            vm = await locator.locate("vm-other")
            self.assertEqual(vm.uuid, UUID_OTHER)
            try:
                await locator.locate("vm-spice")
            except ConsoleError as e:
                self.assertIs(e.code, ErrorCode.INTERNAL_ERROR)
                self.assertNotIn("127.0.0.1", e.message)
            else:
                self.fail("vm-spice was found")

        return Deferred.fromCoroutine(run())

    def test_reconnectAfterClose(self) -> None:
        """
        When the cached connection is closed under the locator, the next
        lookup opens a new one and succeeds.
        """
        locator = self.locator([self.first])

        async def run() -> None:
            await locator.locate("vm-vnc")
            slot = locator._slots[self.first]
            old = slot.conn
            self.assertIsNotNone(old)
            old.close()
            # The lookup above is cached (running VMs, cache_ttl): drop it
            # so that the next lookup goes to libvirt over the broken one.
            locator.invalidate()
            vm = await locator.locate(UUID_VNC)
            self.assertEqual(vm.graphics[0].password, "vnc-pass")
            self.assertIsNot(slot.conn, old)
            self.assertTrue(slot.conn.isAlive())

        return Deferred.fromCoroutine(run())

    def test_concurrentLookupsShareOneConnection(self) -> None:
        """
        When many lookups run at once on the pool, all succeed over one
        cached connection.
        """
        locator = self.locator([self.first])
        refs = ["vm-vnc", "vm-spice", UUID_OFF] * 4
        d = gatherResults([locator.locate(ref) for ref in refs])

        def check(vms: List[Any]) -> None:
            self.assertEqual([vm.name for vm in vms], ["vm-vnc", "vm-spice", "vm-off"] * 4)
            self.assertIsNotNone(locator._slots[self.first].conn)

        return d.addCallback(check)

    def test_check(self) -> None:
        """
        When checked, reachable hypervisors say ok and an unreachable one a
        short error.
        """
        d = self.locator([self.first, self.missing]).check()
        return d.addCallback(
            self.assertEqual, {self.first: "ok", self.missing: "unreachable"}
        )
