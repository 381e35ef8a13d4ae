"""
A recording proxy as a real subprocess in front of a real QEMU, for the
recording integration tests (crash, full disk): the proxy's config, its
process (with an optional C{preexec_fn}, e.g. a file-size limit), a VNC
console opened through it the way noVNC does, and a minimal decoder of the
VM's raw framebuffer updates, to tell that bytes hold the VM's screen.
"""

from __future__ import annotations

import struct
import time
from typing import Any, Callable, List, Optional, Tuple

from tests.integration.libvirt_fixtures import domain_xml, graphics_xml, node_uri, write_node_file
from tests.integration.proxy_cluster import ADMIN_KEY, HTTP, VM_PATH, ProxyProcess, ws_connect
from vaporproxy.demo import proxy_config_text, sha256_hex

__all__ = ["RecordingProxy", "RFBScreen", "VNCConsole", "key_events", "vm_node", "metric"]

UUID = "6c0f5a1e-7e0b-4c61-9d0e-5d9b0a1c2301"
VM_NAME = "recorded"
RETURN = 0xFF0D


def vm_node(directory: str, vnc_port: int, password: Optional[str]) -> str:
    """A libvirt test-driver URI whose one VM's VNC console is the QEMU's."""
    domain = domain_xml(VM_NAME, UUID, [graphics_xml("vnc", vnc_port, passwd=password)])
    return node_uri(write_node_file(directory, [domain]))


class RecordingProxy(ProxyProcess):
    """
    C{twistd vaporproxy} recording every console into C{recordings}.

    @param preexec_fn: run in the child before C{exec} (resource limits).
    """

    def __init__(self, name: str, directory: str, uri: str, recordings: str,
                 preexec_fn: Optional[Callable[[], None]] = None):  # fmt: skip
        self.recordings = recordings
        self.preexec_fn = preexec_fn

        def config(port: int) -> str:
            return proxy_config_text(
                listen_port=port,
                hypervisor_uri=uri,
                api_keys=[{"user": "root", "sha256": sha256_hex(ADMIN_KEY), "vms": ["*"], "admin": True}],
                console={"allowed_hosts": ["127.0.0.1"]},
                sections={"recording": {"enabled": True, "dir": recordings}},
            )

        super().__init__(name, directory, config)


async def metric(http: HTTP, proxy: ProxyProcess, name: str) -> float:
    """One unlabelled figure of the proxy's /metrics (0 when absent)."""
    code, body = await http.request("GET", proxy.base + "/metrics", ADMIN_KEY)
    assert code == 200, (code, body)
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def key_events(text: str) -> bytes:
    """KeyEvents (down, up) typing C{text} (unshifted characters) then Return."""
    keysyms = [ord(c) for c in text] + [RETURN]
    return b"".join(struct.pack("!BBHI", 4, down, 0, k) for k in keysyms for down in (1, 0))


class VNCConsole:
    """
    A VNC console through the proxy, opened as noVNC does (RFB 3.8,
    security None, shared), asking for raw updates of the whole screen.

    @ivar samples: C{(monotonic time, bytes received)} after each update asked.
    """

    def __init__(self, client: Any, factory: Any):
        self.client = client
        self.factory = factory
        self.width = self.height = 0
        self.samples: List[Tuple[float, int]] = []

    @classmethod
    async def open(cls, http: HTTP, proxy: ProxyProcess) -> "VNCConsole":
        code, info = await http.request("GET", f"{proxy.base}{VM_PATH}/{VM_NAME}/console", ADMIN_KEY)
        assert code == 200, (code, info)
        client, factory = await ws_connect(proxy, VM_NAME, info["token"])
        assert client is not None, "the console WebSocket did not open"
        console = cls(client, factory)
        await console.handshake()
        return console

    async def handshake(self) -> None:
        client = self.client
        await client.until(12)
        client.send(b"RFB 003.008\n")
        await client.until(14)
        client.send(b"\x01")  # security None (the proxy's offer)
        await client.until(18)
        client.send(b"\x01")  # ClientInit: shared
        got = await client.until(42)
        await client.until(42 + struct.unpack_from("!I", got, 38)[0])
        self.width, self.height = struct.unpack_from("!HH", got, 18)

    async def update(self, incremental: bool, timeout: float = 10.0) -> None:
        """Ask for an update of the whole screen; wait for some bytes when not incremental."""
        start = len(self.client.received)
        self.client.send(struct.pack("!BBHHHH", 3, int(incremental), 0, 0, self.width, self.height))
        if not incremental:
            await self.client.until(start + 16 + self.width * self.height * 4, timeout)
        self.samples.append((time.monotonic(), len(self.client.received)))

    def received_by(self, moment: float) -> int:
        """Bytes the console had received at C{moment} (by the samples)."""
        return max((n for t, n in self.samples if t <= moment), default=0)


class RFBScreen:
    """
    The screen drawn by a VM's RFB stream as a browser received it (the
    proxy's handshake, ServerInit, then raw FramebufferUpdates at 32 bpp),
    as far as the stream goes.  Answers how many pixels are bright.
    """

    def __init__(self, stream: bytes):
        self.width, self.height = struct.unpack_from("!HH", stream, 18)
        self.pixels = bytearray(self.width * self.height)
        self.updates = 0
        self._read(stream, 42 + struct.unpack_from("!I", stream, 38)[0])

    def _read(self, data: bytes, pos: int) -> None:
        while pos < len(data):
            kind = data[pos]
            if kind == 0 and len(data) - pos >= 4:
                pos = self._update(data, pos + 4, struct.unpack_from("!H", data, pos + 2)[0])
                if pos < 0:
                    return
                self.updates += 1
            elif kind == 2:  # Bell
                pos += 1
            else:  # cut short, or a message this test never asked for
                return

    def _update(self, data: bytes, pos: int, rects: int) -> int:
        for _ in range(rects):
            if len(data) - pos < 12:
                return -1
            x, y, w, h, encoding = struct.unpack_from("!HHHHi", data, pos)
            pos += 12
            if encoding != 0:
                raise AssertionError(f"encoding {encoding} was never asked for")
            size = w * h * 4
            if len(data) - pos < size:
                return -1
            for row in range(h):
                line = data[pos + row * w * 4 : pos + (row + 1) * w * 4]
                start = (y + row) * self.width + x
                self.pixels[start : start + w] = bytes(max(line[i : i + 3]) for i in range(0, len(line), 4))
            pos += size
        return pos

    def bright(self) -> int:
        return sum(1 for v in self.pixels if v > 128)
