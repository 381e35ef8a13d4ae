"""
What the demo's parts share: binary paths, the port range, and small
process, port and hashing helpers.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
from typing import Iterable, List, Optional

#: The display port range given to the session libvirtd (REAL-WORLD.md).
PORT_MIN = 5950
PORT_MAX = 5999

QEMU_BINARY = "/usr/bin/qemu-system-x86_64"
LIBVIRTD_BINARY = "/usr/sbin/libvirtd"

#: Environment of the unprivileged daemon: nothing leaks in from ours.
_BASE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def _terminate(process: Optional["subprocess.Popen[bytes]"]) -> None:
    """
    SIGTERM C{process} if it still runs; SIGKILL it after 10 s.
    """
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def repo_root() -> str:
    """
    The directory holding the C{vaporproxy} package (and C{node_modules}).
    """
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def missing_binaries(names: Iterable[str]) -> List[str]:
    """
    The names among C{names} that are neither an existing absolute path nor
    found on C{PATH} (also searching the sbin directories).
    """
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    missing = []
    for name in names:
        if os.path.isabs(name):
            if not os.access(name, os.X_OK):
                missing.append(name)
        elif shutil.which(name, path=path) is None:
            missing.append(name)
    return missing


def free_port(host: str = "127.0.0.1") -> int:
    """
    A TCP port that was free on C{host} a moment ago.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def sha256_hex(secret: str) -> str:
    """
    The lower-case hex SHA-256 of C{secret} (how API keys are stored).
    """
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()
