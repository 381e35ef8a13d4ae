"""
VeNCrypt through the whole product on the real reactor over loopback: the
service built by L{vaporproxy.tap.makeService} from a config file whose
hypervisor (libvirt's test driver, node file written here) has a
C{vnc_tls} section, in front of a real C{qemu-system-x86_64} whose VNC
server uses C{tls-creds-x509} and a VNC password.

HTTP (Bearer key) -> console info and token -> WebSocket with the token ->
the browser side is offered security type None -> the proxy does VeNCrypt
X509Vnc (TLS, then the DES challenge inside it) with QEMU -> QEMU's
ServerInit reaches the browser, and the relay runs both ways.  With a CA
that did not sign QEMU's certificate the console closes with 4006
CONNECTION_FAILED and the log says why.
"""

from __future__ import annotations

import os
import struct
from typing import Any, Dict, List, Tuple

from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from tests.support import free_port

from .libvirt_fixtures import domain_xml, graphics_xml, node_uri, write_node_file
from .qemu_fixture import start_qemu, write_x509_credentials
from .stack import ConsoleClientFactory, Stack
from .test_full_path import ALICE_KEY, OPS_KEY, STATS_PATH, VM_PATH, config_text, error_of, rfb_to_client_init

try:
    import libvirt
except ImportError:  # pragma: no cover
    libvirt = None

VNC_PASSWORD = "tls-vm-secret"
UUID_TLS = "6c0f5a1e-7e0b-4c61-9d0e-5d9b0a1c2101"

#: ServerInit up to the name: u16 width, u16 height, 16-byte pixel format,
#: u32 name length.
SERVER_INIT_HEAD = 24


def vnc_tls_config_text(uri: str, listen: str, ca_file: str) -> str:
    """
    The config of L{tests.integration.test_full_path} with C{vnc_tls}
    (trusting C{ca_file}) on its one hypervisor.
    """
    text = config_text(uri, listen)
    line = f'  - uri: "{uri}"\n'
    assert line in text
    return text.replace(line, line + f'    vnc_tls: {{ca_file: "{ca_file}"}}\n')


def capture_log_lines(testcase: TestCase) -> List[str]:
    """
    Every log event of the process until the end of C{testcase}, formatted
    as the log line it becomes.
    """
    lines: List[str] = []

    def observe(event: Dict[str, Any]) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    testcase.addCleanup(globalLogPublisher.removeObserver, observe)
    return lines


async def rfb_browser_handshake(testcase: TestCase, ws: ConsoleClientFactory) -> Tuple[Any, bytes]:
    """
    The browser's (noVNC's) side of RFB 3.8 against the proxy, up to and
    including the VM's ServerInit; answer the client protocol and the
    ServerInit.
    """
    client = await rfb_to_client_init(testcase, ws)
    got = await ws.until_length(18 + SERVER_INIT_HEAD)
    (name_length,) = struct.unpack("!I", got[18 + 20 : 18 + 24])
    got = await ws.until_length(18 + SERVER_INIT_HEAD + name_length)
    return client, got[18 : 18 + SERVER_INIT_HEAD + name_length]


class VeNCryptFullPathTests(TestCase):
    """
    A VNC console of a VeNCrypt-only QEMU through the whole product.
    """

    timeout = 30
    if libvirt is None:
        skip = "libvirt-python is not installed"

    def setUp(self) -> None:
        base = self.mktemp()
        qemu_dir = os.path.join(base, "qemu")
        # QEMU's CA and certificate (for 127.0.0.1, the address dialled).
        self.qemu_files = write_x509_credentials(qemu_dir)
        # Another CA, not the one that signed QEMU's certificate.
        self.other_files = write_x509_credentials(os.path.join(base, "other"), ca_name="some other CA")
        self.qemu = start_qemu(self, vnc_password=VNC_PASSWORD, vnc_tls_dir=qemu_dir)
        directory = os.path.join(base, "node")
        os.makedirs(directory)
        domain = domain_xml("vm-tls", UUID_TLS, [graphics_xml("vnc", self.qemu.vnc_port, passwd=VNC_PASSWORD)])
        self.uri = node_uri(write_node_file(directory, [domain]))

    def start_stack(self, ca_file: str) -> Stack:
        """
        Start the product on a free loopback port, its hypervisor's
        vnc_tls trusting C{ca_file}.
        """
        port = free_port()
        text = vnc_tls_config_text(self.uri, f"tcp:{port}:interface=127.0.0.1", ca_file)
        return Stack.start(self, reactor, text, port)

    async def _open_console(self, stack: Stack) -> Tuple[ConsoleClientFactory, Any, bytes]:
        """
        Ask for vm-tls's console over HTTP, open its WebSocket with the
        token and do the browser's side of RFB; answer the client factory,
        the client protocol and QEMU's ServerInit.
        """
        status, info = await stack.get_json(f"{VM_PATH}/vm-tls/console", key=ALICE_KEY)
        self.assertEqual(status, 200, info)
        self.assertEqual(
            (info["type"], info["port"], info["password"]), ("vnc", self.qemu.vnc_port, "********")
        )
        ws = await stack.websocket(info["ws_path"], info["token"])
        client, server_init = await rfb_browser_handshake(self, ws)
        return ws, client, server_init

    async def _vm_clients(self, wanted: int) -> int:
        """
        Poll QEMU (QMP C{query-vnc}) for up to 5 seconds until it has
        C{wanted} VNC clients; answer how many it has.
        """
        for _ in range(100):
            count = len(self.qemu.qmp("query-vnc")["clients"])
            if count == wanted:
                break
            await deferLater(reactor, 0.05)
        return count

    async def _proxy_vm_sockets(self) -> int:
        """
        Wait up to 2 seconds for the proxy to close its sockets to QEMU's
        VNC port; answer how many the reactor still watches.
        """
        for _ in range(40):
            sockets = [
                s
                for s in set(reactor.getReaders()) | set(reactor.getWriters())
                if isinstance(s, tcp.Client) and s.getPeer().port == self.qemu.vnc_port
            ]
            if not sockets:
                break
            await deferLater(reactor, 0.05)
        return len(sockets)

    async def _x509_vnc(self) -> None:
        stack = self.start_stack(self.qemu_files["ca-cert.pem"])
        ws, client, server_init = await self._open_console(stack)
        width, height = struct.unpack("!HH", server_init[:4])
        self.assertGreater(width, 0)
        self.assertGreater(height, 0)
        # QEMU (VeNCrypt only) has one client: the proxy, over X509Vnc.
        self.assertEqual(self.qemu.qmp("query-vnc")["auth"], "vencrypt+x509+vnc")
        self.assertEqual(await self._vm_clients(1), 1)
        status, stats = await stack.get_json(STATS_PATH, key=OPS_KEY)
        self.assertEqual(status, 200, stats)
        self.assertEqual(stats["connections_per_vm"], {UUID_TLS: 1})
        client.sendClose(1000)
        self.assertEqual((await ws.closed)[0], 1000)
        self.assertEqual(await self._vm_clients(0), 0, "closing the console closes the TLS connection to the VM")
        self.assertEqual(await self._proxy_vm_sockets(), 0)

    def test_x509VncThroughTheProduct(self) -> Deferred:
        """
        When the hypervisor's vnc_tls trusts QEMU's CA, a console asked for
        over HTTP and opened with its token is offered None on the browser
        side, the proxy does VeNCrypt X509Vnc with the VM's password, and
        QEMU's ServerInit reaches the browser.
        """
        return Deferred.fromCoroutine(self._x509_vnc())

    async def _relay(self) -> None:
        stack = self.start_stack(self.qemu_files["ca-cert.pem"])
        ws, client, server_init = await self._open_console(stack)
        width, height = struct.unpack("!HH", server_init[:4])
        before = len(ws.received)
        # FramebufferUpdateRequest of the whole screen, relayed to QEMU
        # inside TLS; QEMU answers with a FramebufferUpdate (type 0).
        client.send(struct.pack("!BBHHHH", 3, 0, 0, 0, width, height))
        got = await ws.until_length(before + 4)
        if not ws.closed.called:
            client.sendClose(1000)
        code, _ = await ws.closed
        await self._vm_clients(0)
        vm_sockets = await self._proxy_vm_sockets()
        self.assertEqual(got[before : before + 1], b"\x00", "a FramebufferUpdate from QEMU")
        self.assertEqual(code, 1000)
        self.assertEqual(vm_sockets, 0, "the proxy's TLS connection to the VM is closed with the console")

    def test_relayOverTLS(self) -> Deferred:
        """
        When the VeNCrypt handshake is over, the relay keeps writing to the
        VM inside TLS: a FramebufferUpdateRequest from the browser is
        answered by QEMU with a FramebufferUpdate.
        """
        return Deferred.fromCoroutine(self._relay())


    async def _wrong_ca(self) -> None:
        lines = capture_log_lines(self)
        stack = self.start_stack(self.other_files["ca-cert.pem"])
        status, info = await stack.get_json(f"{VM_PATH}/vm-tls/console", key=ALICE_KEY)
        self.assertEqual(status, 200, info)
        ws = await stack.websocket(info["ws_path"], info["token"])
        self.assertEqual(await ws.closed, (4006, "CONNECTION_FAILED"))
        self.assertEqual(error_of(ws)["code"], "CONNECTION_FAILED")
        # The browser got the proxy's greeting and nothing of the VM's.
        self.assertLessEqual(len(ws.received), 12)
        # The console's closing line says why (the guard also logs it).
        [closed] = [line for line in lines if line.startswith("console ") and " closed: " in line]
        self.assertIn("error=CONNECTION_FAILED", closed)
        self.assertIn("reason=guard: TLS handshake with the VM failed: certificate verify failed", closed)
        self.assertNotIn(VNC_PASSWORD, "\n".join(lines))
        self.assertNotIn(info["token"], "\n".join(lines))
        status, stats = await stack.get_json(STATS_PATH, key=OPS_KEY)
        self.assertEqual(stats["total_connections"], 0)

    def test_wrongCA(self) -> Deferred:
        """
        When the hypervisor's vnc_tls trusts a CA that did not sign QEMU's
        certificate, the console closes with 4006 CONNECTION_FAILED and its
        log line names the certificate verification failure.
        """
        return Deferred.fromCoroutine(self._wrong_ca())
