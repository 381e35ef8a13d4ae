"""
The pure parts of L{vaporproxy.demo} (shared with the e2e fixture): the
domain XML, reading assigned ports back, and the generated config.
"""

from __future__ import annotations

from twisted.trial import unittest

from vaporproxy.config import parse_config
from vaporproxy.vm.domain import graphics_from_domain_xml
from vaporproxy.demo import domain_xml, live_graphics_ports, proxy_config_text, sha256_hex
from vaporproxy.demo.run import _banner, demo_config_text

UUID = "5b1f4a8e-0c1d-4f6e-9a7b-2c3d4e5f6a7b"
LIVE_XML = b"""<domain type='qemu'><name>d</name><devices>
<graphics type='vnc' port='5950' autoport='yes' listen='127.0.0.1'/>
<graphics type='spice' port='5951' autoport='yes'><listen type='address' address='127.0.0.1'/></graphics>
</devices></domain>"""


class DomainXMLTests(unittest.SynchronousTestCase):
    """
    The demo VM's domain XML.
    """

    def test_both_consoles_with_passwords(self) -> None:
        """
        When the demo domain XML is parsed by the proxy's own parser, it has
        a VNC and a SPICE console on 127.0.0.1, each with its password.
        """
        xml = domain_xml("demo", UUID, "vncpw", "spicepw").encode()
        graphics = graphics_from_domain_xml(xml)
        self.assertEqual(
            [(g.type, g.listen, g.password, g.autoport) for g in graphics],
            [("vnc", "127.0.0.1", "vncpw", True), ("spice", "127.0.0.1", "spicepw", True)],
        )

    def test_live_ports(self) -> None:
        """
        When a running domain's XML carries assigned ports, they are read
        back per console type.
        """
        self.assertEqual(live_graphics_ports(LIVE_XML), {"vnc": 5950, "spice": 5951})


class ProxyConfigTests(unittest.SynchronousTestCase):
    """
    The generated vapor.conf.
    """

    def test_parses_with_overrides(self) -> None:
        """
        When a config is generated with console overrides, the proxy's parser
        accepts it and sees the port, hypervisor, hashed key and overrides.
        """
        text = proxy_config_text(
            listen_port=8123,
            hypervisor_uri="qemu:///session?socket=/tmp/s/libvirt-sock",
            api_keys=[{"user": "demo", "sha256": sha256_hex("k"), "vms": ["*"], "admin": True}],
            console={"token_ttl": "1s", "max_connections_per_vm": 1, "allowed_hosts": ["192.0.2.1"]},
        )
        config = parse_config(text)
        self.assertEqual(config.server.listen, ("tcp:8123:interface=127.0.0.1",))
        self.assertEqual(config.hypervisors[0].uri, "qemu:///session?socket=/tmp/s/libvirt-sock")
        self.assertEqual(config.auth.api_keys[0].sha256, sha256_hex("k"))
        self.assertEqual(config.console.token_ttl, 1.0)
        self.assertEqual(config.console.max_connections_per_vm, 1)
        self.assertEqual(config.console.allowed_hosts, ("192.0.2.1",))


class ExtraConfigTests(unittest.SynchronousTestCase):
    """
    C{python3 -m vaporproxy.demo --extra-config FILE}: a person's own sections
    over the demo's vapor.conf.
    """

    def demo(self, extra: str) -> str:
        return demo_config_text("/tmp/wd", 8123, "qemu:///session?socket=/tmp/s", "k", extra)

    def test_sections_merged(self) -> None:
        """
        When the extra config turns recording on and caps bandwidth, the demo's config has both (recordings under its work
        directory) and keeps its listen address, hypervisor and key.
        """
        config = parse_config(self.demo(
            "console: {max_bandwidth: 16}\nrecording: {enabled: true}\n"
            "server: {listen: ['tcp:1:interface=0.0.0.0']}\nhypervisors: [{uri: 'qemu:///system'}]\n"
            "auth: {policies: [{vms: ['vapor-*'], require_mfa: true}]}\n"
        ))  # fmt: skip
        self.assertEqual(config.console.max_bandwidth, 16 * 1024)
        self.assertEqual((config.recording.enabled, config.recording.dir), (True, "/tmp/wd/recordings"))
        self.assertEqual(config.server.listen, ("tcp:8123:interface=127.0.0.1",))
        self.assertEqual(config.hypervisors[0].uri, "qemu:///session?socket=/tmp/s")
        self.assertEqual([k.sha256 for k in config.auth.api_keys], [sha256_hex("k")])
        self.assertEqual(config.auth.policies[0].vms, ("vapor-*",))

    def test_bad_extra_config(self) -> None:
        """
        When the extra config is not YAML, not sections, or has a bad value, the error is one line naming the option and the key.
        """
        for extra, expected in [
            ("a: [", "--extra-config: not YAML: "),
            ("[1, 2]", "--extra-config: expected sections"),
            ("console: {max_bandwidth: fast}", "--extra-config: console.max_bandwidth: 'fast' is not a valid integer"),
        ]:
            with self.assertRaises(ValueError) as caught:
                self.demo(extra)
            self.assertTrue(str(caught.exception).startswith(expected), str(caught.exception))
            self.assertNotIn("\n", str(caught.exception))

    def test_banner_links_the_control_room(self) -> None:
        """
        When the demo is up, its banner gives the control room's address with the key in the fragment.
        """
        vm = type("VM", (), {"serial": None, "name": "d", "uuid": UUID, "ports": {"vnc": 1, "spice": 2}})()
        self.assertIn("  Control room: http://127.0.0.1:8080/admin#key=K\n", _banner("http://127.0.0.1:8080", "K", vm))
