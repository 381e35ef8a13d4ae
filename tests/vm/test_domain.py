"""
Tests for L{vaporproxy.vm.domain}: the domain XML parser.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.interfaces import Graphics
from vaporproxy.vm.domain import domain_identity, graphics_from_domain_xml

from .domains import BOTH, SHUT_OFF_AUTOPORT, SPICE_LIVE, UUID2, VNC_LIVE, domain


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


class ProductionGraphicsTests(SynchronousTestCase):
    """
    Tests for the graphics configurations of production hosts: TLS-only
    SPICE, channel modes, UNIX-socket and absent listeners, expiring
    passwords.
    """

    def one(self, graphics: str) -> Graphics:
        (g,) = graphics_from_domain_xml(domain(graphics))
        return g

    def test_tlsPortOnly(self) -> None:
        """
        When a SPICE device has only a tlsPort (spice_tls = 1, no plain port), its port is None and its TLS port is read.
        """
        g = self.one("<graphics type='spice' tlsPort='5901' autoport='yes' listen='127.0.0.1'/>")
        self.assertEqual((g.port, g.tls_port, g.listen_type), (None, 5901, "address"))

    def test_defaultMode(self) -> None:
        """
        When a SPICE device has defaultMode='secure', it is read; an unknown or absent mode reads as 'any'.
        """
        secure = self.one("<graphics type='spice' port='5900' tlsPort='5901' defaultMode='secure'/>")
        odd = self.one("<graphics type='spice' port='5900' defaultMode='sometimes'/>")
        absent = self.one("<graphics type='spice' port='5900'/>")
        self.assertEqual([g.default_mode for g in (secure, odd, absent)], ["secure", "any", "any"])

    def test_channelModes(self) -> None:
        """
        When a SPICE device has <channel name mode> children, they are read in order.
        """
        g = self.one(
            "<graphics type='spice' port='5900' tlsPort='5901'>"
            "<channel name='main' mode='secure'/><channel name='inputs' mode='insecure'/>"
            "<channel name='playback' mode='bogus'/><channel mode='secure'/></graphics>"
        )
        self.assertEqual(g.channel_modes, (("main", "secure"), ("inputs", "insecure"), ("playback", "any")))

    def test_vncModesIgnored(self) -> None:
        """
        When a VNC device carries SPICE-only attributes, they are not read.
        """
        g = self.one("<graphics type='vnc' port='5900' defaultMode='secure'><channel name='main' mode='secure'/></graphics>")
        self.assertEqual((g.default_mode, g.channel_modes), ("any", ()))

    def test_socketListener(self) -> None:
        """
        When a device listens on <listen type='socket' socket=…>, it has a socket path and no ports.
        """
        g = self.one(
            "<graphics type='vnc' port='5900' socket='/run/q/vnc.sock'>"
            "<listen type='socket' socket='/run/q/vnc.sock'/></graphics>"
        )
        self.assertEqual((g.listen_type, g.socket, g.port, g.listen), ("socket", "/run/q/vnc.sock", None, None))

    def test_socketListenerSpice(self) -> None:
        """
        When a SPICE device listens on a UNIX socket, it has neither port nor TLS port.
        """
        g = self.one("<graphics type='spice' tlsPort='5901'><listen type='socket' socket='/run/q/spice.sock'/></graphics>")
        self.assertEqual((g.listen_type, g.socket, g.port, g.tls_port), ("socket", "/run/q/spice.sock", None, None))

    def test_socketNotChosenYet(self) -> None:
        """
        When a socket listener has no path yet (inactive XML), its socket is None.
        """
        g = self.one("<graphics type='vnc'><listen type='socket'/></graphics>")
        self.assertEqual((g.listen_type, g.socket), ("socket", None))

    def test_noListener(self) -> None:
        """
        When a device has <listen type='none'/>, its listen type is 'none' and it has no ports.
        """
        g = self.one("<graphics type='spice' port='5900' autoport='no'><listen type='none'/></graphics>")
        self.assertEqual((g.listen_type, g.port, g.tls_port, g.socket), ("none", None, None, None))

    def test_passwdValidTo(self) -> None:
        """
        When a device has passwdValidTo, it is read as POSIX time (UTC); without it the password does not expire.
        """
        g = self.one("<graphics type='vnc' port='5900' passwd='x' passwdValidTo='2026-12-04T18:00:00'/>")
        self.assertEqual(g.password_valid_to, 1796407200.0)
        self.assertIsNone(self.one("<graphics type='vnc' port='5900' passwd='x'/>").password_valid_to)

    def test_passwdValidToUnreadable(self) -> None:
        """
        When passwdValidTo cannot be read, the password counts as long expired.
        """
        g = self.one("<graphics type='vnc' port='5900' passwd='x' passwdValidTo='next tuesday'/>")
        self.assertEqual(g.password_valid_to, 0.0)

    def test_deviceIndex(self) -> None:
        """
        When a domain has several graphics devices, each knows its position among all of them (libvirt's openGraphicsFD idx), other types counted.
        """
        graphics = graphics_from_domain_xml(
            domain("<graphics type='sdl'/><graphics type='vnc' port='5900'/><graphics type='spice' port='5901'/>")
        )
        self.assertEqual([(g.type, g.index, g.device) for g in graphics], [("vnc", 0, 1), ("spice", 0, 2)])
