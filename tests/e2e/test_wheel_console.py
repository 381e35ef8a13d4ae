"""
End to end through the installed wheel: the proxy runs from a fresh venv
(tests/integration/wheel_fixture.py), outside the checkout, and serves noVNC
and spice-html5 from the copies vendored inside the package; headless
Chromium connects to the e2e VM through it.
"""

from __future__ import annotations

from typing import Any, Dict

from twisted.internet.defer import Deferred

from tests.e2e.fixture import VM_NAME, run_driver
from tests.e2e.test_console import E2ETestCase
from tests.integration import wheel_fixture
from tests.integration.wheel_fixture import InstalledProxy


class InstalledWheelConsoleTests(E2ETestCase):
    """
    The console page of the installed wheel against the e2e VM.
    """

    timeout = 600

    def setUp(self) -> None:
        super().setUp()
        self.proxy = InstalledProxy(wheel_fixture.installed(), self.env.config_text).start()
        self.addCleanup(self.proxy.stop)

    def why(self, result: Any) -> str:
        return f"browser saw {str(result)[:3000]}\ninstalled proxy log tail:\n{self.proxy.log_tail()}"

    async def open_page(self, console_type: str) -> Dict[str, Any]:
        step = {
            "kind": "page",
            "url": self.page_url(self.proxy.base_url, VM_NAME, f"?type={console_type}"),
            "until": "connected",
            "paint": True,
            "timeout_ms": 30000,
        }
        if console_type == "spice":
            step["min_channels"] = 4
        [result] = await run_driver({"timeout_ms": 40000, "steps": [step]})
        return result

    def test_novncThroughWheel(self) -> Deferred:
        """
        When the installed wheel's console page opens the VM's VNC console, noVNC connects and draws the screen.
        """

        async def go() -> None:
            r = await self.open_page("vnc")
            self.assertTrue(r.get("reached"), self.why(r))
            self.assertEqual((r["vapor"]["state"], r["vapor"]["type"]), ("connected", "vnc"), self.why(r))
            self.assertGreater(r["canvas"]["nonBackground"], 50, self.why(r))

        return Deferred.fromCoroutine(go())

    def test_spiceThroughWheel(self) -> Deferred:
        """
        When the installed wheel's console page opens the VM's SPICE console, spice-html5 opens its channels and draws the screen.
        """

        async def go() -> None:
            r = await self.open_page("spice")
            self.assertTrue(r.get("reached"), self.why(r))
            self.assertEqual(r["vapor"]["type"], "spice", self.why(r))
            self.assertGreaterEqual(r["vapor"]["maxChannels"], 4, self.why(r))
            self.assertGreater(r["canvas"]["nonBackground"], 50, self.why(r))

        return Deferred.fromCoroutine(go())
