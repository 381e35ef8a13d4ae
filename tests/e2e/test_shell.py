"""
End to end with the interactive test VM (a busybox shell on the screen):
what a person types and clicks in noVNC or spice-html5 reaches the VM
through the proxy, and the VM itself says so on its serial port.

The VM reports C{mark WORDS} (typed at its shell) and every pointer button
press (C{mouse: click left}) on the serial port; the tests read that file.
"""

from __future__ import annotations

import secrets
from typing import Any, Dict, List

from twisted.internet.defer import Deferred

from tests.e2e.fixture import GUEST_VM_NAME, run_driver, wait_for_serial
from tests.e2e.test_console import E2ETestCase

CLICK_LINE = "mouse: click left"


class ShellInputTests(E2ETestCase):
    """
    Keyboard and mouse through the bundled console page into the VM.
    """

    def setUp(self) -> None:
        super().setUp()
        self.vm = self.env.guest_vm()
        self.serial = self.vm.serial

    async def act(self, console_type: str, actions: List[Dict[str, Any]]) -> Dict[str, Any]:
        """
        Open the console page for the shell VM, wait until it shows the
        screen (SPICE: with its inputs channel), do C{actions}.
        """
        proxy = self.env.proxy("main")
        [r] = await run_driver(
            {
                "timeout_ms": 60000,
                "steps": [
                    {
                        "kind": "page",
                        "url": self.page_url(proxy.base_url, GUEST_VM_NAME, f"?type={console_type}"),
                        "until": "connected",
                        "paint": True,
                        "min_channels": 4 if console_type == "spice" else 1,
                        "timeout_ms": 30000,
                        "actions": actions,
                    }
                ],
            }
        )
        why = self.explain("main", r)
        self.assertTrue(r.get("reached"), why)
        self.assertIsNone(r.get("action_error"), why)
        self.assertEqual(r.get("acted"), len(actions), why)
        return r

    async def types_marker(self, console_type: str) -> None:
        marker = secrets.token_hex(6)
        await self.act(
            console_type,
            [{"click": True}, {"type": f"mark {marker}"}, {"press": "Enter"}, {"wait_ms": 1000}],
        )
        await wait_for_serial(self.serial, marker)

    async def click_arrives(self, console_type: str) -> None:
        # A SPICE page may lose its first click when it is opened right after
        # the previous test's SPICE page on the same VM (the click never reached
        # the VM in one full-suite run under load; never seen alone; not
        # understood):
        # a person clicks again, and so does the test, at most three pages.
        attempts = 3 if console_type == "spice" else 1
        for attempt in range(attempts):
            before = self.serial.lines().count(CLICK_LINE)
            await self.act(console_type, [{"click": True}, {"wait_ms": 1000}])
            try:
                await wait_for_serial(self.serial, CLICK_LINE, count=before + 1, timeout=30.0 / attempts)
                return
            except AssertionError:
                if attempt == attempts - 1:
                    raise

    def test_novnc_typing_reaches_shell(self) -> Deferred:
        """
        When a person types C{mark <random hex>} and Enter into the noVNC
        page, the VM's shell runs it and the marker appears on its serial
        port.
        """
        return Deferred.fromCoroutine(self.types_marker("vnc"))

    def test_spice_typing_reaches_shell(self) -> Deferred:
        """
        When a person types C{mark <random hex>} and Enter into the
        spice-html5 page, the VM's shell runs it and the marker appears on
        its serial port.
        """
        return Deferred.fromCoroutine(self.types_marker("spice"))

    def test_novnc_click_reaches_vm(self) -> Deferred:
        """
        When a person clicks the screen in the noVNC page, the VM's mouse
        driver sees a left-button press and reports it on the serial port.
        """
        return Deferred.fromCoroutine(self.click_arrives("vnc"))

    def test_spice_click_reaches_vm(self) -> Deferred:
        """
        When a person clicks the screen in the spice-html5 page, the VM's
        mouse driver sees a left-button press and reports it on the serial
        port.
        """
        return Deferred.fromCoroutine(self.click_arrives("spice"))
