"""
The interactive test VM itself, booted by plain QEMU (no libvirt, no
proxy): keys and pointer buttons injected over QMP reach its shell and its
mouse driver, and it says so on its serial port.  This is what the
end-to-end tests (C{tests/e2e/test_shell.py}) rely on when they type and
click through the browser.
"""

from __future__ import annotations

import secrets

from twisted.trial import unittest

from tests.integration.qemu_fixture import start_guest_qemu
from vaporproxy.demo.guest import READY_LINE


class GuestVMTests(unittest.SynchronousTestCase):
    """
    The busybox guest under plain QEMU.
    """

    def setUp(self) -> None:
        self.qemu = start_guest_qemu(self)

    def test_typed_mark_reaches_serial(self) -> None:
        """
        When C{mark <random hex>} and Enter are typed on the VM's keyboard,
        the marker appears on its serial port after C{vm: ready}.
        """
        marker = secrets.token_hex(5)
        for char in "mark " + marker:
            self.qemu.qmp("send-key", keys=[{"type": "qcode", "data": "spc" if char == " " else char}])
        self.qemu.qmp("send-key", keys=[{"type": "qcode", "data": "ret"}])
        self.qemu.serial.wait_for(marker, timeout=30)
        lines = self.qemu.serial.lines()
        self.assertLess(lines.index(READY_LINE), lines.index(marker))

    def test_mouse_buttons_reach_serial(self) -> None:
        """
        When the left and then the right button of the VM's PS/2 mouse are
        pressed and released, the VM reports one click of each, in order.
        """
        for button in ("left", "right"):
            for down in (True, False):
                self.qemu.qmp("input-send-event", events=[{"type": "btn", "data": {"down": down, "button": button}}])
            self.qemu.serial.wait_for(f"mouse: click {button}", timeout=30)
        clicks = [line for line in self.qemu.serial.lines() if line.startswith("mouse: ")]
        self.assertEqual(clicks, ["mouse: click left", "mouse: click right"])
