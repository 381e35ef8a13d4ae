"""
C{server.workers: 2} for real: one C{twistd vaporproxy} parent, two worker
processes on a shared loopback socket, a real C{redis-server}.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Callable, List

from twisted.trial.unittest import SkipTest, TestCase

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(condition: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def children(pid: int) -> List[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


class WorkersTests(TestCase):
    def setUp(self) -> None:
        if shutil.which("redis-server") is None:
            raise SkipTest("redis-server is not installed")
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        redis_port, self.port = free_port(), free_port()
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.addCleanup(self.redis.wait)
        self.addCleanup(self.redis.terminate)
        config = os.path.join(self.dir, "vapor.conf")
        with open(config, "w") as f:
            f.write(
                'hypervisors: [{uri: "test:///default"}]\n'
                f'server: {{listen: ["tcp:{self.port}:interface=127.0.0.1"], workers: 2}}\n'
                f'tokens: {{backend: redis, redis_url: "redis://127.0.0.1:{redis_port}/0"}}\n'
            )
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.log = os.path.join(self.dir, "twistd.log")
        self.parent = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
             "--logfile", self.log, "vaporproxy", "--config", config],
            env=env, cwd=self.dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.addCleanup(self._kill_all)

    def _kill_all(self) -> None:
        for pid in children(self.parent.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if self.parent.poll() is None:
            self.parent.kill()
        self.parent.wait()

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def logged(self, text: str, times: int = 1) -> Callable[[], bool]:
        return lambda: os.path.exists(self.log) and open(self.log).read().count(text) >= times

    def test_restartAndDrain(self) -> None:
        """
        When a worker is killed another takes its place; SIGTERM to the parent stops every worker.
        """
        self.assertTrue(wait(lambda: len(children(self.parent.pid)) == 2 and self.healthy()))
        first = children(self.parent.pid)
        os.kill(first[0], signal.SIGKILL)
        self.assertTrue(wait(self.logged("died")))
        self.assertTrue(
            wait(lambda: len(children(self.parent.pid)) == 2 and first[0] not in children(self.parent.pid))
        )
        self.assertTrue(wait(self.logged("Site starting on", 3)), open(self.log).read()[-3000:])  # the new one serves
        self.assertTrue(wait(self.healthy))
        workers = children(self.parent.pid)
        self.parent.send_signal(signal.SIGTERM)
        # twistd stops cleanly, then exits by the signal it got (-15).
        self.assertIn(self.parent.wait(20), (0, -signal.SIGTERM))
        for pid in workers:
            self.assertFalse(os.path.exists(f"/proc/{pid}/cmdline") and open(f"/proc/{pid}/cmdline").read())
        log = open(self.log).read()
        self.assertEqual(log.count("Received SIGTERM, shutting down."), 3)  # the parent and two workers
        self.assertEqual(log.count("Server Shut Down."), 3)
        self.assertEqual(log.count("stopped"), 2)
