"""
Tests for L{vaporproxy.vm.target}: console selection and the dial address.
"""

from __future__ import annotations

from typing import Optional

from twisted.trial.unittest import SynchronousTestCase

from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.interfaces import Graphics, VMConsoles
from vaporproxy.vm.target import dial_host, hypervisor_host, select_console

from .domains import vm


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
