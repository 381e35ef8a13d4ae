"""
End to end with the interactive test VM: view-only consoles in the
bundled page (issue 9).  noVNC and spice-html5 draw the VM in view mode;
what a person types there never reaches the VM (its serial port shows no
marker), while a control console's typing does, right after.  For SPICE
the proxy refuses the view console's inputs channel (4008) and the page
stays connected.
"""

from __future__ import annotations

import secrets

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from tests.e2e.fixture import GUEST_VM_NAME, run_driver, wait_for_serial
from tests.e2e.test_console import E2ETestCase


class ViewOnlyPageTests(E2ETestCase):
    def setUp(self) -> None:
        super().setUp()
        self.vm = self.env.guest_vm()
        self.serial = self.vm.serial

    async def typed(self, query: str, text: str, channels: int) -> dict:
        proxy = self.env.proxy("main")
        [r] = await run_driver(
            {
                "timeout_ms": 60000,
                "steps": [
                    {
                        "kind": "page",
                        "url": self.page_url(proxy.base_url, GUEST_VM_NAME, query),
                        "until": "connected",
                        "paint": True,
                        "min_channels": channels,
                        "timeout_ms": 30000,
                        "actions": [{"click": True}, {"type": text}, {"press": "Enter"}, {"wait_ms": 1500}],
                    }
                ],
            }
        )
        why = self.explain("main", r)
        self.assertTrue(r.get("reached"), why)
        self.assertIsNone(r.get("action_error"), why)
        return r

    async def view_only(self, console_type: str, channels: int) -> None:
        hidden = "v" + secrets.token_hex(6)
        r = await self.typed(f"?type={console_type}&mode=view", f"mark {hidden}", channels)
        self.assertEqual(r["vapor"]["mode"], "view", self.explain("main", r))
        self.assertEqual(r["vapor"]["state"], "connected", self.explain("main", r))
        # Its keys never reach the VM, so the page offers no Ctrl+Alt+Del.
        self.assertEqual(r["controls"]["cad"], "disabled", self.explain("main", r))
        self.assertGreater(r["canvas"]["nonBackground"], 50)
        if console_type == "spice":
            # The proxy refused the view console's inputs channel; the page went on.
            self.assertGreaterEqual(r["vapor"].get("refusedChannels", 0), 1, self.explain("main", r))
        await deferLater(reactor, 1.0, lambda: None)
        shown = "c" + secrets.token_hex(6)
        await self.typed(f"?type={console_type}", f"mark {shown}", 4 if console_type == "spice" else 1)
        await wait_for_serial(self.serial, shown)
        self.assertFalse([line for line in self.serial.lines() if hidden in line], self.serial.lines())

    def test_novnc_view_only(self) -> Deferred:
        """
        When a person types into a view-only noVNC console, the page draws the VM and nothing reaches it; a control console's typing does.
        """
        return Deferred.fromCoroutine(self.view_only("vnc", 1))

    def test_spice_view_only(self) -> Deferred:
        """
        When a person types into a view-only spice-html5 console, the page draws the VM (its inputs channel refused) and nothing reaches it.
        """
        return Deferred.fromCoroutine(self.view_only("spice", 3))
