"""
A real C{redis-server} for integration tests: started on a free loopback
port in a temporary directory, stopped by its PID.  L{SentinelGroup}: a
master, a replica and three sentinels, for the failover tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any, List, Optional, Sequence

from twisted.trial.unittest import SkipTest

from tests.support import free_port

__all__ = ["RedisServer", "SentinelGroup", "redis_command", "stop_process"]


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


class RedisServer:
    """
    One C{redis-server} process.

    @ivar port: its port (kept across L{stop} and L{start}, so clients can
        reconnect to the same address).
    @ivar url: C{redis://127.0.0.1:PORT/0}.
    """

    def __init__(self, port: Optional[int] = None, args: Sequence[str] = ()):
        """
        @param args: more C{redis-server} arguments (e.g. C{--replicaof}).
        """
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise SkipTest("redis-server is not installed (apt-get install redis-server)")
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.directory = tempfile.mkdtemp(prefix="vaporproxy-redis-")
        self.process: Optional[subprocess.Popen] = None
        self.args = list(args)

    def argv(self) -> List[str]:
        return [
            self.binary or "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self.directory,
            "--logfile", os.path.join(self.directory, "redis.log"),
        ] + self.args  # fmt: skip

    def start(self, timeout: float = 10.0) -> None:
        """
        Start the server and wait until it answers PING.
        """
        self.process = subprocess.Popen(
            self.argv(),
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

    def command(self, *args: Any) -> Any:
        """
        One command's answer, synchronously (see L{redis_command}).
        """
        return redis_command(self.port, *args)

    def kill(self) -> None:
        """
        C{kill -9} the server by its PID (no shutdown, no goodbye to
        clients or replicas) and reap it.
        """
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)

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


def _read_reply(f: Any) -> Any:
    line = f.readline()
    if not line.endswith(b"\r\n"):
        raise OSError("connection closed")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        return None if int(rest) < 0 else f.read(int(rest) + 2)[:-2].decode()
    if kind == b"*":
        return None if int(rest) < 0 else [_read_reply(f) for _ in range(int(rest))]
    raise OSError(f"unexpected reply {line!r}")


def redis_command(port: int, *args: Any, timeout: float = 1.0) -> Any:
    """
    Send one command to the Redis (or sentinel) on 127.0.0.1:C{port} and
    answer its reply, synchronously; for setting up and watching test
    servers, never for the code under test.

    @raise OSError: when it cannot be reached.
    @raise RuntimeError: for an error reply.
    """
    parts = [str(a).encode() for a in args]
    request = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        with s.makefile("rb") as f:
            return _read_reply(f)


def _pairs(reply: List[Any]) -> dict:
    return dict(zip(reply[::2], reply[1::2]))


class SentinelServer(RedisServer):
    """
    One Sentinel: C{redis-server sentinel.conf --sentinel} (what Debian's
    C{redis-sentinel} runs), monitoring C{master} under C{name}.
    """

    def __init__(self, name: str, master_port: int, down_after_ms: int, failover_timeout_ms: int):
        super().__init__()
        self.config_path = os.path.join(self.directory, "sentinel.conf")
        with open(self.config_path, "w", encoding="utf-8") as f:
            f.write(
                f"port {self.port}\nbind 127.0.0.1\ndir {self.directory}\n"
                f"logfile {os.path.join(self.directory, 'redis.log')}\n"
                f"sentinel monitor {name} 127.0.0.1 {master_port} 2\n"
                f"sentinel down-after-milliseconds {name} {down_after_ms}\n"
                f"sentinel failover-timeout {name} {failover_timeout_ms}\n"
                f"sentinel parallel-syncs {name} 1\n"
            )

    def argv(self) -> List[str]:
        return [self.binary or "redis-server", self.config_path, "--sentinel"]

    def master(self, name: str) -> dict:
        """
        This sentinel's C{SENTINEL MASTER name} as a dict.
        """
        return _pairs(self.command("SENTINEL", "MASTER", name))


class SentinelGroup:
    """
    A master, one replica of it and three sentinels (quorum 2), each a
    process on its own loopback port.

    @ivar name: the master's name at the sentinels.
    """

    def __init__(self, name: str = "vaporproxy", down_after_ms: int = 1000, failover_timeout_ms: int = 5000):
        self.name = name
        # No 5 s wait before a full sync (Redis 7's default), on both: the
        # replica is the master after the failover.
        fast_sync = ["--repl-diskless-sync-delay", "0"]
        self.master = RedisServer(args=fast_sync)
        self.replica = RedisServer(args=fast_sync + ["--replicaof", "127.0.0.1", str(self.master.port)])
        self.sentinels = [
            SentinelServer(name, self.master.port, down_after_ms, failover_timeout_ms) for _ in range(3)
        ]

    @property
    def servers(self) -> List[RedisServer]:
        return [self.master, self.replica, *self.sentinels]

    @property
    def addresses(self) -> List[str]:
        """
        The sentinels as C{host:port}, as C{tokens.redis_sentinel} takes them.
        """
        return [f"127.0.0.1:{s.port}" for s in self.sentinels]

    def start(self, timeout: float = 20.0) -> None:
        """
        Start the master and the replica, wait for the replication link,
        start the sentinels and wait until each knows the replica and the
        two other sentinels (so a failover can happen).
        """
        self.master.start()
        self.replica.start()
        self._wait(lambda: "master_link_status:up" in self.replica.command("INFO", "replication"), timeout, "replication")
        for sentinel in self.sentinels:
            sentinel.start()

        def ready() -> bool:
            states = [s.master(self.name) for s in self.sentinels]
            return all(int(m["num-slaves"]) >= 1 and int(m["num-other-sentinels"]) >= 2 for m in states)

        self._wait(ready, timeout, "sentinels to know each other and the replica")

    def _wait(self, probe: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if probe():
                    return
            except (OSError, RuntimeError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"gave up waiting for {what} after {timeout}s")
            time.sleep(0.05)

    def master_port(self) -> Optional[int]:
        """
        The master's port as the first answering sentinel names it.
        """
        for sentinel in self.sentinels:
            try:
                host_port = sentinel.command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name)
                return int(host_port[1])
            except (OSError, RuntimeError, TypeError):
                continue
        return None

    def cleanup(self) -> None:
        """
        Stop every process and remove their directories.
        """
        for server in self.servers:
            server.cleanup()
