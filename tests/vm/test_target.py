"""
Tests for L{vaporproxy.vm.target}: console selection and the dial address.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

from twisted.trial.unittest import SynchronousTestCase

from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.interfaces import Graphics, VMConsoles
from vaporproxy.vm.hosts import LIBVIRT_HANDOFF
from vaporproxy.vm.target import channel_uses_tls, console_target, dial_host, hypervisor_host, needs_tls, select_console

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


NOW = 1_800_000_000.0
TLS_ONLY = Graphics("spice", 0, None, 5901, "127.0.0.1")
SECURE_MAIN = Graphics("spice", 0, 5900, 5901, "127.0.0.1", channel_modes=(("main", "secure"),))
SOCKET = Graphics("vnc", 0, None, listen_type="socket", socket="/run/q/vnc.sock")


class ReachableTests(SynchronousTestCase):
    """
    Tests for L{check_reachable} through L{select_console}: consoles this
    proxy cannot open are refused with NO_CONSOLE_AVAILABLE and a reason.
    """

    def refused(self, v: VMConsoles) -> str:
        error = self.assertRaises(ConsoleError, select_console, v, None, None, NOW)
        self.assertIs(error.code, ErrorCode.NO_CONSOLE_AVAILABLE)
        return error.message

    def test_expiredPassword(self) -> None:
        """
        When passwdValidTo has passed, the console is refused as expired; before it, it is chosen.
        """
        expired = Graphics("vnc", 0, 5900, password="x", password_valid_to=NOW)
        valid = Graphics("vnc", 0, 5900, password="x", password_valid_to=NOW + 1)
        self.assertIn("expired", self.refused(vm(expired)))
        self.assertEqual(select_console(vm(valid), None, None, NOW), valid)

    def test_noListener(self) -> None:
        """
        When the console has no listener, it is refused on a remote hypervisor and chosen on a local one (libvirt hands it over), its dial host the hand-over marker.
        """
        g = Graphics("vnc", 0, None, listen_type="none")
        self.assertIn("no listener", self.refused(vm(g)))
        local = replace(vm(g), local=True)
        self.assertEqual(select_console(local, None, None, NOW), g)
        self.assertEqual(dial_host(local, g), LIBVIRT_HANDOFF)

    def test_socketOfRemoteHost(self) -> None:
        """
        When a socket console's hypervisor is not local, it is refused; when it is local, it is chosen.
        """
        self.assertIn("UNIX socket", self.refused(vm(SOCKET)))
        self.assertEqual(select_console(replace(vm(SOCKET), local=True), None, None, NOW), SOCKET)

    def test_socketNotKnown(self) -> None:
        """
        When a local socket console has no path yet, it is refused.
        """
        g = Graphics("vnc", 0, None, listen_type="socket")
        self.assertIn("not known", self.refused(replace(vm(g), local=True)))

    def test_tlsOnlyWithoutSpiceTLS(self) -> None:
        """
        When a SPICE console needs TLS and its hypervisor has no spice_tls, it is refused; with spice_tls it is chosen.
        """
        for g in (TLS_ONLY, SECURE_MAIN, replace(SECURE_MAIN, channel_modes=(), default_mode="secure")):
            self.assertIn("spice_tls", self.refused(vm(g)))
            self.assertEqual(select_console(replace(vm(g), spice_tls=True), None, None, NOW), g)

    def test_secureWithoutTLSPort(self) -> None:
        """
        When a SPICE console is marked secure but has no TLS port yet, it is refused.
        """
        g = Graphics("spice", 0, 5900, None, default_mode="secure")
        self.assertIn("TLS port", self.refused(replace(vm(g), spice_tls=True)))


class OpenGraphicsTests(SynchronousTestCase):
    """
    Tests for consoles a hypervisor with open_graphics hands over, listener or not.
    """

    def test_handedOver(self) -> None:
        """
        When the hypervisor has open_graphics, a TCP console is chosen without its port or TLS settings mattering, its dial host is the hand-over marker and its target says hand over.
        """
        g = Graphics("spice", 0, None, 5901, "127.0.0.1", default_mode="secure")
        v = replace(vm(g), local=True, open_graphics=True)
        self.assertEqual(select_console(v, None, None, NOW), g)
        self.assertEqual(dial_host(v, g), LIBVIRT_HANDOFF)
        self.assertTrue(console_target(v, g, LIBVIRT_HANDOFF, LIBVIRT_HANDOFF).hand_over)
        self.assertFalse(console_target(vm(SECURE_MAIN), SECURE_MAIN, "127.0.0.1", "127.0.0.1").hand_over)


class ChannelTLSTests(SynchronousTestCase):
    """
    Tests for L{channel_uses_tls} and L{needs_tls}: plain or TLS per SPICE
    channel, as libvirt's modes say.
    """

    def test_plainWhenAny(self) -> None:
        """
        When every mode is 'any' and there is a plain port, every channel is plain.
        """
        g = Graphics("spice", 0, 5900, 5901)
        self.assertFalse(needs_tls(g))
        self.assertEqual([channel_uses_tls(g, t) for t in (1, 2, 3, 4, 5)], [False] * 5)

    def test_tlsOnly(self) -> None:
        """
        When there is only a TLS port, every channel is TLS.
        """
        self.assertTrue(needs_tls(TLS_ONLY))
        self.assertEqual([channel_uses_tls(TLS_ONLY, t) for t in (1, 2, 9)], [True] * 3)

    def test_perChannel(self) -> None:
        """
        When main is secure and inputs insecure under defaultMode='secure', main and display are TLS, inputs plain.
        """
        g = Graphics(
            "spice", 0, 5900, 5901, default_mode="secure", channel_modes=(("main", "secure"), ("inputs", "insecure"))
        )
        self.assertEqual([channel_uses_tls(g, t) for t in (1, 2, 3)], [True, True, False])

    def test_securePerChannelOnly(self) -> None:
        """
        When only main is marked secure, main is TLS and the display channel plain.
        """
        self.assertTrue(needs_tls(SECURE_MAIN))
        self.assertEqual([channel_uses_tls(SECURE_MAIN, t) for t in (1, 2)], [True, False])

    def test_missingPort(self) -> None:
        """
        When the mode a channel needs has no port, the dial is refused with NO_CONSOLE_AVAILABLE.
        """
        insecure = Graphics("spice", 0, None, 5901, channel_modes=(("inputs", "insecure"),))
        secure = Graphics("spice", 0, 5900, None, channel_modes=(("main", "secure"),))
        for g, t in ((insecure, 3), (secure, 1)):
            error = self.assertRaises(ConsoleError, channel_uses_tls, g, t)
            self.assertIs(error.code, ErrorCode.NO_CONSOLE_AVAILABLE)


class SocketDialHostTests(SynchronousTestCase):
    """
    Tests for L{dial_host} with UNIX-socket consoles.
    """

    def test_socketPath(self) -> None:
        """
        When the console listens on a UNIX socket, the address is its path.
        """
        self.assertEqual(dial_host(replace(vm(SOCKET), local=True), SOCKET), "/run/q/vnc.sock")
