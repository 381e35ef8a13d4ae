"""
A runnable demo of vaporproxy against a real QEMU VM (C{make run}), and the
fixture parts the end-to-end tests share with it.

C{python3 -m vaporproxy.demo} starts a session C{libvirtd} as user
C{nobody} in a temporary directory, boots the interactive test VM on it
(Debian's kernel and a busybox initramfs with a root shell on the screen,
L{vaporproxy.demo.guest}) with a password-protected VNC and SPICE console,
writes a demo C{vapor.conf} with a fresh random API key (stored as its
SHA-256; the key is printed once), runs C{twistd -n vaporproxy --config
<that file>} and prints the URL to open.  Ctrl-C or SIGTERM stops the
proxy, the VM and libvirtd.

Modules: C{common} (paths, small helpers), C{libvirtd} (L{SessionLibvirtd}),
C{vm} (L{domain_xml}, L{DemoVM}), C{guest} (building the test VM's boot
files), C{boot} (plain-QEMU boot, reading the serial port), C{proxy}
(L{proxy_config_text}, L{ProxyProcess}), C{run} (the command).
"""

from vaporproxy.demo.boot import SerialLog, plain_qemu_argv
from vaporproxy.demo.common import (
    LIBVIRTD_BINARY,
    PORT_MAX,
    PORT_MIN,
    QEMU_BINARY,
    free_port,
    missing_binaries,
    repo_root,
    sha256_hex,
)
from vaporproxy.demo.guest import GuestImage, ensure_guest
from vaporproxy.demo.libvirtd import SessionLibvirtd
from vaporproxy.demo.proxy import ProxyProcess, proxy_config_text
from vaporproxy.demo.vm import DemoVM, domain_xml, live_graphics_ports

__all__ = [
    "DemoVM",
    "GuestImage",
    "LIBVIRTD_BINARY",
    "PORT_MAX",
    "PORT_MIN",
    "ProxyProcess",
    "QEMU_BINARY",
    "SerialLog",
    "SessionLibvirtd",
    "domain_xml",
    "ensure_guest",
    "free_port",
    "live_graphics_ports",
    "missing_binaries",
    "plain_qemu_argv",
    "proxy_config_text",
    "repo_root",
    "sha256_hex",
]
