"""
Tests for L{vaporproxy.app.workers}: the supervisor of C{server.workers}
processes, on a memory reactor with fake processes.
"""

from __future__ import annotations

import os
import socket
from typing import Any, List

from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from vaporproxy.config import ConfigError
from vaporproxy.app.workers import (
    AdoptedPortService,
    WorkerSupervisor,
    check_shareable,
    is_proxy_endpoint,
    parse_worker_fds,
    worker_argv,
)


class FakePort:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.reading = True
        self.listening = True

    def fileno(self) -> int:
        return self.fd

    def stopReading(self) -> None:
        self.reading = False

    def stopListening(self) -> Any:
        self.listening = False
        return succeed(None)


class FakeEndpoint:
    def __init__(self, fd: int) -> None:
        self.port = FakePort(fd)
        self.factories: List[Any] = []

    def listen(self, factory: Any) -> Any:
        self.factories.append(factory)
        return succeed(self.port)


class FakeProcess:
    def __init__(self, reactor: "ProcessReactor", protocol: Any, argv: List[str], child_fds: dict, env: dict):
        self.reactor = reactor
        self.protocol = protocol
        self.argv = argv
        self.child_fds = child_fds
        self.env = env
        self.pid = 1000 + len(reactor.processes)
        self.signals: List[str] = []
        self.alive = True

    def signalProcess(self, name: str) -> None:
        if not self.alive:
            raise OSError("no such process")
        self.signals.append(name)

    def end(self, reason: Failure) -> None:
        self.alive = False
        self.protocol.processEnded(reason)


class ProcessReactor(MemoryReactorClock):
    def __init__(self) -> None:
        super().__init__()
        self.processes: List[FakeProcess] = []

    def spawnProcess(self, protocol: Any, executable: str, args: List[str], env: Any = None,
                     path: Any = None, uid: Any = None, gid: Any = None, usePTY: bool = False,
                     childFDs: Any = None) -> FakeProcess:  # fmt: skip
        process = FakeProcess(self, protocol, list(args), dict(childFDs or {}), dict(env or {}))
        protocol.makeConnection(process)
        self.processes.append(process)
        return process

    def callFromThread(self, f: Any, *args: Any) -> None:
        self.callLater(0, f, *args)


def argv(fds: List[int]) -> List[str]:
    return ["/usr/bin/worker", "--worker-fds", ",".join(map(str, fds))]


class SupervisorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = ProcessReactor()
        self.endpoints = [FakeEndpoint(7), FakeEndpoint(9)]
        self.supervisor = WorkerSupervisor(
            3, self.endpoints, argv, self.reactor, restart_delay=2.0, stop_timeout=10.0, environ={"A": "1"}
        )
        self.supervisor.startService()
        self.addCleanup(lambda: self.supervisor.running and self.supervisor.stopService())

    def test_startsWorkersWithSockets(self) -> None:
        """
        When started, the parent listens without accepting and gives every worker the sockets.
        """
        self.assertEqual([e.port.reading for e in self.endpoints], [False, False])
        self.assertEqual(len(self.reactor.processes), 3)
        for index, process in enumerate(self.reactor.processes):
            self.assertEqual(process.argv, ["/usr/bin/worker", "--worker-fds", "7,9"])
            self.assertEqual(process.child_fds, {0: "w", 1: "r", 2: "r", 7: 7, 9: 9})
            self.assertEqual(process.env, {"A": "1", "VAPOR_WORKER": str(index)})

    def test_restartsDeadWorker(self) -> None:
        """
        When a worker dies, the same worker slot is started again after the delay.
        """
        dead = self.reactor.processes[1]
        dead.end(Failure(ProcessTerminated(signal=9)))
        self.assertEqual(len(self.reactor.processes), 3)
        self.reactor.advance(2.0)
        self.assertEqual(len(self.reactor.processes), 4)
        self.assertEqual(self.reactor.processes[3].env["VAPOR_WORKER"], "1")
        self.assertIs(self.supervisor.workers[1], self.reactor.processes[3])

    def test_stopDrains(self) -> None:
        """
        When stopped, every worker gets SIGTERM and the ports close only after all have ended.
        """
        d = self.supervisor.stopService()
        self.assertEqual([p.signals for p in self.reactor.processes], [["TERM"]] * 3)
        for process in self.reactor.processes[:2]:
            process.end(Failure(ProcessDone(0)))
        self.assertNoResult(d)
        self.assertTrue(self.endpoints[0].port.listening)
        self.reactor.processes[2].end(Failure(ProcessDone(0)))
        self.successResultOf(d)
        self.assertEqual([e.port.listening for e in self.endpoints], [False, False])
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.processes), 3)  # nothing restarted

    def test_stopKillsStragglers(self) -> None:
        """
        When a worker does not drain within stop_timeout, it is killed.
        """
        d = self.supervisor.stopService()
        for process in self.reactor.processes[:2]:
            process.end(Failure(ProcessDone(0)))
        self.reactor.advance(10.0)
        self.assertEqual(self.reactor.processes[2].signals, ["TERM", "KILL"])
        self.reactor.processes[2].end(Failure(ProcessTerminated(signal=9)))
        self.successResultOf(d)

    def test_pendingRestartCancelledAtStop(self) -> None:
        """
        When the supervisor stops while a restart is pending, no worker is started.
        """
        self.reactor.processes[0].end(Failure(ProcessTerminated(exitCode=1)))
        d = self.supervisor.stopService()
        for process in self.reactor.processes[1:]:
            process.end(Failure(ProcessDone(0)))
        self.successResultOf(d)
        self.reactor.advance(5)
        self.assertEqual(len(self.reactor.processes), 3)

    def test_reloadForwardsHup(self) -> None:
        """
        When the parent reloads, every worker gets SIGHUP.
        """
        self.supervisor.reload_workers()
        self.assertEqual([p.signals for p in self.reactor.processes], [["HUP"]] * 3)

    def test_relaysOutput(self) -> None:
        """
        When a worker writes lines, each complete line is logged once.
        """
        from twisted.logger import globalLogPublisher

        events: List[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        protocol = self.reactor.processes[0].protocol
        protocol.childDataReceived(1, b"one\ntw")
        protocol.childDataReceived(1, b"o\n")
        self.assertEqual([e["line"] for e in events if "line" in e], ["one", "two"])


class HelpersTests(SynchronousTestCase):
    def test_parseWorkerFds(self) -> None:
        """
        When descriptors are given as a list they parse; stdio numbers and junk are refused.
        """
        self.assertEqual(parse_worker_fds("5,6"), [5, 6])
        self.assertRaises(ValueError, parse_worker_fds, "1")
        self.assertRaises(ValueError, parse_worker_fds, "x")

    def test_sslNotShareable(self) -> None:
        """
        When workers > 1 and an endpoint is ssl:, the error names it and says what to do.
        """
        check_shareable(["tcp:8080", "ssl:8443"], 1)
        error = self.assertRaises(ConfigError, check_shareable, ["tcp:8080", "ssl:8443"], 2)
        self.assertEqual(
            str(error),
            "server.listen[1]: 'ssl:8443' cannot be shared by 2 workers (expected tcp:/tcp6:/unix:"
            " endpoints, optionally under haproxy:, with server.workers > 1; terminate TLS in front of"
            " vaporproxy, or use workers: 1)",
        )

    def test_proxyShareable(self) -> None:
        """
        When workers > 1, haproxy: over tcp/unix is accepted and haproxy: over ssl (or nested) is refused.
        """
        check_shareable(["haproxy:tcp:8080:interface=127.0.0.1", "haproxy:unix:/run/v.sock", "tcp6:8081"], 2)
        for description in ("haproxy:ssl:8443", "HAPROXY:haproxy:tcp:8080", "systemd:domain=INET:index=0"):
            error = self.assertRaises(ConfigError, check_shareable, ["tcp:8080", description], 2)
            self.assertTrue(str(error).startswith(f"server.listen[1]: {description!r} cannot be shared"))
        self.assertTrue(is_proxy_endpoint("haproxy:tcp:8080"))
        self.assertFalse(is_proxy_endpoint("tcp:8080"))

    def test_workerArgv(self) -> None:
        """
        When a worker command line is built, it runs twistd vaporproxy with the config and descriptors.
        """
        command = worker_argv("/etc/vapor.conf")([5, 6])
        self.assertEqual(
            command[3:],
            ["--nodaemon", "--pidfile=", "--logfile=-", "vaporproxy", "--config", "/etc/vapor.conf",
             "--worker-fds", "5,6"],
        )  # fmt: skip


class AdoptedPortTests(SynchronousTestCase):
    """
    L{AdoptedPortService} on a memory reactor with a real inherited socket.
    """

    def adopt(self, proxy: bool) -> Any:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        fd = os.dup(listener.fileno())
        reactor = MemoryReactorClock()
        site = ServerFactory.forProtocol(Recorder)
        service = AdoptedPortService(fd, site, reactor, proxy=proxy)
        service.startService()
        [(adopted_fd, family, factory)] = reactor.adoptedPorts
        self.assertEqual((adopted_fd, family), (fd, socket.AF_INET))
        self.assertRaises(OSError, os.fstat, fd)  # the inherited copy is closed
        self.assertIsNotNone(service.port)
        service.stopService()
        self.assertIsNone(service.port)
        return site, factory

    def connect(self, factory: Any) -> Any:
        protocol = factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 40000))
        protocol.makeConnection(transport)
        return protocol

    def test_plain(self) -> None:
        """
        When the endpoint is plain, connections reach the factory's protocol unchanged.
        """
        site, factory = self.adopt(proxy=False)
        self.assertIs(factory, site)
        protocol = self.connect(factory)
        protocol.dataReceived(b"GET / HTTP/1.1\r\n")
        self.assertEqual(protocol.received, [b"GET / HTTP/1.1\r\n"])

    def test_proxyHeaderStripped(self) -> None:
        """
        When the endpoint was haproxy:, the adopted port reads the PROXY header: the protocol sees only HTTP and the client's address.
        """
        site, factory = self.adopt(proxy=True)
        self.assertIsNot(factory, site)
        wrapper = self.connect(factory)
        wrapper.dataReceived(b"PROXY TCP4 192.0.2.7 127.0.0.1 51234 8080\r\nGET / HTTP/1.1\r\n")
        protocol = wrapper.wrappedProtocol
        self.assertIsInstance(protocol, Recorder)
        self.assertEqual(b"".join(protocol.received), b"GET / HTTP/1.1\r\n")
        self.assertEqual(protocol.transport.getPeer().host, "192.0.2.7")


class Recorder(Protocol):
    def connectionMade(self) -> None:
        self.received: List[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)
