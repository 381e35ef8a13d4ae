"""
A full disk drops the recording, never the console (SPEC.md "Recording and
playback"; DESIGN.md rule 1).  The proxy runs as a real subprocess under a
file-size limit (C{RLIMIT_FSIZE}: every write past it fails with C{EFBIG},
as on a full disk) and records a VNC console of the interactive test VM (a
busybox shell that reports typed markers on its serial port).  The VM's
first screen is larger than the limit: the recording is dropped (an error
in the log, C{vaporproxy_recordings_dropped}, C{complete: false} in the
recordings API) while the console goes on: typing still reaches the VM and
the screen's updates still arrive.
"""

from __future__ import annotations

import os
import resource
import secrets
import shutil
import time

from twisted.trial.unittest import TestCase

from tests.integration.proxy_cluster import ADMIN_KEY, HTTP, new_directory, sleep
from tests.integration.qemu_fixture import start_guest_qemu
from tests.integration.recording_proxy import RecordingProxy, VNCConsole, key_events, metric, vm_node

VNC_PASSWORD = "disk-secret"
#: The proxy's largest file: more than its log needs, less than one screen.
FILE_LIMIT = 256 * 1024


def limit_file_size() -> None:
    """In the proxy's child process: no file grows past FILE_LIMIT."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))


class RecordingFullDiskTests(TestCase):
    timeout = 180

    def setUp(self) -> None:
        self.qemu = start_guest_qemu(self, vnc_password=VNC_PASSWORD)
        self.directory = new_directory()
        self.addCleanup(shutil.rmtree, self.directory, True)
        uri = vm_node(self.directory, self.qemu.vnc_port, VNC_PASSWORD)
        self.recordings = os.path.join(self.directory, "recordings")
        self.proxy = RecordingProxy("disk", self.directory, uri, self.recordings, preexec_fn=limit_file_size)
        self.proxy.start()
        self.addCleanup(self.proxy.stop)
        self.http = HTTP()

    async def until_marker(self, marker: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(marker in line for line in self.qemu.serial.lines()):
            if time.monotonic() > deadline:
                raise AssertionError(f"{marker} never reached the VM: {self.qemu.serial.tail(20)}")
            await sleep(0.2)

    async def test_fullDiskDropsRecordingNotConsole(self) -> None:
        """
        When the recording's file cannot grow (EFBIG), the recording is dropped with an error, a metric and complete: false, while the console keeps relaying: typing reaches the VM and updates arrive.
        """
        await self.http.wait_ready(self.proxy)
        console = await VNCConsole.open(self.http, self.proxy)
        self.assertGreater(console.width * console.height * 4, FILE_LIMIT)
        await console.update(incremental=False)
        deadline = time.monotonic() + 15
        while await metric(self.http, self.proxy, "vaporproxy_recordings_dropped_total") < 1:
            self.assertLess(time.monotonic(), deadline, self.proxy.log_tail())
            await sleep(0.2)
        self.assertIn("dropped, the console goes on", self.proxy.log_tail(20000))

        code, body = await self.http.request("GET", self.proxy.base + "/api/v1/console/recordings", ADMIN_KEY)
        [listed] = body["recordings"]
        self.assertEqual((listed["outcome"], listed["complete"]), ("LIVE", False), body)
        self.assertIn("too large", listed["dropped"].lower())

        # The console goes on: typing reaches the VM, and its echo comes back as screen updates.
        before = len(console.client.received)
        marker = secrets.token_hex(6)
        console.client.send(key_events(f"mark {marker}"))
        await self.until_marker(marker)
        for _ in range(8):
            await console.update(incremental=True)
            await sleep(0.25)
        self.assertGreater(len(console.client.received) - before, 1000, "screen updates after the drop")
        self.assertFalse(console.factory.closed.called, "the console is still open")

        console.client.sendClose(1000)
        await console.factory.closed
        for _ in range(50):
            code, body = await self.http.request("GET", self.proxy.base + "/api/v1/console/recordings", ADMIN_KEY)
            if body["recordings"][0]["outcome"] != "LIVE":
                break
            await sleep(0.2)
        [ended] = body["recordings"]
        self.assertEqual((ended["outcome"], ended["complete"]), ("ok", False), body)
        self.assertEqual(ended["dropped"], listed["dropped"])
        self.assertLessEqual(ended["size"], FILE_LIMIT)
        self.assertIsNone(self.proxy.process.poll(), "the proxy is still running")
