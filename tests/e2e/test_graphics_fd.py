"""
A VM whose VNC and SPICE consoles have no listener at all
(C{<listen type='none'/>}), opened in noVNC and spice-html5 through the
proxy, which asks the session libvirtd for connected sockets
(C{virDomainOpenGraphicsFD}).
"""

from __future__ import annotations

import os
import re
import uuid as uuidlib
from typing import Optional

from twisted.internet.defer import Deferred

from tests.e2e.fixture import VM_NAME as DEMO_VM, run_driver
from tests.e2e.test_console import E2ETestCase
from vaporproxy.demo import ProxyProcess, domain_xml, free_port, proxy_config_text, sha256_hex

VM_NAME = "vapor-e2e-nolisten"

_vm_defined: Optional[str] = None
_open_graphics_proxy: Optional[ProxyProcess] = None


def with_hypervisor_keys(text: str, keys: str) -> str:
    """C{text} (from L{proxy_config_text}) with C{keys} added to its one hypervisor."""
    uri_line = text.split("hypervisors:\n", 1)[1].split("\n", 1)[0]
    return text.replace(uri_line, uri_line + "\n    " + keys)


def no_listener_xml(name: str, uuid: str) -> str:
    """
    The demo domain with both consoles' listeners replaced by
    C{<listen type='none'/>} (passwords kept: the proxy does not need them),
    and a sound card whose audio goes to SPICE (Opus: playback compression on).
    """
    xml = domain_xml(name, uuid, "vncpw12", "spicepw1234")
    xml = xml.replace(" autoport='yes'", "").replace(" listen='127.0.0.1'", "")
    xml = re.sub(r"<listen type='address' address='127\.0\.0\.1'/>", "<listen type='none'/>", xml)
    xml = xml.replace("<listen type='none'/>\n    </graphics>\n    <video>", "<listen type='none'/>\n      <playback compression='on'/>\n    </graphics>\n    <video>")
    sound = "<sound model='ich9'><audio id='1'/></sound>\n    <audio id='1' type='spice'/>\n    <video>"
    return xml.replace("<video>", sound, 1)


class NoListenerTests(E2ETestCase):
    """
    Consoles without a listener, through libvirt's graphics hand-over.
    """

    def setUp(self) -> None:
        super().setUp()
        global _vm_defined
        if _vm_defined is None:
            conn = self.env.daemon.connect()
            try:
                dom = conn.defineXML(no_listener_xml(VM_NAME, str(uuidlib.uuid4())))
                dom.create()
                live = dom.XMLDesc(0)
            finally:
                conn.close()
            _vm_defined = live
        self.assertIn("<listen type='none'/>", _vm_defined)
        self.assertIn("<audio id='1' type='spice'/>", _vm_defined)
        self.assertNotIn("port=", _vm_defined)

    async def _page(self, console_type: str, min_channels: int) -> dict:
        proxy = self.env.proxy("main")
        step = {
            "kind": "page",
            "url": self.page_url(proxy.base_url, VM_NAME, f"?type={console_type}"),
            "until": "connected",
            "paint": True,
            "timeout_ms": 30000,
        }
        if min_channels:
            step["min_channels"] = min_channels
        [r] = await run_driver({"timeout_ms": 40000, "steps": [step]})
        why = self.explain("main", r)
        self.assertTrue(r.get("reached"), why)
        self.assertEqual(r["vapor"]["type"], console_type, why)
        self.assertGreater(r["canvas"]["nonBackground"], 50, why)
        return r

    def test_novnc(self) -> Deferred:
        """
        When the VNC console has no listener, noVNC connects through the socket libvirt hands over and draws the screen.
        """
        return Deferred.fromCoroutine(self._page("vnc", 0))

    def test_spiceHtml5(self) -> Deferred:
        """
        When the SPICE console has no listener, spice-html5 opens its channels (the sound card's playback channel too), each through its own hand-over, and draws the screen.
        """

        async def go() -> None:
            r = await self._page("spice", 5)
            self.assertGreaterEqual(r["vapor"]["maxChannels"], 5, self.explain("main", r))

        return Deferred.fromCoroutine(go())

    def open_graphics_proxy(self) -> ProxyProcess:
        """
        A proxy with open_graphics on for the shared libvirtd, whose
        allowed_hosts admits no console address: only hand-overs can work.
        """
        global _open_graphics_proxy
        if _open_graphics_proxy is None:
            port = free_port()
            text = proxy_config_text(
                listen_port=port,
                hypervisor_uri=self.env.daemon.uri,
                api_keys=[{"user": "e2e", "sha256": sha256_hex(self.env.key), "vms": ["*"], "admin": True}],
                console={"allowed_hosts": ["192.0.2.1"]},
            )
            path = os.path.join(self.env.workdir, "vapor-open-graphics.conf")
            with open(path, "w") as f:
                f.write(with_hypervisor_keys(text, "open_graphics: true"))
            proxy = ProxyProcess(path, port, log_path=os.path.join(self.env.workdir, "proxy-open-graphics.log"))
            self.env.proxies["open-graphics"] = proxy
            proxy.start()
            _open_graphics_proxy = proxy
        return _open_graphics_proxy

    def test_openGraphicsWithListener(self) -> Deferred:
        """
        When the hypervisor has open_graphics on, the demo VM's VNC console (which has a TCP port) is opened through libvirt's hand-over, though allowed_hosts admits no address, and noVNC draws it.
        """
        proxy = self.open_graphics_proxy()

        async def go() -> None:
            step = {
                "kind": "page",
                "url": self.page_url(proxy.base_url, DEMO_VM, "?type=vnc"),
                "until": "connected",
                "paint": True,
                "timeout_ms": 30000,
            }
            [r] = await run_driver({"timeout_ms": 40000, "steps": [step]})
            why = self.explain("open-graphics", r)
            self.assertTrue(r.get("reached"), why)
            self.assertGreater(r["canvas"]["nonBackground"], 50, why)

        return Deferred.fromCoroutine(go())
