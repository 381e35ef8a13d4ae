"""
Small helpers the integration and end-to-end tests share: free loopback
ports, polling a condition, a process's memory, exact socket reads, and
the environment and command line of a C{twistd vaporproxy} subprocess
that runs this checkout.  Blocking, reactor-free code only: the Twisted
fixtures live beside the tests that use them (C{tests/integration}).
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
import time
from typing import Any, Callable, Dict, Generic, List, Optional, TypeVar

T = TypeVar("T")

#: The checkout these tests belong to (put on a subprocess's C{PYTHONPATH}).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Seconds one step of a process test may take: a loaded 2-core machine may
#: take tens of seconds to start a twistd process (imports) or to drain one.
STEP = 90.0


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that was free a moment ago.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_vnc_display(first: int = 40, last: int = 90) -> Optional[int]:
    """
    A VNC display number (port 5900 + it) nothing accepts on, or C{None}.
    """
    for display in range(first, last):
        if not listening(5900 + display):
            return display
    return None


def listening(port: int) -> bool:
    """
    Whether something accepts TCP connections on 127.0.0.1:C{port}.
    """
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait(condition: Callable[[], bool], timeout: float = STEP, interval: float = 0.05) -> bool:
    """
    Poll C{condition} until it is true or C{timeout} seconds pass; answer
    whether it came true (the caller says what failed).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return False


def rss_kb(pid: int) -> int:
    """
    The resident memory (KiB) of process C{pid}, from C{/proc}.
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def recv_exactly(sock: socket.socket, size: int, closed: Callable[[], Exception] = lambda: EOFError("closed")) -> bytes:
    """
    Read exactly C{size} bytes from a blocking socket; raise C{closed()}
    when the peer closes first.
    """
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise closed()
        data += chunk
    return data


def checkout_env(**more: str) -> Dict[str, str]:
    """
    This process's environment with the checkout first on C{PYTHONPATH}
    (a subprocess then runs this tree's vaporproxy), plus C{more}.
    """
    env = dict(os.environ, **more)
    env["PYTHONPATH"] = REPO + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    return env


def twistd_argv(config: str, logfile: Optional[str] = None) -> List[str]:
    """
    C{twistd -n vaporproxy --config CONFIG} run by this interpreter (no
    installed C{twistd} script needed), logging to C{logfile} when given.
    """
    log: List[Any] = ["--logfile", logfile] if logfile else []
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
            *log, "vaporproxy", "--config", config]  # fmt: skip


class StartedOnce(Generic[T]):
    """
    A fixture every test of a run shares (call it to get it): made and
    started on first use, closed at exit.  A failed start is closed,
    remembered and raised again, not retried: one slow failure, not one
    per test.
    """

    def __init__(self, failed: str, make: Callable[[], T], start: Callable[[T], Any], close: Callable[[T], Any]):
        """
        @param failed: what a later call's error says first (C{"...: cause"}).
        """
        self.failed, self.make, self.start, self.close = failed, make, start, close
        self._value: Optional[T] = None
        self._failure: Optional[BaseException] = None

    def __call__(self) -> T:
        if self._failure is not None:
            raise RuntimeError(f"{self.failed}: {self._failure}")
        if self._value is None:
            value = self.make()
            atexit.register(self.close, value)
            try:
                self.start(value)
            except BaseException as e:
                self._failure = e
                self.close(value)
                raise
            self._value = value
        return self._value
