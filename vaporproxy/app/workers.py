"""
C{server.workers: N}: one C{twistd vaporproxy} runs N worker processes
that share the listening sockets (issue #4).

The parent (L{WorkerSupervisor}) listens on every C{server.listen}
endpoint, never accepts, and hands the listening file descriptors to N
children started with C{--worker-fds}.  Each child is an ordinary
vaporproxy that adopts those sockets (L{AdoptedPortService},
C{IReactorSocket.adoptStreamPort}) instead of listening itself; the
kernel spreads the connections.  Tokens and limits live in Redis (the
config refuses C{workers > 1} with the memory backend).  A worker that
dies is restarted after C{restart_delay}; stopping the parent (SIGTERM)
sends SIGTERM to every worker and waits until they have drained, killing
any that outlive C{stop_timeout}.

Only C{tcp:}, C{tcp6:} and C{unix:} endpoints are shared, optionally
under Twisted's PROXY-protocol wrapper (C{haproxy:tcp:...}), which each
worker puts back around its adopted socket.  C{ssl:} endpoints are not
shared (a child cannot rebuild the TLS context of an adopted socket without
private Twisted API); with workers, terminate TLS in front of vaporproxy or
run one process.  The workers get the parent's C{server.listen} as
C{--listen} options, so that the N-th descriptor goes with the N-th
endpoint.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail, gatherResults, succeed
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import Logger
from twisted.protocols.haproxy import proxyEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer

from vaporproxy.config import ConfigError

log = Logger(namespace="vaporproxy.workers")

#: Endpoint types whose listening socket a worker can adopt as it is.
SHAREABLE = ("tcp", "tcp6", "unix")
#: Twisted's PROXY-protocol wrapper endpoint (a prefix to another endpoint).
PROXY_PREFIX = "haproxy"


def _kind(description: str) -> str:
    return description.split(":", 1)[0].strip().lower()


def is_proxy_endpoint(description: str) -> bool:
    """
    Whether C{description} is wrapped in Twisted's PROXY-protocol endpoint
    (C{haproxy:tcp:8080}).
    """
    return _kind(description) == PROXY_PREFIX


def _inner(description: str) -> str:
    if is_proxy_endpoint(description):
        return description.split(":", 1)[1] if ":" in description else ""
    return description


def check_shareable(listen: Sequence[str], workers: int) -> None:
    """
    @raise ConfigError: when C{workers > 1} and an endpoint cannot be shared
        (anything but C{tcp:}/C{tcp6:}/C{unix:}, each optionally under one
        C{haproxy:}).
    """
    if workers > 1:
        for i, description in enumerate(listen):
            if _kind(_inner(description)) not in SHAREABLE:
                raise ConfigError(
                    f"server.listen[{i}]: {description!r} cannot be shared by {workers} workers"
                    " (expected tcp:/tcp6:/unix: endpoints, optionally under haproxy:, with server.workers > 1;"
                    " terminate TLS in front of vaporproxy, or use workers: 1)"
                )


def parse_worker_fds(text: str) -> List[int]:
    """
    C{"5,6"} -> C{[5, 6]}.

    @raise ValueError: when it is not a list of descriptors.
    """
    fds = [int(part) for part in text.split(",") if part.strip()]
    if not fds or any(fd < 3 for fd in fds):
        raise ValueError(f"{text!r} is not a list of inherited descriptors (expected e.g. 5,6)")
    return fds


@implementer(IStreamServerEndpoint)
class AdoptedEndpoint:
    """
    A server endpoint whose C{listen} adopts an inherited listening socket
    (and closes the inherited descriptor: the reactor keeps its own copy).
    Can be listened on once.
    """

    def __init__(self, reactor: Any, fd: int):
        self.reactor = reactor
        self.fd = fd

    def listen(self, factory: Factory) -> Deferred:
        try:
            port = self.reactor.adoptStreamPort(self.fd, _family(self.fd), factory)
        except Exception:
            return fail()
        os.close(self.fd)
        return succeed(port)


class AdoptedPortService(Service):
    """
    Serve C{factory} on a listening socket inherited from the supervisor.

    @param proxy: the endpoint was C{haproxy:...}: every connection starts
        with a PROXY-protocol header, read by Twisted's wrapper as on a
        C{haproxy:} endpoint (the peer address is then the client's).
    """

    def __init__(self, fd: int, factory: Factory, reactor: Any, proxy: bool = False):
        self.fd = fd
        self.factory = factory
        self.reactor = reactor
        self.proxy = proxy
        self.port: Any = None

    def startService(self) -> None:
        super().startService()
        endpoint: Any = AdoptedEndpoint(self.reactor, self.fd)
        if self.proxy:
            endpoint = proxyEndpoint(endpoint)
        outcome: List[Any] = []
        endpoint.listen(self.factory).addBoth(outcome.append)  # fires at once
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        self.port = outcome[0]

    def stopService(self) -> Optional[Deferred]:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


def _family(fd: int) -> int:
    probe = socket.socket(fileno=os.dup(fd))
    try:
        return probe.family
    finally:
        probe.close()


class _NeverAccept(Factory):
    """
    The parent's ports never accept; this is never asked for a protocol.
    """

    protocol = Protocol


class WorkerProtocol(ProcessProtocol):
    """
    One worker: relays its output lines to our log and tells the
    supervisor when it ends.
    """

    def __init__(self, supervisor: "WorkerSupervisor", index: int):
        self.supervisor = supervisor
        self.index = index
        self.ended: Deferred = Deferred()
        self._buffers: Dict[int, bytes] = {1: b"", 2: b""}

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        lines = (self._buffers.get(childFD, b"") + data).split(b"\n")
        self._buffers[childFD] = lines.pop()
        for line in lines:
            log.info("worker {index}: {line}", index=self.index, line=line.decode("utf-8", "replace"))

    def processEnded(self, reason: Failure) -> None:
        self.supervisor.worker_ended(self, reason)
        self.ended.callback(None)


class WorkerSupervisor(Service):
    """
    Listens, starts C{count} workers with the listening sockets, restarts
    any that die, and drains them all at stop.

    @param endpoints: the server endpoints to listen on (their ports must
        have C{fileno} and C{stopReading}, as TCP and UNIX ports do).
    @param argv: called with the inherited descriptors; answers the
        worker's command line (C{argv[0]} is the executable).
    """

    name = "workers"

    def __init__(
        self,
        count: int,
        endpoints: Sequence[Any],
        argv: Callable[[List[int]], List[str]],
        reactor: Any,
        restart_delay: float = 1.0,
        stop_timeout: float = 30.0,
        environ: Optional[Dict[str, str]] = None,
    ):
        self.count = count
        self.endpoints = list(endpoints)
        self.argv = argv
        self.reactor = reactor
        self.restart_delay = restart_delay
        self.stop_timeout = stop_timeout
        self.environ = dict(os.environ if environ is None else environ)
        self.ports: List[Any] = []
        self.fds: List[int] = []
        self.workers: Dict[int, Any] = {}  # index -> IProcessTransport
        self.protocols: Dict[int, WorkerProtocol] = {}
        self._restarts: Dict[int, Any] = {}
        self.started: Optional[Deferred] = None
        self._previous_hup: Any = None

    def startService(self) -> None:
        super().startService()
        if threading.current_thread() is threading.main_thread():
            self._previous_hup = signal.signal(signal.SIGHUP, self._forward_hup)
        self.started = Deferred.fromCoroutine(self._start())
        self.started.addErrback(lambda f: log.failure("workers could not start", f))

    async def _start(self) -> None:
        for endpoint in self.endpoints:
            port = await endpoint.listen(_NeverAccept())
            port.stopReading()  # the workers accept, not us
            self.ports.append(port)
            self.fds.append(port.fileno())
        log.info("starting {count} workers on descriptors {fds}", count=self.count, fds=self.fds)
        for index in range(self.count):
            self.spawn(index)

    def _forward_hup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload_workers)

    def reload_workers(self) -> None:
        """
        Pass SIGHUP on: every worker reloads the config file.
        """
        log.info("SIGHUP: asking {count} workers to reload", count=len(self.workers))
        for transport in list(self.workers.values()):
            _signal(transport, "HUP")

    def spawn(self, index: int) -> None:
        """
        Start worker C{index}.
        """
        self._restarts.pop(index, None)
        protocol = WorkerProtocol(self, index)
        argv = self.argv(self.fds)
        child_fds: Dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        child_fds.update({fd: fd for fd in self.fds})
        env = dict(self.environ, VAPOR_WORKER=str(index))
        transport = self.reactor.spawnProcess(protocol, argv[0], argv, env=env, childFDs=child_fds)
        self.workers[index] = transport
        self.protocols[index] = protocol
        log.info("worker {index} started (pid {pid})", index=index, pid=getattr(transport, "pid", None))

    def worker_ended(self, protocol: WorkerProtocol, reason: Failure) -> None:
        index = protocol.index
        if self.protocols.get(index) is not protocol:
            return
        del self.workers[index]
        del self.protocols[index]
        if not self.running:
            log.info("worker {index} stopped", index=index)
            return
        log.error("worker {index} died ({reason}); restarting in {delay}s",
                  index=index, reason=str(reason.value), delay=self.restart_delay)  # fmt: skip
        self._restarts[index] = self.reactor.callLater(self.restart_delay, self.spawn, index)

    def stopService(self) -> Deferred:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
            self._previous_hup = None
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        ending = [p.ended for p in self.protocols.values()]
        for index, transport in list(self.workers.items()):
            _signal(transport, "TERM")
        killer = self.reactor.callLater(self.stop_timeout, self._kill_all)
        await DeferredList(ending)
        if killer.active():
            killer.cancel()
        await gatherResults([port.stopListening() for port in self.ports])
        self.ports, self.fds = [], []

    def _kill_all(self) -> None:
        for index, transport in list(self.workers.items()):
            log.warn("worker {index} did not drain in {timeout}s; killing it", index=index, timeout=self.stop_timeout)
            _signal(transport, "KILL")


def _signal(transport: Any, name: str) -> None:
    try:
        transport.signalProcess(name)
    except Exception:
        pass  # already gone


def worker_argv(config_path: Optional[str], extra: Sequence[str] = ()) -> Callable[[List[int]], List[str]]:
    """
    The command line of a worker: this Python running
    C{twistd -n --pidfile= --logfile=- vaporproxy --config PATH --worker-fds FDS}.
    """

    def argv(fds: List[int]) -> List[str]:
        command = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                   "--nodaemon", "--pidfile=", "--logfile=-", "vaporproxy"]  # fmt: skip
        if config_path is not None:
            command += ["--config", os.path.abspath(config_path)]
        command += [*extra, "--worker-fds", ",".join(str(fd) for fd in fds)]
        return command

    return argv


__all__ = [
    "AdoptedEndpoint",
    "AdoptedPortService",
    "WorkerSupervisor",
    "check_shareable",
    "is_proxy_endpoint",
    "parse_worker_fds",
    "worker_argv",
]
