"""
End to end: a share link (issue 9).  Its creator makes a view link through
the API; the bundled page opened with C{#share=SECRET} (no key) shows the
interactive VM in view mode while a control console types into it in the
same browser; the VM gets the control console's marker.
"""

from __future__ import annotations

import json
import secrets

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.web.client import HTTPConnectionPool

from tests.e2e.fixture import GUEST_VM_NAME, VM_NAME, run_driver, wait_for_serial
from tests.e2e.test_console import E2ETestCase, http, wait_for_consoles

VM_PATH = "/api/v1/virtualization/virtualmachines"


class ShareLinkPageTests(E2ETestCase):
    def test_share_watches(self) -> Deferred:
        """
        When a share link is opened in the page while a control console types, the link's page is a connected view console and the VM gets the control console's marker.
        """
        vm = self.env.guest_vm()
        proxy = self.env.proxy("main")
        self.pool = HTTPConnectionPool(reactor, persistent=False)

        async def go() -> None:
            response = await treq.post(
                f"{proxy.base_url}{VM_PATH}/{GUEST_VM_NAME}/console/shares",
                data=json.dumps({"mode": "view", "max_uses": 3}).encode(),
                headers={"Authorization": f"Bearer {self.env.key}"},
                pool=self.pool,
            )
            share = json.loads(await response.content())
            self.assertEqual(response.code, 201, share)
            page, fragment = share["url"].split("#", 1)
            self.assertTrue(fragment.startswith("share="))
            shown = "s" + secrets.token_hex(6)
            watcher, typist = await run_driver(
                {
                    "timeout_ms": 60000,
                    "steps": [
                        {"kind": "page", "url": f"{proxy.base_url}{page}?type=vnc#{fragment}",
                         "until": "connected", "paint": True, "timeout_ms": 30000},
                        {"kind": "page", "url": self.page_url(proxy.base_url, GUEST_VM_NAME, "?type=vnc"),
                         "until": "connected", "paint": True, "timeout_ms": 30000,
                         "actions": [{"click": True}, {"type": f"mark {shown}"}, {"press": "Enter"},
                                     {"wait_ms": 1000}]},
                    ],
                }
            )  # fmt: skip
            self.assertTrue(watcher.get("reached"), self.explain("main", watcher))
            self.assertEqual(watcher["vapor"]["mode"], "view")
            self.assertGreater(watcher["canvas"]["nonBackground"], 50)
            self.assertTrue(typist.get("reached"), self.explain("main", typist))
            await wait_for_serial(vm.serial, shown)
            response = await treq.get(
                f"{proxy.base_url}{VM_PATH}/{GUEST_VM_NAME}/console/shares",
                headers={"Authorization": f"Bearer {self.env.key}"},
                pool=self.pool,
            )
            [listed] = json.loads(await response.content())["shares"]
            self.assertEqual(listed["uses_left"], 2)

        return Deferred.fromCoroutine(go())

    def test_revoked_link_says_so(self) -> Deferred:
        """
        When a share link's page is watching and the link is revoked, the stats named the share while it watched, and the page closes with 4010 saying "Share link revoked" (not a generic sentence) and does not reconnect.
        """
        proxy = self.env.proxy("main")
        self.pool = HTTPConnectionPool(reactor, persistent=False)

        async def go() -> None:
            response = await treq.post(
                f"{proxy.base_url}{VM_PATH}/{VM_NAME}/console/shares",
                data=json.dumps({"mode": "view"}).encode(),
                headers={"Authorization": f"Bearer {self.env.key}"},
                pool=self.pool,
            )
            share = json.loads(await response.content())
            self.assertEqual(response.code, 201, share)
            page, fragment = share["url"].split("#", 1)
            driver = Deferred.fromCoroutine(
                run_driver(
                    {
                        "timeout_ms": 40000,
                        "steps": [
                            {"kind": "page", "url": f"{proxy.base_url}{page}?type=vnc#{fragment}",
                             "until": "connected", "then_closed": True, "settle_ms": 1500, "timeout_ms": 30000},
                        ],
                    }
                )
            )  # fmt: skip
            await wait_for_consoles(proxy.base_url, self.env.key, 1, min_bytes_sent=1000)
            stats = await http("GET", f"{proxy.base_url}/api/v1/console/stats", self.env.key)
            revoked = await http(
                "DELETE", f"{proxy.base_url}{VM_PATH}/{VM_NAME}/console/shares/{share['share_id']}", self.env.key
            )
            [watcher] = await driver
            why = self.explain("main", [stats, revoked, watcher])
            self.assertEqual([c["share_id"] for c in stats["body"]["connections"]], [share["share_id"]], why)
            self.assertEqual((revoked["status"], revoked["body"]["consoles_closed"]), (200, 1), why)
            self.assertTrue(watcher.get("reached"), why)
            vapor = watcher["vapor"]
            self.assertEqual((vapor["closeCode"], vapor["lastError"], vapor["state"]),
                             (4010, "SESSION_TERMINATED", "failed"), why)  # fmt: skip
            self.assertEqual(vapor["errorText"], "Share link revoked", why)
            self.assertEqual(vapor["statusText"], "closed: Share link revoked (SESSION_TERMINATED, 4010)", why)
            self.assertEqual(vapor["tokenFetches"], 1, why)

        return Deferred.fromCoroutine(go())
