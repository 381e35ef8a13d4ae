"""
Real vaporproxy processes on one Redis, for the scale-out integration tests.

    - L{ProxyProcess}: C{twistd -n --pidfile= vaporproxy --config FILE} as a
      subprocess (C{PYTHONPATH} = the checkout), on its own free loopback
      port, stopped or C{kill -9}-ed by its PID.
    - L{RFBEchoServer}: a minimal RFB 3.8 server (security None) on the test
      process's reactor that echoes every byte after ServerInit, standing in
      for a VM's VNC server.
    - L{WSClient} and L{ws_connect}: an Autobahn WebSocket client on the real
      reactor that keeps every binary byte and the close code.
    - L{vnc_console}: plays noVNC's side of the RFB handshake the proxy
      offers (security None) up to ServerInit.
    - L{spice_link} / L{spice_ticket}: spice-html5's link message and ticket
      answer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from typing import Any, Callable, List, Optional, Sequence, Tuple

import treq
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest
from twisted.web.client import HTTPConnectionPool

from tests.integration.redis_server import stop_process
from tests.support import REPO, checkout_env, free_port

CHECKOUT = REPO
VM_PATH = "/api/v1/virtualization/virtualmachines"

ADMIN_KEY = "cluster-admin-key-5c1e7a"
USER_KEY = "cluster-user-key-93b0d4"

RFB_VERSION = b"RFB 003.008\n"
#: ServerInit of L{RFBEchoServer}: 64x48, 32 bpp true colour, name "echo".
SERVER_INIT = (
    struct.pack("!HH", 64, 48)
    + struct.pack("!BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
    + struct.pack("!I", 4)
    + b"echo"
)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def config_yaml(
    port: int,
    hypervisor_uri: str,
    redis_url: str,
    *,
    lease_ttl: str = "15s",
    redis_timeout: str = "500ms",
    max_per_vm: int = 100,
    max_total: int = 1000,
) -> str:
    """
    A vapor.conf for one cluster member.
    """
    return json.dumps(
        {
            "console": {
                "max_connections_per_vm": max_per_vm,
                "max_total_connections": max_total,
                "token_ttl": "5m",
                "connection_timeout": "10s",
                "idle_timeout": "10m",
                "allowed_hosts": ["127.0.0.1"],
                "cleanup_interval": "1m",
            },
            "server": {"listen": [f"tcp:{port}:interface=127.0.0.1"]},
            "auth": {
                "api_keys": [
                    {"user": "root", "sha256": _sha(ADMIN_KEY), "vms": ["*"], "admin": True},
                    {"user": "alice", "sha256": _sha(USER_KEY), "vms": ["*"], "admin": False},
                ]
            },
            "hypervisors": [{"uri": hypervisor_uri}],
            "tokens": {
                "backend": "redis",
                "redis_url": redis_url,
                "redis_timeout": redis_timeout,
                "lease_ttl": lease_ttl,
            },
            "logging": {"level": "info", "format": "text"},
        },
        indent=1,
    )


class ProxyProcess:
    """
    One C{twistd vaporproxy} subprocess.

    @ivar port: its HTTP/WebSocket port on 127.0.0.1.
    @ivar name: a label for messages (C{"A"}, C{"B"}).
    @ivar preexec_fn: run in the child before C{exec} (resource limits), or C{None}.
    """

    preexec_fn: Optional[Callable[[], None]] = None

    def __init__(self, name: str, directory: str, config_text_for_port: Any):
        twistd = shutil.which("twistd")
        if twistd is None:
            raise SkipTest("twistd is not on PATH")
        self.name = name
        self.port = free_port()
        self.directory = directory
        self.config_path = os.path.join(directory, f"vapor-{name}.conf")
        self.log_path = os.path.join(directory, f"proxy-{name}.log")
        with open(self.config_path, "w", encoding="utf-8") as f:
            f.write(config_text_for_port(self.port))
        self.argv = [twistd, "-n", "--pidfile=", "vaporproxy", "--config", self.config_path]
        self.process: Optional[subprocess.Popen] = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv, cwd=self.directory, env=checkout_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                preexec_fn=self.preexec_fn,
            )  # fmt: skip

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 3000) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return ""

    def kill(self) -> None:
        """
        C{kill -9} the process (by its PID) and reap it.
        """
        process = self.process
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)

    def stop(self) -> None:
        """
        SIGTERM (then SIGKILL after 5 s) by PID, and reap.
        """
        stop_process(self.process)


class HTTP:
    """
    treq with a non-persistent pool (no connection outlives a test).
    """

    def __init__(self) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    async def request(self, method: str, url: str, key: Optional[str] = None) -> Tuple[int, Any]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        response = await treq.request(method, url, headers=headers, pool=self.pool)
        body = await response.content()
        try:
            return response.code, json.loads(body)
        except ValueError:
            return response.code, body

    async def wait_ready(self, proxy: ProxyProcess, timeout: float = 20.0) -> None:
        """
        Wait until C{proxy} answers /healthz.
        """
        deadline = time.monotonic() + timeout
        while True:
            if proxy.process is not None and proxy.process.poll() is not None:
                raise AssertionError(f"proxy {proxy.name} exited:\n{proxy.log_tail()}")
            try:
                code, _ = await self.request("GET", proxy.base + "/healthz")
                if code == 200:
                    return
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"proxy {proxy.name} not up within {timeout}s:\n{proxy.log_tail()}")
            await sleep(0.05)

    async def console_info(self, proxy: ProxyProcess, vm: str, key: str = USER_KEY) -> Tuple[int, Any]:
        return await self.request("GET", f"{proxy.base}{VM_PATH}/{vm}/console", key)

    async def token(self, proxy: ProxyProcess, vm: str) -> str:
        code, body = await self.console_info(proxy, vm)
        if code != 200:
            raise AssertionError(f"console info on {proxy.name}: {code} {body}")
        return body["token"]


def sleep(seconds: float) -> Deferred:
    return deferLater(reactor, seconds, lambda: None)


# ---------------------------------------------------------------------------
# The VM's VNC server
# ---------------------------------------------------------------------------


class _RFBEchoSession(Protocol):
    factory: "RFBEchoServer"

    def connectionMade(self) -> None:
        self.buffer = b""
        self.state = "version"
        self.factory.sessions.append(self)
        self.transport.write(RFB_VERSION)

    def dataReceived(self, data: bytes) -> None:
        if self.state == "relay":
            self.transport.write(data)
            return
        self.buffer += data
        while True:
            if self.state == "version" and len(self.buffer) >= 12:
                self.buffer = self.buffer[12:]
                self.transport.write(b"\x01\x01")  # one security type: None
                self.state = "security"
            elif self.state == "security" and len(self.buffer) >= 1:
                self.buffer = self.buffer[1:]
                self.transport.write(struct.pack("!I", 0))
                self.state = "init"
            elif self.state == "init" and len(self.buffer) >= 1:
                self.buffer = self.buffer[1:]
                self.transport.write(SERVER_INIT)
                self.state = "relay"
                if self.buffer:
                    rest, self.buffer = self.buffer, b""
                    self.transport.write(rest)
                return
            else:
                return

    def connectionLost(self, reason: Any = None) -> None:
        if self in self.factory.sessions:
            self.factory.sessions.remove(self)


class RFBEchoServer(Factory):
    """
    A VNC server (RFB 3.8, security None) that echoes after ServerInit.
    """

    protocol = _RFBEchoSession

    def __init__(self) -> None:
        self.sessions: List[_RFBEchoSession] = []
        self.listening = reactor.listenTCP(0, self, interface="127.0.0.1")
        self.port = self.listening.getHost().port

    async def close(self) -> None:
        await self.listening.stopListening()
        for session in list(self.sessions):
            session.transport.abortConnection()


# ---------------------------------------------------------------------------
# The browser
# ---------------------------------------------------------------------------


class WSClient(WebSocketClientProtocol):
    """
    A browser-like WebSocket: binary bytes are kept in C{received} (C{data} is Autobahn's own buffer), text
    messages (the proxy's JSON errors) in C{texts}.
    """

    def onConnect(self, response: Any) -> None:
        self.received = b""
        self.texts: List[Any] = []
        self.waiting: List[Tuple[int, Deferred]] = []

    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not isBinary:
            self.texts.append(json.loads(payload.decode("utf-8")))
            return
        self.received += payload
        ready = [w for w in self.waiting if len(self.received) >= w[0]]
        self.waiting = [w for w in self.waiting if len(self.received) < w[0]]
        for _, d in ready:
            d.callback(self.received)

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        if not self.factory.opened.called:
            self.factory.opened.callback(None)
        self.factory.closed.callback((code, reason))
        for _, d in getattr(self, "waiting", []):
            d.errback(AssertionError(f"closed ({code}, {reason}) while waiting for data"))
        self.waiting = []

    @property
    def closed(self) -> Deferred:
        return self.factory.closed

    def until(self, n: int, timeout: float = 10.0) -> Deferred:
        """
        Fire with all bytes received once there are at least C{n}.
        """
        d: Deferred = Deferred()
        if len(self.received) >= n:
            d.callback(self.received)
        elif self.factory.closed.called:
            d.errback(AssertionError(f"closed before {n} bytes arrived"))
        else:
            self.waiting.append((n, d))
            d.addTimeout(timeout, reactor)
        return d

    def send(self, data: bytes) -> None:
        self.sendMessage(data, isBinary=True)


async def ws_connect(
    proxy: ProxyProcess, vm: str, token: str, protocols: Optional[Sequence[str]] = None
) -> Tuple[Optional[WSClient], WebSocketClientFactory]:
    """
    Open a console WebSocket on C{proxy}; answer the open client (or
    C{None} when the handshake failed) and its factory (C{.closed}).
    """
    url = f"ws://127.0.0.1:{proxy.port}{VM_PATH}/{vm}/console/ws?token={token}"
    factory = WebSocketClientFactory(url, protocols=list(protocols) if protocols else None, reactor=reactor)
    factory.protocol = WSClient
    factory.setProtocolOptions(openHandshakeTimeout=10, closeHandshakeTimeout=2, autoPingInterval=0)
    factory.opened = Deferred()
    factory.closed = Deferred()
    await TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port, timeout=5).connect(factory)
    client = await factory.opened
    return client, factory


async def vnc_console(client: WSClient) -> None:
    """
    noVNC's side of the handshake the proxy offers (RFB 3.8, security
    None), up to and including ServerInit.
    """
    got = await client.until(12)
    assert got[:12] == RFB_VERSION, got
    client.send(RFB_VERSION)
    await client.until(14)
    assert client.received[12:14] == b"\x01\x01", client.received
    client.send(b"\x01")
    await client.until(18)
    assert client.received[14:18] == b"\0\0\0\0", client.received
    client.send(b"\x01")  # ClientInit, shared
    await client.until(18 + len(SERVER_INIT))
    assert client.received[18:] == SERVER_INIT, client.received


async def echo(client: WSClient, payload: bytes) -> bytes:
    """
    Send C{payload} through a relaying VNC console and answer what came
    back (the echo server returns it).
    """
    start = len(client.received)
    client.send(payload)
    data = await client.until(start + len(payload))
    return data[start : start + len(payload)]


# ---------------------------------------------------------------------------
# SPICE, the spice-html5 way
# ---------------------------------------------------------------------------

LINK_HEADER = struct.Struct("<4sIII")
LINK_MESS = struct.Struct("<IBBIII")
SPICE_CHANNEL_MAIN = 1
SPICE_CHANNEL_DISPLAY = 2
SPICE_MSG_MAIN_INIT = 103
PUBKEY_BYTES = 162


def spice_link(channel_type: int, connection_id: int) -> bytes:
    """
    A link message as spice-html5 sends it (auth selection and mini header).
    """
    caps = struct.pack("<I", (1 << 0) | (1 << 3))
    body = LINK_MESS.pack(connection_id, channel_type, 0, 1, 0, LINK_MESS.size) + caps
    return LINK_HEADER.pack(b"REDQ", 2, 2, len(body)) + body


def spice_reply_size(data: bytes) -> Optional[int]:
    """
    The size of the link reply at the start of C{data}, when its header is in.
    """
    if len(data) < LINK_HEADER.size:
        return None
    return LINK_HEADER.size + LINK_HEADER.unpack_from(data)[3]


async def spice_channel(client: WSClient, channel_type: int, connection_id: int) -> int:
    """
    Link one SPICE channel through the proxy: send the link message, read
    the reply, answer with auth mechanism SPICE and a ticket (the proxy
    replaces it with the real one), and answer the link result (0 = OK).
    """
    client.send(spice_link(channel_type, connection_id))
    await client.until(LINK_HEADER.size)
    size = spice_reply_size(client.received)
    await client.until(size)
    error = struct.unpack_from("<I", client.received, LINK_HEADER.size)[0]
    if error:
        return error
    client.send(struct.pack("<I", 1) + os.urandom(128))
    data = await client.until(size + 4)
    return struct.unpack_from("<I", data, size)[0]


async def spice_main_session(client: WSClient) -> int:
    """
    After a main channel linked: read SPICE_MSG_MAIN_INIT (mini header) and
    answer its session id.
    """
    size = spice_reply_size(client.received) + 4
    data = await client.until(size + 6 + 4)
    msg_type, _ = struct.unpack_from("<HI", data, size)
    assert msg_type == SPICE_MSG_MAIN_INIT, msg_type
    return struct.unpack_from("<I", data, size + 6)[0]


def new_directory() -> str:
    return tempfile.mkdtemp(prefix="vaporproxy-cluster-")
