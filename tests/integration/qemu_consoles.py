"""
A plain QEMU (no libvirt) whose consoles are configured as production hosts
have them: SPICE on a TLS port only (C{x509-dir}), VNC and SPICE on UNIX
sockets.  For the integration tests of L{vaporproxy.relay.dial}.

Usage in a trial test case::

    qemu = start_console_qemu(self, ["-spice", f"tls-port={port},addr=127.0.0.1,x509-dir={d}"])
    qemu.set_password("spice", "t1cket")

Skips the test only when C{qemu-system-x86_64} is absent; the process is
killed in the test's cleanup.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from typing import Any, Callable, Sequence

from twisted.trial.unittest import SkipTest

from .qemu_fixture import QEMU, QemuProcess, launch, qemu_available


class ConsoleQemu(QemuProcess):
    """
    A running QEMU with its QMP connection, without the TCP VNC server
    L{QemuProcess} expects.
    """

    def __init__(self, process: subprocess.Popen, qmp_path: str, workdir: str):
        super().__init__(process, qmp_path, workdir, spice_port=None, vnc_tcp=False)


def start_console_qemu(testcase: Any, display_args: Callable[[str], Sequence[str]]) -> ConsoleQemu:
    """
    Start a diskless TCG QEMU with the display arguments C{display_args(workdir)}
    gives (its files, sockets included, belong in C{workdir}).

    @raise SkipTest: when QEMU is not installed.
    """
    binary = qemu_available()
    if binary is None:
        raise SkipTest("%s is not installed" % (QEMU,))
    workdir = tempfile.mkdtemp(prefix="vp-qemu-")
    qmp_path = os.path.join(workdir, "qmp.sock")
    args = [
        binary,
        "-machine", "pc,accel=tcg",
        "-m", "128",
        "-nodefaults",
        "-vga", "std",
        "-display", "none",
        *display_args(workdir),
        "-qmp", "unix:%s,server=on,wait=off" % (qmp_path,),
    ]  # fmt: skip
    return launch(testcase, args, workdir, lambda process: ConsoleQemu(process, qmp_path, workdir))


def socket_path(qemu: ConsoleQemu, name: str) -> str:
    """The path of socket C{name} in C{qemu}'s work directory."""
    return os.path.join(qemu.workdir, name)

