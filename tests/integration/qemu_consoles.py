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
from typing import Any, Callable, Sequence

from .qemu_fixture import QemuProcess, start_diskless_qemu


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
    return start_diskless_qemu(testcase, display_args, ConsoleQemu)


def socket_path(qemu: ConsoleQemu, name: str) -> str:
    """The path of socket C{name} in C{qemu}'s work directory."""
    return os.path.join(qemu.workdir, name)

