"""
A session C{libvirtd} run as an unprivileged user in a temporary directory:
the hypervisor of the demo and of the end-to-end tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Dict, List, Optional

from vaporproxy.demo.common import LIBVIRTD_BINARY, PORT_MAX, PORT_MIN, _BASE_PATH, _terminate


class SessionLibvirtd:
    """
    A C{libvirtd} running as C{nobody} with its own directories under a
    temporary directory; root talks to it through its socket.

    @ivar base: the temporary directory.
    @ivar uri: the libvirt URI to connect to (C{qemu:///session?socket=…}).
    """

    def __init__(
        self,
        base: Optional[str] = None,
        port_min: int = PORT_MIN,
        port_max: int = PORT_MAX,
        idle_timeout: Optional[int] = None,
        user: str = "nobody",
        group: str = "nogroup",
    ) -> None:
        self.base = base if base is not None else tempfile.mkdtemp(prefix="vapor-libvirtd-")
        self.port_min = port_min
        self.port_max = port_max
        self.idle_timeout = idle_timeout
        self.user = user
        self.group = group
        self.process: Optional[subprocess.Popen] = None
        self._log = None

    @property
    def socket_path(self) -> str:
        return os.path.join(self.base, "run", "libvirt", "libvirt-sock")

    @property
    def uri(self) -> str:
        return "qemu:///session?socket=" + self.socket_path

    @property
    def log_path(self) -> str:
        return os.path.join(self.base, "libvirtd.log")

    def _environment(self) -> Dict[str, str]:
        b = self.base
        return {
            "PATH": _BASE_PATH,
            "HOME": os.path.join(b, "home"),
            "XDG_RUNTIME_DIR": os.path.join(b, "run"),
            "XDG_CONFIG_HOME": os.path.join(b, "config"),
            "XDG_CACHE_HOME": os.path.join(b, "cache"),
            "XDG_DATA_HOME": os.path.join(b, "data"),
        }

    def start(self, timeout: float = 30.0) -> "SessionLibvirtd":
        """
        Prepare the directories, start the daemon and wait until its socket
        accepts a libvirt connection.
        """
        import pwd

        b = self.base
        for sub in ("home", "run", "config/libvirt", "cache", "data"):
            os.makedirs(os.path.join(b, sub), exist_ok=True)
        with open(os.path.join(b, "config", "libvirt", "qemu.conf"), "w") as f:
            f.write(
                'stdio_handler = "file"\n'
                f"remote_display_port_min = {self.port_min}\n"
                f"remote_display_port_max = {self.port_max}\n"
            )
        pw = pwd.getpwnam(self.user)
        for root, dirs, files in os.walk(b):
            os.chown(root, pw.pw_uid, pw.pw_gid)
            for name in files:
                os.chown(os.path.join(root, name), pw.pw_uid, pw.pw_gid)
        os.chmod(os.path.join(b, "run"), 0o700)
        # The temporary directory itself is 0700 root-owned by mkdtemp; it is
        # chowned above, and root may always enter it.
        argv = [
            "setpriv",
            f"--reuid={self.user}",
            f"--regid={self.group}",
            "--clear-groups",
            LIBVIRTD_BINARY,
        ]
        if self.idle_timeout:
            argv += ["--timeout", str(int(self.idle_timeout))]
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            argv,
            env=self._environment(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=os.path.join(b, "home"),
            start_new_session=True,
        )
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        import libvirt

        libvirt.registerErrorHandler(lambda ctx, err: None, None)
        deadline = time.monotonic() + timeout
        last: Optional[Exception] = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"libvirtd exited with {self.process.returncode}; see {self.log_path}"
                )
            if os.path.exists(self.socket_path):
                try:
                    conn = libvirt.open(self.uri)
                    conn.close()
                    return
                except libvirt.libvirtError as e:
                    last = e
            time.sleep(0.05)
        raise RuntimeError(f"libvirtd not ready after {timeout}s: {last}")

    def connect(self):
        """
        A new read-write libvirt connection to this daemon.
        """
        import libvirt

        return libvirt.open(self.uri)

    def _qemu_pids(self) -> List[int]:
        """
        PIDs of QEMU processes this daemon started (from its pid files).
        """
        pids = []
        run = os.path.join(self.base, "run", "libvirt", "qemu", "run")
        if os.path.isdir(run):
            for name in os.listdir(run):
                if name.endswith(".pid"):
                    try:
                        with open(os.path.join(run, name)) as f:
                            pids.append(int(f.read().strip()))
                    except (OSError, ValueError):
                        pass
        return pids

    def stop(self, remove: bool = True) -> None:
        """
        Destroy every running domain, stop the daemon, and remove the
        directory.  Safe to call more than once.
        """
        if self.process is not None and self.process.poll() is None:
            try:
                conn = self.connect()
                try:
                    for dom in conn.listAllDomains():
                        try:
                            if dom.isActive():
                                dom.destroy()
                        except Exception:
                            pass
                finally:
                    conn.close()
            except Exception:
                pass
        # Whatever QEMU survived (e.g. the daemon died first) goes by PID.
        for pid in self._qemu_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        _terminate(self.process)
        if self._log is not None:
            self._log.close()
            self._log = None
        if remove:
            shutil.rmtree(self.base, ignore_errors=True)
