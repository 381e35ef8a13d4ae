"""
Tests for the hypervisor settings of production consoles in
L{vaporproxy.config}: C{spice_tls}, C{local} and socket directories in
C{allowed_hosts}.
"""

from __future__ import annotations

import os
import textwrap

from twisted.trial.unittest import SynchronousTestCase

from vaporproxy.config import ConfigError, HypervisorConfig, SpiceTLSConfig, parse_config
from vaporproxy.tap import check_files
from vaporproxy.vm.libvirt import is_local


def parse(text: str):  # type: ignore[no-untyped-def]
    return parse_config(textwrap.dedent(text))


class SpiceTLSConfigTests(SynchronousTestCase):
    """
    Tests for C{hypervisors[].spice_tls}.
    """

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.ca = os.path.join(self.dir, "ca.pem")
        with open(self.ca, "w") as f:
            f.write("-----BEGIN CERTIFICATE-----\n")

    def test_spiceTls(self) -> None:
        """
        When spice_tls is given, its CA and server_name are kept; absent, it is None.
        """
        config = parse(
            f"""
            hypervisors:
              - uri: "qemu+tls://kvm1/system"
                spice_tls: {{ca_file: {self.ca}, server_name: kvm1.example.com}}
              - uri: "qemu:///system"
            """
        )
        self.assertEqual(
            [h.spice_tls for h in config.hypervisors],
            [SpiceTLSConfig(ca_file=self.ca, server_name="kvm1.example.com"), None],
        )

    def test_noAnonymous(self) -> None:
        """
        When spice_tls carries allow_anonymous (a VeNCrypt-only setting), the key is refused by name.
        """
        error = self.assertRaises(
            ConfigError, parse, "hypervisors: [{uri: 'qemu:///system', spice_tls: {allow_anonymous: true}}]"
        )
        self.assertIn("hypervisors[0].spice_tls.allow_anonymous: unknown key", str(error))

    def test_checkedAtStartAndReload(self) -> None:
        """
        When a spice_tls file is not a certificate, the start-up and SIGHUP file check refuses the config naming the key.
        """
        config = parse(f"hypervisors: [{{uri: 'qemu:///system', spice_tls: {{ca_file: {self.ca}}}}}]")
        error = self.assertRaises(ConfigError, check_files, config)
        self.assertIn("hypervisors[0].spice_tls.ca_file", str(error))

    def test_contradiction(self) -> None:
        """
        When spice_tls turns verification off and names a CA, the error names the key.
        """
        error = self.assertRaises(
            ConfigError, parse, f"hypervisors: [{{uri: 'qemu:///system', spice_tls: {{verify: false, ca_file: {self.ca}}}}}]"
        )
        self.assertIn("hypervisors[0].spice_tls.verify: False ignores ca_file", str(error))


class LocalTests(SynchronousTestCase):
    """
    Tests for C{hypervisors[].local} and L{is_local}.
    """

    def test_inferred(self) -> None:
        """
        When local is not set, a URI without a host is local and one with a host is not.
        """
        config = parse("hypervisors: [{uri: 'qemu:///system'}, {uri: 'qemu+ssh://kvm1/system'}]")
        self.assertEqual([h.local for h in config.hypervisors], [None, None])
        self.assertEqual([is_local(h) for h in config.hypervisors], [True, False])

    def test_explicit(self) -> None:
        """
        When local is set, it wins over the URI.
        """
        config = parse("hypervisors: [{uri: 'qemu:///system', local: false}, {uri: 'qemu+ssh://kvm1/system', local: true}]")
        self.assertEqual([is_local(h) for h in config.hypervisors], [False, True])
        self.assertFalse(is_local(HypervisorConfig("qemu:///system", local=False)))


class SocketDirectoryConfigTests(SynchronousTestCase):
    """
    Tests for socket directories in C{console.allowed_hosts}.
    """

    def test_directories(self) -> None:
        """
        When allowed_hosts has absolute paths, they are kept normalised with one trailing slash beside the hosts.
        """
        config = parse("console: {allowed_hosts: ['127.0.0.1', '/var/lib/libvirt/qemu', '/run//vms/']}")
        self.assertEqual(config.console.allowed_hosts, ("127.0.0.1", "/var/lib/libvirt/qemu/", "/run/vms/"))

    def test_dotDot(self) -> None:
        """
        When a socket directory has '..' in it, it is refused.
        """
        error = self.assertRaises(ConfigError, parse, "console: {allowed_hosts: ['/var/lib/../etc']}")
        self.assertIn("console.allowed_hosts", str(error))


class OpenGraphicsConfigTests(SynchronousTestCase):
    """
    Tests for C{hypervisors[].open_graphics}.
    """

    def test_local(self) -> None:
        """
        When open_graphics is set on a local hypervisor, it is kept; it defaults to false.
        """
        config = parse("hypervisors: [{uri: 'qemu:///system', open_graphics: true}, {uri: 'qemu:///session'}]")
        self.assertEqual([h.open_graphics for h in config.hypervisors], [True, False])

    def test_remote(self) -> None:
        """
        When open_graphics is set on a remote hypervisor (by URI or local: false), the error names the key.
        """
        for hv in ("{uri: 'qemu+ssh://kvm1/system', open_graphics: true}", "{uri: 'qemu:///system', local: false, open_graphics: true}"):
            error = self.assertRaises(ConfigError, parse, f"hypervisors: [{hv}]")
            self.assertIn("hypervisors[0].open_graphics: needs a local hypervisor", str(error))
