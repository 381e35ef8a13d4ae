"""
Booting the interactive test VM (L{vaporproxy.demo.guest}) without libvirt,
and reading what it writes on its serial port.

The serial port is a plain file QEMU appends to; L{SerialLog} reads it
line by line.  Waiting blocks (the demo, test set-up); a test running in
the reactor polls L{SerialLog.lines} between its own waits instead.
"""

from __future__ import annotations

import os
import time
from typing import List, Optional, Sequence

from vaporproxy.demo.common import QEMU_BINARY
from vaporproxy.demo.guest import READY_LINE, GuestImage


def plain_qemu_argv(
    guest: GuestImage,
    serial_path: str,
    vnc: str,
    spice: str,
    memory_mib: int = 256,
    binary: str = QEMU_BINARY,
    extra: Sequence[str] = (),
) -> List[str]:
    """
    A TCG QEMU booting C{guest} with qxl video, its serial port in
    C{serial_path}, and C{vnc}/C{spice} as the values of C{-vnc}/C{-spice}
    (e.g. C{"127.0.0.1:10,password=on"}, C{"port=5930,addr=127.0.0.1"}).
    """
    return [
        binary,
        "-machine", "pc,accel=tcg",
        "-m", str(memory_mib),
        "-kernel", guest.kernel,
        "-initrd", guest.initrd,
        "-append", guest.cmdline,
        "-serial", "file:" + serial_path,
        "-display", "none",
        "-vga", "qxl",
        "-vnc", vnc,
        "-spice", spice,
        *extra,
    ]


class SerialLog:
    """
    The serial port file of a running guest.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def lines(self) -> List[str]:
        """
        Every complete line so far, without line ends (C{[]} before the
        file exists).
        """
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return []
        text = data.decode("utf-8", "replace").replace("\r", "")
        return text.split("\n")[:-1]

    def has_line(self, line: str) -> bool:
        """
        Whether C{line} is one of the complete lines so far.
        """
        return line in self.lines()

    def wait_for(self, line: str, timeout: float = 60.0, alive=None) -> float:
        """
        Block until C{line} is a complete line of the file; the seconds it
        took.  C{alive}, if given, is called between polls and returns
        C{False} when the VM is gone (so waiting stops early).

        @raise RuntimeError: after C{timeout} seconds, or when the VM is gone.
        """
        started = time.monotonic()
        while True:
            if self.has_line(line):
                return time.monotonic() - started
            if alive is not None and not alive():
                raise RuntimeError(f"the VM stopped before writing {line!r}; serial: {self.tail()}")
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"no {line!r} on the serial port after {timeout:.0f}s; serial: {self.tail()}")
            time.sleep(0.1)

    def wait_ready(self, timeout: float = 90.0, alive=None) -> float:
        """
        Block until the guest says C{vm: ready}; the seconds it took.
        """
        return self.wait_for(READY_LINE, timeout, alive)

    def tail(self, count: int = 10) -> str:
        """
        The last C{count} lines, for error messages.
        """
        return " | ".join(self.lines()[-count:]) or "(empty)"


def make_serial_file(path: str, owner: Optional[int] = None, group: Optional[int] = None) -> SerialLog:
    """
    Create the (empty) serial file, writable by C{owner} if given (the
    session libvirtd's user), and answer its L{SerialLog}.
    """
    with open(path, "wb"):
        pass
    if owner is not None:
        os.chown(path, owner, group if group is not None else -1)
    os.chmod(path, 0o644)
    return SerialLog(path)
