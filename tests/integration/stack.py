"""
The whole vaporproxy service, built by L{vaporproxy.tap.makeService} from a
config text, running in-process on the real reactor on a free loopback
port; and the clients a test needs to drive it (HTTP over treq, console
WebSockets over Autobahn, both optionally over TLS).

Usage in a trial test case::

    stack = await Stack.start(self, reactor, CONFIG.format(port=...))
    answer = await stack.get_json("/api/v1/...", key=ALICE_KEY)
    ws = await stack.websocket(answer["ws_path"], answer["token"])
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Callable, List, Optional, Sequence, Tuple

import treq
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

from tests.integration.libvirt_fixtures import node_uri, write_node_file
from tests.support import free_port
from vaporproxy import tap


def self_signed(directory: str, hostname: str = "localhost") -> Tuple[str, str, bytes]:
    """
    Write a fresh self-signed certificate for C{hostname} (and 127.0.0.1)
    and its key into C{directory}; answer (key path, cert path, cert PEM).
    """
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_path = os.path.join(directory, "key.pem")
    cert_path = os.path.join(directory, "cert.pem")
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    with open(cert_path, "wb") as f:
        f.write(cert_pem)
    return key_path, cert_path, cert_pem


class ConsoleClient(WebSocketClientProtocol):
    """
    A console WebSocket client: keeps every binary byte received, every
    text message, and the close code and reason.
    """

    factory: "ConsoleClientFactory"

    def onOpen(self) -> None:
        self.factory.client = self
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        factory = self.factory
        if isBinary:
            factory.received += payload
        else:
            factory.texts.append(payload.decode("utf-8"))
        factory.check()

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        factory = self.factory
        if not factory.opened.called:
            factory.opened.errback(ConnectionError(f"WebSocket not opened: {code} {reason}"))
        factory.closed.callback((code, reason))

    def send(self, data: bytes) -> None:
        self.sendMessage(data, isBinary=True)


class ConsoleClientFactory(WebSocketClientFactory):
    """
    The factory of one L{ConsoleClient}, holding what it saw.

    @ivar received: binary bytes received, concatenated.
    @ivar texts: text messages received.
    @ivar client: the protocol once the WebSocket is open.
    @ivar opened: fires with the protocol once the WebSocket is open.
    @ivar closed: fires with C{(code, reason)} once it is closed.
    """

    protocol = ConsoleClient

    def __init__(self, url: str, reactor: Any, protocols: Optional[List[str]] = None):
        super().__init__(url, reactor=reactor, protocols=protocols)
        self.client: Optional[ConsoleClient] = None
        self.received = b""
        self.texts: List[str] = []
        self.opened: Deferred = Deferred()
        self.closed: Deferred = Deferred()
        self._waiting: List[Tuple[Callable[[bytes], bool], Deferred]] = []

    def until(self, predicate: Callable[[bytes], bool]) -> Deferred:
        """
        A Deferred that fires with the bytes received so far once
        C{predicate(received)} holds (or fails once the socket closes).
        """
        d: Deferred = Deferred()
        self._waiting.append((predicate, d))
        self.check()
        return d

    def until_length(self, n: int) -> Deferred:
        return self.until(lambda got: len(got) >= n)

    def check(self) -> None:
        for entry in list(self._waiting):
            predicate, d = entry
            if entry in self._waiting and predicate(self.received):
                self._waiting.remove(entry)
                d.callback(self.received)

    def clientConnectionLost(self, connector: Any, reason: Any) -> None:
        pass

    def fail_waiting(self) -> None:
        waiting, self._waiting = self._waiting, []
        for _, d in waiting:
            d.errback(ConnectionError(f"closed after {len(self.received)} bytes"))


class Stack:
    """
    One running vaporproxy, from L{tap.makeService}.

    @ivar root: the service tree (C{root.pieces} holds the wired parts).
    @ivar port: the listening port on 127.0.0.1.
    @ivar tls: whether it listens with C{ssl:}.
    """

    def __init__(self, testcase: Any, reactor: Any, root: Any, port: int, ca_pem: Optional[bytes]):
        self.testcase = testcase
        self.reactor = reactor
        self.root = root
        self.port = port
        self.tls = ca_pem is not None
        self._trust = Certificate.loadPEM(ca_pem) if ca_pem is not None else None
        self._pool = HTTPConnectionPool(reactor, persistent=False)
        policy = BrowserLikePolicyForHTTPS(trustRoot=self._trust) if self._trust else BrowserLikePolicyForHTTPS()
        self.http = treq.client.HTTPClient(Agent(reactor, contextFactory=policy, pool=self._pool))
        self._clients: List[ConsoleClientFactory] = []

    @classmethod
    def start(cls, testcase: Any, reactor: Any, config_text: str, port: int,
              ca_pem: Optional[bytes] = None) -> "Stack":  # fmt: skip
        """
        Write C{config_text} to a file, build the service with
        L{tap.makeService} on C{reactor} and start it.  It is stopped
        (live consoles closed, port closed, pools stopped) in
        C{testcase}'s cleanup.

        @param port: the port the config listens on (see L{tests.support.free_port}).
        @param ca_pem: the certificate to trust when it listens with TLS.
        """
        directory = testcase.mktemp()
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "vapor.conf")
        with open(path, "w", encoding="utf-8") as f:
            f.write(config_text)
        options = tap.Options()
        options.environ = {}
        options.parseOptions(["--config", path])
        root = tap.makeService(options, reactor)
        root.startService()
        stack = cls(testcase, reactor, root, port, ca_pem)
        testcase.addCleanup(stack.stop)
        return stack

    @classmethod
    def on_domains(cls, testcase: Any, reactor: Any, domains: Sequence[str], config_for: Callable[[int, str], str],
                   ca_pem: Optional[bytes] = None) -> "Stack":  # fmt: skip
        """
        L{start} on a free port, with VMs from a libvirt test-driver node
        file holding C{domains}; C{config_for(port, uri)} is the config text.
        """
        directory = testcase.mktemp()
        os.makedirs(directory)
        uri = node_uri(write_node_file(directory, domains))
        port = free_port()
        return cls.start(testcase, reactor, config_for(port, uri), port, ca_pem=ca_pem)

    async def _stop(self) -> None:
        if self.root.running:
            await self.root.stopService()
        await self._pool.closeCachedConnections()
        for factory in self._clients:
            if factory.opened.called and not factory.closed.called:
                await factory.closed

    def stop(self) -> Deferred:
        return Deferred.fromCoroutine(self._stop())

    @property
    def pieces(self) -> Any:
        return self.root.pieces

    def url(self, path: str, scheme: str = "http") -> str:
        if self.tls:
            scheme += "s"
        host = "localhost" if self.tls else "127.0.0.1"
        return f"{scheme}://{host}:{self.port}{path}"

    async def request(self, method: str, path: str, key: Optional[str] = None, body: Optional[bytes] = None,
                      authorization: Optional[str] = None) -> Tuple[int, Any]:  # fmt: skip
        """
        One HTTP request (a Bearer C{key}, or an C{authorization} value
        as it is); answer (status, decoded JSON body).
        """
        headers = {b"authorization": [b"Bearer " + key.encode()]} if key else {}
        if authorization is not None:
            headers = {b"authorization": [authorization.encode()]}
        response = await self.http.request(method, self.url(path), headers=headers, data=body)
        body = await response.content()
        return response.code, json.loads(body)

    async def get_text(self, path: str, key: Optional[str] = None) -> Tuple[int, str]:
        """
        One GET; answer (status, body as text).
        """
        headers = {b"authorization": [b"Bearer " + key.encode()]} if key else {}
        response = await self.http.request("GET", self.url(path), headers=headers)
        return response.code, (await response.content()).decode("utf-8")

    def get_json(self, path: str, key: Optional[str] = None) -> Deferred:
        return Deferred.fromCoroutine(self.request("GET", path, key))

    async def websocket(self, ws_path: str, token: str, protocols: Optional[List[str]] = None) -> ConsoleClientFactory:
        """
        Open a console WebSocket on C{ws_path?token=...}; answer its factory
        once it is open (C{factory.client} is the protocol).
        """
        factory = ConsoleClientFactory(self.url(f"{ws_path}?token={token}", "ws"), self.reactor, protocols)
        factory.closed.addBoth(lambda r: (factory.fail_waiting(), r)[1])
        self._clients.append(factory)
        endpoint: Any = TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.port, timeout=5)
        if self._trust is not None:
            endpoint = wrapClientTLS(optionsForClientTLS("localhost", trustRoot=self._trust), endpoint)
        await endpoint.connect(factory)
        await factory.opened
        return factory
