"""
C{server.workers: 2} for real: one C{twistd vaporproxy} parent, two worker
processes on a shared loopback socket, a real C{redis-server}.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import urllib.request
from typing import Callable, List, Optional

from twisted.trial.unittest import SkipTest, TestCase

from tests.support import STEP, checkout_env, free_port, twistd_argv, wait

#: A worker's line when it serves the adopted socket ("Site (PROXY) ..." under haproxy:).
SERVING = re.compile(r"worker \d+: .*Site (?:\(PROXY\) )?starting on")


def children(pid: int) -> List[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def ok(response: bytes) -> bool:
    """
    Whether an HTTP response's status is 200.
    """
    return response.split(b"\r\n", 1)[0].split(b" ")[1:2] == [b"200"]


class WorkersTests(TestCase):
    """
    A supervisor and two workers, each test with its own Redis and port.
    """

    #: trial's limit for the whole test (its steps wait up to STEP each).
    timeout = 600

    def setUp(self) -> None:
        if shutil.which("redis-server") is None:
            raise SkipTest("redis-server is not installed")
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.redis_port, self.port = free_port(), free_port()
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.addCleanup(self.redis.wait)
        self.addCleanup(self.redis.terminate)
        self.log = os.path.join(self.dir, "twistd.log")
        self.parent: Optional[subprocess.Popen] = None

    def start(self, listen: str) -> subprocess.Popen:
        """
        Start the supervisor of two workers on C{listen}.
        """
        config = os.path.join(self.dir, "vapor.conf")
        with open(config, "w") as f:
            f.write(
                'hypervisors: [{uri: "test:///default"}]\n'
                f'server: {{listen: ["{listen}"], workers: 2}}\n'
                f'tokens: {{backend: redis, redis_url: "redis://127.0.0.1:{self.redis_port}/0"}}\n'
            )
        self.parent = subprocess.Popen(
            twistd_argv(config, self.log), env=checkout_env(), cwd=self.dir,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.addCleanup(self._kill_all)
        return self.parent

    def _kill_all(self) -> None:
        for pid in children(self.parent.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if self.parent.poll() is None:
            self.parent.kill()
        self.parent.wait()

    def text(self) -> str:
        try:
            with open(self.log) as f:
                return f.read()
        except OSError:
            return ""

    def tail(self) -> str:
        return self.text()[-4000:]

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def logged(self, text: str, times: int = 1) -> Callable[[], bool]:
        return lambda: self.text().count(text) >= times

    def workers_serving(self, times: int) -> Callable[[], bool]:
        """
        Both workers are up, and C{times} workers in all have started serving.
        """
        return lambda: len(children(self.parent.pid)) == 2 and len(SERVING.findall(self.text())) >= times

    def test_restartAndDrain(self) -> None:
        """
        When a worker is killed another takes its place; SIGTERM to the parent stops every worker.
        """
        self.start(f"tcp:{self.port}:interface=127.0.0.1")
        self.assertTrue(wait(self.workers_serving(2)), self.tail())
        self.assertTrue(wait(self.healthy), self.tail())
        first = children(self.parent.pid)
        os.kill(first[0], signal.SIGKILL)
        self.assertTrue(wait(self.logged("died")), self.tail())
        self.assertTrue(
            wait(lambda: len(children(self.parent.pid)) == 2 and first[0] not in children(self.parent.pid)),
            self.tail(),
        )
        self.assertTrue(wait(self.workers_serving(3)), self.tail())  # the new one serves
        self.assertTrue(wait(self.healthy), self.tail())
        workers = children(self.parent.pid)
        self.parent.send_signal(signal.SIGTERM)
        # twistd stops cleanly, then exits by the signal it got (-15).  The
        # supervisor waits for its workers to drain (stop_timeout 30s).
        try:
            code = self.parent.wait(STEP)
        except subprocess.TimeoutExpired:
            self.fail(f"the supervisor did not exit within {STEP}s of SIGTERM:\n{self.tail()}")
        self.assertIn(code, (0, -signal.SIGTERM), self.tail())
        for pid in workers:
            self.assertFalse(os.path.exists(f"/proc/{pid}/cmdline") and open(f"/proc/{pid}/cmdline").read())
        log = self.text()
        self.assertEqual(log.count("Received SIGTERM, shutting down."), 3, log[-4000:])  # the parent and two workers
        self.assertEqual(log.count("Server Shut Down."), 3, log[-4000:])
        # The two workers alive at SIGTERM drained (none was killed).
        self.assertEqual(len(re.findall(r"worker \d+ stopped", log)), 2, log[-4000:])
        self.assertNotIn("did not drain", log)

    def test_proxyProtocolWorkers(self) -> None:
        """
        When the endpoint is haproxy:tcp:, every worker reads the PROXY header: proxied requests are served and bare HTTP is refused.
        """
        self.start(f"haproxy:tcp:{self.port}:interface=127.0.0.1")
        self.assertTrue(wait(self.workers_serving(2)), self.tail())
        self.assertTrue(wait(lambda: ok(self.request(proxied=True))), self.tail())
        # The kernel spreads connections over both workers; every one must read the header.
        for _ in range(12):
            self.assertTrue(ok(self.request(proxied=True)), self.tail())
            self.assertEqual(self.request(proxied=False), b"")
        # The access log shows the client address from the header, not the proxy's.
        self.assertTrue(wait(lambda: len(re.findall(r'"192\.0\.2\.7" .*"GET /healthz', self.text())) >= 13))

    def request(self, proxied: bool) -> bytes:
        """
        GET /healthz on a raw connection, with or without a PROXY v1 header;
        answers what came back (b"" when the connection was closed).
        """
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
                if proxied:
                    s.sendall(f"PROXY TCP4 192.0.2.7 127.0.0.1 51234 {self.port}\r\n".encode())
                s.sendall(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                answer = b""
                while True:
                    data = s.recv(65536)
                    if not data:
                        return answer
                    answer += data
        except OSError:
            return b""
