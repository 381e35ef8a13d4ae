"""
Consoles configured as production libvirt hosts have them, through the
whole product (L{tap.makeService} on the real reactor, the libvirt test
driver describing the VM) against a real QEMU: SPICE on a TLS port only
(certificates made here, the ticket injected through TLS, a wrong CA giving
4006), VNC and SPICE on UNIX sockets.
"""

from __future__ import annotations

import os
import struct
from typing import Any, Dict, List, Optional, Sequence

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from vaporproxy.guards.spice import LINK_HEADER, LINK_MESS, MINI_HEADER

from tests.support import free_port

from . import test_full_path
from .libvirt_fixtures import domain_xml, graphics_xml
from .qemu_consoles import start_console_qemu
from .sound_guest import ensure_sound_guest
from .qemu_fixture import write_x509_credentials
from .stack import ConsoleClientFactory, Stack
from .test_full_path import ALICE_KEY, VM_PATH, error_of, main_init_session, sha256, spice_link, spice_link_channel

try:
    import libvirt
except ImportError:  # pragma: no cover
    libvirt = None

PASSWORD = "console-secret"
UUID_TLS = "6c0f5a1e-7e0b-4c61-9d0e-5d9b0a1c3001"
UUID_VNC_SOCKET = "6c0f5a1e-7e0b-4c61-9d0e-5d9b0a1c3002"
UUID_SPICE_SOCKET = "6c0f5a1e-7e0b-4c61-9d0e-5d9b0a1c3003"

CONFIG = """
server:
  listen: ["tcp:{port}:interface=127.0.0.1"]
auth:
  api_keys:
    - {{user: alice, sha256: "{alice}", vms: ["*"], admin: false}}
hypervisors:
  - uri: "{uri}"
{hypervisor}
console:
  allowed_hosts: {allowed}
  connection_timeout: 5s
logging:
  level: error
"""


def start(testcase: TestCase, domains: Sequence[str], hypervisor: str = "", allowed: str = '["127.0.0.1"]') -> Stack:
    """
    The product on a node file holding C{domains}; C{hypervisor} adds
    settings (indented YAML lines) to its one hypervisor.
    """
    return Stack.on_domains(
        testcase, reactor, domains,
        lambda port, uri: CONFIG.format(port=port, alice=sha256(ALICE_KEY), uri=uri, hypervisor=hypervisor,
                                        allowed=allowed),
    )  # fmt: skip


async def console(testcase: TestCase, stack: Stack, name: str) -> Dict[str, Any]:
    status, info = await stack.get_json(f"{VM_PATH}/{name}/console", key=ALICE_KEY)
    testcase.assertEqual(status, 200, info)
    return info


async def spice_session(testcase: TestCase, stack: Stack, info: Dict[str, Any]) -> int:
    """
    Link the main channel of a SPICE console (the proxy injects the ticket)
    and a display channel; answer the session id.
    """
    main = await stack.websocket(info["ws_path"], info["token"], protocols=["binary"])
    testcase.assertEqual(await spice_link_channel(main, 1, 0), 0, "QEMU accepted the injected ticket")
    start_at = len(main.received)
    got = await main.until(lambda got: main_init_session(got, start_at) is not None)
    session_id = main_init_session(got, start_at)
    display = await stack.websocket(info["ws_path"], info["token"], protocols=["binary"])
    testcase.assertEqual(await spice_link_channel(display, 2, session_id), 0)
    return session_id


class SpiceTLSTests(TestCase):
    """
    A SPICE console on a TLS port only (QEMU C{tls-port}, C{x509-dir}; in
    libvirt: C{spice_tls = 1} and no plain port), dialled over TLS.
    """

    timeout = 30
    if libvirt is None:
        skip = "libvirt-python is not installed"

    def setUp(self) -> None:
        base = os.path.abspath(self.mktemp())
        self.vm_certs = write_x509_credentials(os.path.join(base, "vm"), names=("127.0.0.1",))
        self.other = write_x509_credentials(os.path.join(base, "other"), ca_name="another CA")
        port = free_port()
        x509_dir = os.path.dirname(self.vm_certs["ca-cert.pem"])
        self.qemu = start_console_qemu(self, lambda _: ["-spice", f"tls-port={port},addr=127.0.0.1,x509-dir={x509_dir}"])
        self.qemu.set_password("spice", PASSWORD)
        self.domains = [domain_xml("vm-tls", UUID_TLS, [graphics_xml("spice", tls_port=port, passwd=PASSWORD)])]
        self.events: List[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def stack(self, ca_file: str) -> Stack:
        return start(self, self.domains, f"    spice_tls: {{ca_file: {ca_file}}}")

    async def _channels(self) -> None:
        stack = self.stack(self.vm_certs["ca-cert.pem"])
        info = await console(self, stack, "vm-tls")
        self.assertEqual(info["type"], "spice")
        self.assertNotEqual(await spice_session(self, stack, info), 0)

    def test_tlsOnlyConsole(self) -> None:
        """
        When the VM's SPICE server has only a TLS port and spice_tls trusts its CA, the main channel links with the injected ticket through TLS and a display channel joins its session.
        """
        return Deferred.fromCoroutine(self._channels())

    async def _wrong_ca(self) -> None:
        stack = self.stack(self.other["ca-cert.pem"])
        info = await console(self, stack, "vm-tls")
        main = await stack.websocket(info["ws_path"], info["token"], protocols=["binary"])
        main.client.send(spice_link(1, 0))
        self.assertEqual(await main.closed, (4006, "CONNECTION_FAILED"))
        self.assertEqual(error_of(main)["code"], "CONNECTION_FAILED")
        why = [e["why"] for e in self.events if e.get("log_format", "").startswith("TLS to the console")]
        self.assertEqual(len(why), 1, why)
        self.assertIn("certificate verify failed", why[0])

    def test_wrongCA(self) -> None:
        """
        When the VM's certificate is not signed by the spice_tls CA, the console closes with 4006 and a log line says why.
        """
        return Deferred.fromCoroutine(self._wrong_ca())

    async def _unconfigured(self) -> None:
        stack = start(self, self.domains)
        status, answer = await stack.get_json(f"{VM_PATH}/vm-tls/console", key=ALICE_KEY)
        self.assertEqual((status, answer["code"]), (409, "NO_CONSOLE_AVAILABLE"))
        self.assertIn("spice_tls", answer["error"])

    def test_withoutSpiceTLS(self) -> None:
        """
        When the hypervisor has no spice_tls, the TLS-only console is refused with NO_CONSOLE_AVAILABLE saying why.
        """
        return Deferred.fromCoroutine(self._unconfigured())


class SpicePerChannelTests(TestCase):
    """
    A SPICE console with both ports whose main channel is secure (QEMU
    C{tls-channel=main}; in libvirt C{<channel name='main' mode='secure'/>}):
    the proxy dials main over TLS and the display channel in plain.
    """

    timeout = 30
    if libvirt is None:
        skip = "libvirt-python is not installed"

    async def _channels(self) -> None:
        certs = write_x509_credentials(os.path.abspath(self.mktemp()), names=("127.0.0.1",))
        port, tls_port = free_port(), free_port()
        spice = f"port={port},tls-port={tls_port},addr=127.0.0.1,x509-dir={os.path.dirname(certs['ca-cert.pem'])},tls-channel=main"
        qemu = start_console_qemu(self, lambda _: ["-spice", spice])
        qemu.set_password("spice", PASSWORD)
        graphics = (
            f"<graphics type='spice' port='{port}' tlsPort='{tls_port}' autoport='no' listen='127.0.0.1'"
            f" passwd='{PASSWORD}'><channel name='main' mode='secure'/></graphics>"
        )
        stack = start(self, [domain_xml("vm-mixed", UUID_TLS, [graphics])], f"    spice_tls: {{ca_file: {certs['ca-cert.pem']}}}")
        connects: List[tuple] = []
        real = reactor.connectTCP

        def recording(host: str, p: int, factory: Any, *a: Any, **kw: Any) -> Any:
            connects.append((p, type(factory).__name__))
            return real(host, p, factory, *a, **kw)

        self.patch(reactor, "connectTCP", recording)
        info = await console(self, stack, "vm-mixed")
        self.assertNotEqual(await spice_session(self, stack, info), 0)
        vm_dials = [c for c in connects if c[0] in (port, tls_port)]
        self.assertEqual(vm_dials, [(tls_port, "_VMTLSFactory"), (port, "BackendFactory")])

    def test_mainSecureDisplayPlain(self) -> None:
        """
        When only the main channel is marked secure, main links over TLS (QEMU would refuse it in plain) and the display channel over the plain port.
        """
        return Deferred.fromCoroutine(self._channels())


def socket_graphics(kind: str, path: str) -> str:
    return f"<graphics type='{kind}' passwd='{PASSWORD}'><listen type='socket' socket='{path}'/></graphics>"


class UnixSocketTests(TestCase):
    """
    VNC and SPICE consoles on UNIX sockets (QEMU C{-vnc unix:PATH},
    C{-spice unix=on,addr=PATH}; in libvirt C{<listen type='socket'/>}),
    dialled as UNIX sockets by a proxy on the VM's host.
    """

    timeout = 30
    if libvirt is None:
        skip = "libvirt-python is not installed"

    def setUp(self) -> None:
        self.qemu = start_console_qemu(
            self,
            lambda d: ["-vnc", f"unix:{d}/vnc.sock,password=on", "-spice", f"unix=on,addr={d}/spice.sock"],
        )
        self.qemu.set_password("vnc", PASSWORD)
        self.qemu.set_password("spice", PASSWORD)
        d = self.qemu.workdir
        self.domains = [
            domain_xml("vm-vnc-socket", UUID_VNC_SOCKET, [socket_graphics("vnc", f"{d}/vnc.sock")]),
            domain_xml("vm-spice-socket", UUID_SPICE_SOCKET, [socket_graphics("spice", f"{d}/spice.sock")]),
        ]

    def stack(self, hypervisor: str = "") -> Stack:
        return start(self, self.domains, hypervisor, f'["127.0.0.1", "{self.qemu.workdir}/"]')

    async def _vnc(self) -> None:
        stack = self.stack()
        info = await console(self, stack, "vm-vnc-socket")
        ws = await stack.websocket(info["ws_path"], info["token"], protocols=["binary"])
        await rfb_to_server_init(self, ws)

    def test_vncSocket(self) -> None:
        """
        When a VNC console listens on a UNIX socket in an allowed directory, the proxy dials it, answers QEMU's VNC authentication and the browser gets QEMU's ServerInit.
        """
        return Deferred.fromCoroutine(self._vnc())

    async def _spice(self) -> None:
        stack = self.stack()
        info = await console(self, stack, "vm-spice-socket")
        self.assertNotEqual(await spice_session(self, stack, info), 0)

    def test_spiceSocket(self) -> None:
        """
        When a SPICE console listens on a UNIX socket in an allowed directory, its main channel links with the injected ticket and a display channel joins.
        """
        return Deferred.fromCoroutine(self._spice())

    async def _refused(self) -> None:
        remote = self.stack("    local: false")
        status, answer = await remote.get_json(f"{VM_PATH}/vm-vnc-socket/console", key=ALICE_KEY)
        self.assertEqual((status, answer["code"]), (409, "NO_CONSOLE_AVAILABLE"))
        self.assertIn("UNIX socket", answer["error"])
        outside = start(self, self.domains)
        status, answer = await outside.get_json(f"{VM_PATH}/vm-vnc-socket/console", key=ALICE_KEY)
        self.assertEqual((status, answer["code"]), (403, "UNAUTHORIZED"))

    def test_refused(self) -> None:
        """
        When the hypervisor is not local, a socket console is refused with NO_CONSOLE_AVAILABLE; when its directory is not allowed, with 403.
        """
        return Deferred.fromCoroutine(self._refused())


async def rfb_to_server_init(testcase: TestCase, ws: ConsoleClientFactory) -> None:
    """
    noVNC's side of RFB 3.8 against the proxy (security type None; the
    proxy answers the VM's VNC authentication), up to QEMU's ServerInit.
    """
    client = ws.client
    got = await ws.until_length(12)
    testcase.assertEqual(got[:12], b"RFB 003.008\n")
    client.send(b"RFB 003.008\n")
    got = await ws.until_length(14)
    testcase.assertEqual(got[12:14], b"\x01\x01")
    client.send(b"\x01")
    got = await ws.until_length(18)
    testcase.assertEqual(got[14:18], b"\0\0\0\0", "SecurityResult OK: the VM took the injected password")
    client.send(b"\x01")
    got = await ws.until_length(18 + 24)
    width, height = struct.unpack_from(">HH", got, 18)
    testcase.assertTrue(width > 0 and height > 0, (width, height))


class SpiceAudioTests(TestCase):
    """
    A SPICE console of a VM with a sound card whose audio goes to SPICE
    (QEMU C{-audiodev spice}; in libvirt C{<sound/>} with
    C{<audio type='spice'/>}): its playback channel is admitted with the
    session id like the other channels.
    """

    timeout = 30
    if libvirt is None:
        skip = "libvirt-python is not installed"

    async def _playback(self) -> None:
        port = free_port()
        qemu = start_console_qemu(
            self,
            lambda _: [
                "-audiodev", "spice,id=snd0",
                "-device", "intel-hda",
                "-device", "hda-duplex,audiodev=snd0",
                "-spice", f"port={port},addr=127.0.0.1,playback-compression=on",
            ],
        )  # fmt: skip
        qemu.set_password("spice", PASSWORD)
        graphics = graphics_xml("spice", port, passwd=PASSWORD)
        stack = start(self, [domain_xml("vm-audio", UUID_SPICE_SOCKET, [graphics])])
        info = await console(self, stack, "vm-audio")
        session_id = await spice_session(self, stack, info)
        playback = await stack.websocket(info["ws_path"], info["token"], protocols=["binary"])
        # A VM without the channel answers the link with an error, and the
        # guard closes the WebSocket.  The link announces Opus, as spice-html5's does.
        self.patch(test_full_path, "spice_link", playback_link)
        self.assertEqual(await spice_link_channel(playback, 5, session_id), 0, "QEMU linked the playback channel")
        start_at = len(playback.received)
        got = await playback.until(lambda got: playback_mode(got, start_at) is not None)
        self.assertEqual(playback_mode(got, start_at), SPICE_AUDIO_DATA_MODE_OPUS)

    def test_playbackChannel(self) -> None:
        """
        When the VM has a SPICE sound card, its playback channel links through the proxy on the console's token and session id, and QEMU announces Opus as its data mode (what spice-html5 plays).
        """
        return Deferred.fromCoroutine(self._playback())


#: spice-protocol: the playback channel's Opus capability, its mode message
#: and the Opus data mode.
SPICE_PLAYBACK_CAP_VOLUME = 1
SPICE_PLAYBACK_CAP_OPUS = 3
SPICE_MSG_PLAYBACK_MODE = 102
SPICE_AUDIO_DATA_MODE_OPUS = 3


def playback_link(channel_type: int, connection_id: int) -> bytes:
    """
    A link message as spice-html5 sends for its playback channel: auth
    selection and mini header, and the Opus and volume channel capabilities.
    """
    common = struct.pack("<I", (1 << 0) | (1 << 3))
    channel = struct.pack("<I", (1 << SPICE_PLAYBACK_CAP_OPUS) | (1 << SPICE_PLAYBACK_CAP_VOLUME))
    body = LINK_MESS.pack(connection_id, channel_type, 0, 1, 1, LINK_MESS.size) + common + channel
    return LINK_HEADER.pack(b"REDQ", 2, 2, len(body)) + body


def playback_mode(got: bytes, start: int) -> Optional[int]:
    """
    The data mode of the first SPICE_MSG_PLAYBACK_MODE among the messages
    (mini headers) from C{got[start:]}, or C{None} while none is complete.
    """
    while len(got) >= start + MINI_HEADER.size:
        msg_type, size = MINI_HEADER.unpack_from(got, start)
        body = start + MINI_HEADER.size
        if len(got) < body + size:
            return None
        if msg_type == SPICE_MSG_PLAYBACK_MODE:
            return struct.unpack_from("<H", got, body + 4)[0]  # u32 time, u16 mode
        start = body + size
    return None


SPICE_MSG_PLAYBACK_DATA = 101


def playback_data_bytes(got: bytes, start: int) -> int:
    """The bytes of Opus data in the complete SPICE_MSG_PLAYBACK_DATA messages from C{got[start:]}."""
    total = 0
    while len(got) >= start + MINI_HEADER.size:
        msg_type, size = MINI_HEADER.unpack_from(got, start)
        if len(got) < start + MINI_HEADER.size + size:
            break
        if msg_type == SPICE_MSG_PLAYBACK_DATA:
            total += size - 4  # u32 time, then the data
        start += MINI_HEADER.size + size
    return total


class GuestSoundTests(TestCase):
    """
    A guest that makes sound (the console bell on QEMU's PC speaker, whose
    audio goes to SPICE): Opus data reaches the browser's playback channel
    through the proxy.
    """

    timeout = 120
    if libvirt is None:
        skip = "libvirt-python is not installed"

    async def _sound(self) -> None:
        guest = ensure_sound_guest()
        port = free_port()
        qemu = start_console_qemu(
            self,
            lambda d: [
                "-m", "256",
                "-machine", "pcspk-audiodev=snd0",
                "-audiodev", "spice,id=snd0",
                "-kernel", guest.kernel, "-initrd", guest.initrd, "-append", guest.cmdline,
                "-serial", f"file:{d}/serial.log",
                "-spice", f"port={port},addr=127.0.0.1,playback-compression=on",
            ],
        )  # fmt: skip
        qemu.set_password("spice", PASSWORD)
        stack = start(self, [domain_xml("vm-sound", UUID_SPICE_SOCKET, [graphics_xml("spice", port, passwd=PASSWORD)])])
        info = await console(self, stack, "vm-sound")
        session_id = await spice_session(self, stack, info)
        playback = await stack.websocket(info["ws_path"], info["token"], protocols=["binary"])
        self.patch(test_full_path, "spice_link", playback_link)
        self.assertEqual(await spice_link_channel(playback, 5, session_id), 0)
        start_at = len(playback.received)
        got = await playback.until(lambda got: playback_data_bytes(got, start_at) >= 2000)
        self.assertEqual(playback_mode(got, start_at), SPICE_AUDIO_DATA_MODE_OPUS)

    def test_opusReachesTheBrowser(self) -> None:
        """
        When the guest rings its bell, the browser's playback channel receives Opus data through the proxy (at least 2000 bytes) after the Opus mode message.
        """
        return Deferred.fromCoroutine(self._sound())
