"""
A real C{redis-server} for integration tests: started on a free loopback
port in a temporary directory, stopped by its PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Optional

from twisted.trial.unittest import SkipTest

__all__ = ["RedisServer", "free_port", "stop_process"]


def stop_process(process: Optional[subprocess.Popen], grace: float = 5.0) -> None:
    """
    Stop a child process by its PID: SIGTERM, then SIGKILL after C{grace}
    seconds; reap it.  Nothing when it is not running.
    """
    if process is None or process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that was free a moment ago.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """
    One C{redis-server} process.

    @ivar port: its port (kept across L{stop} and L{start}, so clients can
        reconnect to the same address).
    @ivar url: C{redis://127.0.0.1:PORT/0}.
    """

    def __init__(self, port: Optional[int] = None):
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise SkipTest("redis-server is not installed (apt-get install redis-server)")
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.directory = tempfile.mkdtemp(prefix="vaporproxy-redis-")
        self.process: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 10.0) -> None:
        """
        Start the server and wait until it answers PING.
        """
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", self.directory,
                "--logfile", os.path.join(self.directory, "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}; see {self.directory}/redis.log")
            if self.ping():
                return
            time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not answer within {timeout}s")

    def ping(self) -> bool:
        """
        Whether the server answers PING right now.
        """
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """
        Stop the server (SIGTERM, then SIGKILL) by its PID and reap it.
        """
        process, self.process = self.process, None
        stop_process(process)

    def cleanup(self) -> None:
        """
        Stop the server and remove its directory.
        """
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
