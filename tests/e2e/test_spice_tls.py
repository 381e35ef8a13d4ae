"""
A SPICE console whose every channel is TLS-only, drawn by spice-html5: its
own session libvirtd with C{spice_tls = 1} in qemu.conf (certificates made
here), a VM with C{defaultMode='secure'}, and a proxy with C{spice_tls}.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import tempfile
import uuid as uuidlib
from typing import Dict, Optional

from twisted.internet.defer import Deferred

from tests.e2e.fixture import run_driver
from tests.e2e.test_console import E2ETestCase
from tests.e2e.test_graphics_fd import with_hypervisor_keys
from tests.integration.qemu_fixture import write_x509_credentials
from vaporproxy.demo import ProxyProcess, SessionLibvirtd, domain_xml, free_port, proxy_config_text, sha256_hex

VM_NAME = "vapor-e2e-spice-tls"


class TLSSessionLibvirtd(SessionLibvirtd):
    """
    A session libvirtd whose qemu.conf also has C{extra} lines: libvirtd
    reads it from C{$XDG_CONFIG_HOME/libvirt}, pointed here at a directory
    of our own under C{base} (so the daemon's start-up chowns it too).
    """

    def __init__(self, base: str, extra: str, **kw: object):
        super().__init__(base=base, **kw)  # type: ignore[arg-type]
        self.config_home = os.path.join(base, "tls-config")
        os.makedirs(os.path.join(self.config_home, "libvirt"), exist_ok=True)
        with open(os.path.join(self.config_home, "libvirt", "qemu.conf"), "w") as f:
            f.write(
                'stdio_handler = "file"\n'
                f"remote_display_port_min = {self.port_min}\n"
                f"remote_display_port_max = {self.port_max}\n" + extra
            )

    def _environment(self) -> Dict[str, str]:
        environment = super()._environment()
        environment["XDG_CONFIG_HOME"] = self.config_home
        return environment


class _TLSHost:
    """A session libvirtd whose SPICE servers speak TLS, one secure VM, one proxy."""

    def __init__(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="vapor-e2e-tls-")
        os.chmod(self.workdir, 0o711)
        base = os.path.join(self.workdir, "libvirtd")
        self.certs = write_x509_credentials(os.path.join(base, "pki"), names=("127.0.0.1",))
        cert_dir = os.path.dirname(self.certs["ca-cert.pem"])
        self.daemon = TLSSessionLibvirtd(
            base,
            f'spice_tls = 1\nspice_tls_x509_cert_dir = "{cert_dir}"\n',
            port_min=6100,
            port_max=6149,
            idle_timeout=900,
        )
        self.key = secrets.token_urlsafe(32)
        self.proxy: Optional[ProxyProcess] = None
        self.live_xml = ""

    def start(self) -> "_TLSHost":
        self.daemon.start()
        xml = domain_xml(VM_NAME, str(uuidlib.uuid4()), "vncpw12", "spicepw1234")
        xml = xml.replace("<graphics type='spice' autoport='yes'", "<graphics type='spice' autoport='yes' defaultMode='secure'")
        conn = self.daemon.connect()
        try:
            dom = conn.defineXML(xml)
            dom.create()
            self.live_xml = dom.XMLDesc(0)
        finally:
            conn.close()
        port = free_port()
        text = proxy_config_text(
            listen_port=port,
            hypervisor_uri=self.daemon.uri,
            api_keys=[{"user": "e2e", "sha256": sha256_hex(self.key), "vms": ["*"], "admin": True}],
        )
        text = with_hypervisor_keys(text, f"spice_tls: {{ca_file: \"{self.certs['ca-cert.pem']}\"}}")
        path = os.path.join(self.workdir, "vapor.conf")
        with open(path, "w") as f:
            f.write(text)
        self.proxy = ProxyProcess(path, port, log_path=os.path.join(self.workdir, "proxy.log"))
        self.proxy.start()
        return self

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        self.daemon.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


_host: Optional[_TLSHost] = None


def tls_host() -> _TLSHost:
    global _host
    if _host is None:
        host = _TLSHost()
        atexit.register(host.close)
        _host = host.start()
    return _host


class SpiceTLSPageTests(E2ETestCase):
    """
    spice-html5 against a VM whose SPICE channels are all TLS-only.
    """

    def test_secureChannelsDrawn(self) -> Deferred:
        """
        When every SPICE channel of the VM is secure (defaultMode='secure', spice_tls = 1), spice-html5 opens its four channels in plain SPICE to the proxy, which dials each over TLS, and draws the screen.
        """
        host = tls_host()
        self.assertIn("defaultMode='secure'", host.live_xml)
        self.assertIn("tlsPort=", host.live_xml)
        proxy = host.proxy
        assert proxy is not None

        async def go() -> None:
            step = {
                "kind": "page",
                "url": f"{proxy.base_url}/console/{VM_NAME}?type=spice#key={host.key}",
                "until": "connected",
                "paint": True,
                "min_channels": 4,
                "timeout_ms": 30000,
            }
            [r] = await run_driver({"timeout_ms": 40000, "steps": [step]})
            why = f"browser saw {str(r)[:3000]}\nproxy log:\n{proxy.log_tail()}"
            self.assertTrue(r.get("reached"), why)
            self.assertGreaterEqual(r["vapor"]["maxChannels"], 4, why)
            self.assertGreater(r["canvas"]["nonBackground"], 50, why)

        return Deferred.fromCoroutine(go())
