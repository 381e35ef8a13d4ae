"""
SPICE sound in the browser: a VM on the session libvirtd with a PC speaker
whose audio goes to SPICE (C{<audio type='spice'/>}) and a guest that keeps it sounding
(L{tests.integration.sound_guest}); spice-html5 opens the playback channel
through the proxy and the browser buffers the Opus it receives.
"""

from __future__ import annotations

import uuid as uuidlib
from typing import Optional

from twisted.internet.defer import Deferred

from tests.e2e.fixture import run_driver
from tests.e2e.test_console import E2ETestCase
from tests.integration.sound_guest import ensure_sound_guest
from vaporproxy.demo import domain_xml
from vaporproxy.demo.vm import stage_guest

VM_NAME = "vapor-e2e-sound"

_defined: Optional[str] = None


QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


def sound_domain_xml(name: str, uuid: str, guest: object, serial_path: str) -> str:
    """
    The demo domain booting C{guest}, with its PC speaker's audio going to
    SPICE.  libvirt 9's C{<sound model='pcspk'/>} passes QEMU the C{-soundhw}
    that QEMU 7.2 no longer has, so the speaker is tied to libvirt's SPICE
    audiodev (C{audio1}, from C{<audio id='1' type='spice'/>}) with a
    machine option on QEMU's command line.
    """
    xml = domain_xml(name, uuid, "vncpw12", "spicepw1234", 256, guest=guest, serial_path=serial_path)  # type: ignore[arg-type]
    xml = xml.replace("<domain type='qemu'>", f"<domain type='qemu' xmlns:qemu='{QEMU_NS}'>", 1)
    xml = xml.replace("<video>", "<audio id='1' type='spice'/>\n    <video>", 1)
    speaker = "<qemu:commandline><qemu:arg value='-machine'/><qemu:arg value='pcspk-audiodev=audio1'/></qemu:commandline>"
    return xml.replace("</domain>", speaker + "\n</domain>", 1)


class SoundTests(E2ETestCase):
    """
    Opus from a sounding VM, through the proxy, into spice-html5.
    """

    def setUp(self) -> None:
        super().setUp()
        global _defined
        if _defined is None:
            guest, serial = stage_guest(self.env.daemon, VM_NAME, ensure_sound_guest())
            conn = self.env.daemon.connect()
            try:
                dom = conn.defineXML(sound_domain_xml(VM_NAME, str(uuidlib.uuid4()), guest, serial.path))
                dom.create()
                _defined = dom.XMLDesc(0)
            finally:
                conn.close()
            serial.wait_ready()
        self.assertIn("<audio id='1' type='spice'/>", _defined)

    def test_browserBuffersOpus(self) -> Deferred:
        """
        When the VM sounds, spice-html5 opens the playback channel among its five, makes its <audio> element, and the browser has buffered seconds of the Opus it received.
        """
        proxy = self.env.proxy("main")

        async def go() -> None:
            step = {
                "kind": "page",
                "url": self.page_url(proxy.base_url, VM_NAME, "?type=spice"),
                "until": "connected",
                "min_channels": 5,
                "actions": [{"wait_ms": 5000}],
                # Read window.vapor again after the wait (still connected once).
                "then_connects": 1,
                "timeout_ms": 40000,
            }
            [r] = await run_driver({"timeout_ms": 50000, "steps": [step]})
            why = self.explain("main", r)
            self.assertTrue(r.get("reached"), why)
            self.assertGreaterEqual(r["vapor"]["maxChannels"], 5, why)
            self.assertGreaterEqual(r["vapor"]["audio"]["elements"], 1, why)
            self.assertGreater(r["vapor"]["audio"]["bufferedSeconds"], 1.0, why)

        return Deferred.fromCoroutine(go())
