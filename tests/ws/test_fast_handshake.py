"""
L{vaporproxy.ws.autobahn_compat.handshake}: the opening handshake checked
without Autobahn's line-by-line parse leaves the state, the request and
the answer Autobahn's own C{processHandshake} leaves, for ordinary
requests and for every kind it hands back to Autobahn.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from vaporproxy.ws.autobahn_compat import FastServerFactory, FastServerProtocol
from vaporproxy.ws.autobahn_compat import handshake as fast

#: What Autobahn's processHandshake sets before it calls onConnect.
_STATE = (
    "http_request_data", "http_status_line", "http_headers", "http_request_uri", "http_request_path",
    "http_request_params", "http_request_host", "websocket_version", "websocket_protocols", "websocket_origin",
    "websocket_extensions", "_wskey", "data", "peer",
)  # fmt: skip

#: A masked binary frame "hi" right behind the request.
_FRAME = b"\x82\x82abcd" + bytes(c ^ m for c, m in zip(b"hi", b"ab"))

#: What onConnect's ConnectionRequest carries.
_REQUEST = ("peer", "headers", "host", "path", "params", "version", "origin", "protocols", "extensions")

#: What Autobahn's succeedHandshake has set when it calls onOpen.
_OPENED = ("state", "websocket_protocol_in_use", "websocket_extensions_in_use", "http_response_data", "inside_message")

_KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def request(
    target: str = "/console/ws/vm-1?token=abc",
    headers: Optional[List[Tuple[str, str]]] = None,
    line: Optional[str] = None,
    extra: bytes = b"",
) -> bytes:
    if headers is None:
        headers = [
            ("Host", "proxy.test:6080"),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", _KEY),
            ("Sec-WebSocket-Version", "13"),
        ]
    text = (line or f"GET {target} HTTP/1.1") + "\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers) + "\r\n"
    return text.encode("iso-8859-1") + extra


def base(**changes: str) -> List[Tuple[str, str]]:
    """The ordinary headers with some replaced (a value of '' drops the header)."""
    headers = {
        "Host": "proxy.test:6080",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": _KEY,
        "Sec-WebSocket-Version": "13",
    }
    for name, value in changes.items():
        name = name.replace("_", "-")
        if value:
            headers[name] = value
        else:
            headers.pop(name, None)
    return list(headers.items())


class _Recorder(FastServerProtocol):
    """Keeps what onConnect saw; answers as told."""

    answer: Any = None

    def onConnect(self, req: Any) -> Any:
        self.seen = {name: getattr(self, name) for name in _STATE}
        self.seen["request"] = {name: getattr(req, name) for name in _REQUEST}
        answer = self.answer
        if isinstance(answer, Exception):
            raise answer
        return answer

    def onOpen(self) -> None:
        self.opened = {name: getattr(self, name) for name in _OPENED}
        self.opened["timers"] = (self.openHandshakeTimeoutCall, self.autoPingPendingCall is not None)

    def onMessage(self, payload: bytes, binary: bool) -> None:
        self.messages = getattr(self, "messages", []) + [payload]


class _AutobahnOnly(_Recorder):
    """The same, with Autobahn's own processHandshake and succeedHandshake."""

    def processHandshake(self) -> None:
        WebSocketServerProtocol.processHandshake(self)


class _Socket(StringTransport):
    """A socket lets a protocol unregister without a producer (Autobahn does on refusal)."""

    def unregisterProducer(self) -> None:
        self.producer = None


def _open(protocol_class: type, data: bytes, options: Optional[Dict[str, Any]] = None, answer: Any = None) -> Any:
    factory = FastServerFactory(url="ws://proxy.test:6080", reactor=MemoryReactorClock())
    factory.use_reactor(factory.reactor)
    options = {"autoPingInterval": 30.0, **(options or {})}
    factory.setProtocolOptions(perMessageCompressionAccept=lambda offers: None, **options)
    factory.protocol = protocol_class
    protocol = factory.buildProtocol(None)
    protocol.answer = answer
    protocol.makeConnection(_Socket())
    for i in range(0, len(data), 4096):
        protocol.dataReceived(data[i : i + 4096])
    return protocol


class SameAsAutobahnTests(SynchronousTestCase):
    """
    Each request through ours and through Autobahn's own method: the same
    state at onConnect, the same answer on the wire, the same reason.
    """

    def compare(self, data: bytes, fast_expected: bool, **kwargs: Any) -> Tuple[Any, Any]:
        taken: List[bool] = []
        real = fast.fast_handshake

        def spy(protocol: Any) -> bool:
            result = real(protocol)
            taken.append(result)
            return result

        import vaporproxy.ws.autobahn_compat as compat

        self.patch(compat, "fast_handshake", spy)
        # A plain TCP socket, so that the 101 is corked and open_websocket
        # runs (Autobahn's own succeedHandshake for _AutobahnOnly).
        real_open = compat.open_websocket
        self.patch(compat, "direct_writer", lambda transport: transport)
        self.patch(compat, "send_now", lambda transport, chunks: transport.writeSequence(list(chunks)))
        self.patch(compat, "open_websocket", lambda p, res: not isinstance(p, _AutobahnOnly) and real_open(p, res))
        ours = _open(_Recorder, data, **kwargs)
        own = _open(_AutobahnOnly, data, **kwargs)
        self.assertEqual(getattr(ours, "seen", None), getattr(own, "seen", None))
        self.assertEqual(getattr(ours, "opened", None), getattr(own, "opened", None))
        self.assertEqual(getattr(ours, "messages", None), getattr(own, "messages", None))
        self.assertEqual(ours.transport.value(), own.transport.value())
        self.assertEqual((ours.state, ours.wasNotCleanReason), (own.state, own.wasNotCleanReason))
        self.assertEqual(any(taken), fast_expected, f"fast path taken: {taken}")
        return ours, own

    def test_ordinary(self) -> None:
        """When a browser's ordinary request arrives, ours answers 101 and onConnect sees what Autobahn's would give it."""
        ours, _ = self.compare(request(), True)
        self.assertIn(b"101 Switching Protocols", ours.transport.value())
        self.assertEqual(ours.seen["request"]["params"], {"token": ["abc"]})
        self.assertEqual(ours.seen["http_request_host"], "proxy.test")

    def test_browserHeaders(self) -> None:
        """When the request has an Origin, subprotocols, extensions, repeated and padded fields and a frame behind it, the state is the same."""
        headers = base(
            Origin="http://proxy.test:6080",
            Sec_WebSocket_Protocol="binary, base64",
            Sec_WebSocket_Extensions="permessage-deflate; client_max_window_bits",
            User_Agent="Mozilla/5.0 (X11) \tChrome/131 ",
        ) + [("X-Thing", "one"), ("x-thing", "two"), ("Cookie", "a=\x80b")]
        data = request("/console/ws/vm-1?token=a%2Fb&x=1&x=2", headers, extra=_FRAME)
        ours, _ = self.compare(data, True, answer="binary")
        self.assertIn(b"Sec-WebSocket-Protocol: binary", ours.transport.value())
        self.assertEqual(ours.seen["http_headers"]["x-thing"], "one, two")
        self.assertEqual(ours.seen["websocket_protocols"], ["binary", "base64"])
        self.assertEqual(ours.seen["data"], _FRAME)
        self.assertEqual(ours.messages, [b"hi"])

    def test_noQueryNoPort(self) -> None:
        """When the path has no query and Host no port, the params are empty and the host whole."""
        self.compare(request("/console/ws/vm-1", base(Host="proxy.test")), True)
        self.compare(request("/console/ws/vm-1?", base(Host="[::1]")), True)

    def test_inPieces(self) -> None:
        """When the request arrives a byte at a time, the state is the same."""
        data = request()
        ours = _open(_Recorder, b"")
        for i in range(len(data)):
            ours.dataReceived(data[i : i + 1])
        own = _open(_AutobahnOnly, data)
        self.assertEqual(ours.seen, own.seen)

    def test_forwardedFor(self) -> None:
        """When X-Forwarded-For is trusted, the peer is the address Autobahn picks."""
        ours, _ = self.compare(
            request(headers=base(X_Forwarded_For="10.0.0.1, 10.0.0.2, 10.0.0.3")), True, options={"trustXForwardedFor": 2}
        )
        self.assertEqual(ours.seen["peer"], "10.0.0.2")

    def test_onConnectAnswers(self) -> None:
        """When onConnect refuses, fails or answers later, the answer on the wire is Autobahn's."""
        self.compare(request(), True, answer=ConnectionDeny(403, "Origin not allowed"))
        self.compare(request(), True, answer=RuntimeError("bug"))
        self.flushLoggedErrors(RuntimeError)
        self.assertIn(b"101 Switching Protocols", _open(_Recorder, request(), answer=succeed(None)).transport.value())
        # A subprotocol the client did not offer: succeedHandshake raises
        # and, as with Autobahn's errback beside its callback, nothing is
        # answered and the error is logged.
        refused = _open(_Recorder, request(), answer="not offered")
        self.assertEqual(refused.transport.value(), b"")
        self.assertEqual(len(self.flushLoggedErrors(Exception)), 1)
        later = Deferred()
        ours = _open(_Recorder, request(), answer=later)
        self.assertEqual(ours.transport.value(), b"")
        later.callback(None)
        self.assertIn(b"101 Switching Protocols", ours.transport.value())

    def test_unusualGoesToAutobahn(self) -> None:
        """When a request is anything but ordinary, Autobahn's own method answers it (each case: the same state and answer)."""
        cases = {
            "POST": request(line="POST /console/ws/vm-1 HTTP/1.1"),
            "HTTP/1.0": request(line="GET /console/ws/vm-1 HTTP/1.0"),
            "two spaces": request(line="GET  /console/ws/vm-1 HTTP/1.1"),
            "lower-case method": request(line="get /console/ws/vm-1 HTTP/1.1"),
            "absolute URI": request("http://proxy.test/console/ws/vm-1"),
            "netloc path": request("//evil/console/ws/vm-1"),
            "fragment": request("/console/ws/vm-1#x"),
            "params": request("/console/ws/vm-1;p=1?token=a"),
            "NBSP in target": request(line="GET /console/ws/vm\xa0-1 HTTP/1.1"),
            "no Host": request(headers=base(Host="")),
            "two Hosts": request(headers=base() + [("Host", "other")]),
            "bad port": request(headers=base(Host="proxy.test:x")),
            "no Upgrade": request(headers=base(Upgrade="")),
            "Upgrade h2c": request(headers=base(Upgrade="h2c")),
            "Connection close": request(headers=base(Connection="close")),
            "version 8": request(headers=base(Sec_WebSocket_Version="8")),
            "version x": request(headers=base(Sec_WebSocket_Version="x")),
            "two versions": request(headers=base() + [("Sec-WebSocket-Version", "13")]),
            "duplicate protocols": request(headers=base(Sec_WebSocket_Protocol="binary, binary")),
            "foreign origin": request(headers=base(Origin="http://evil.test")),
            "null origin": request(headers=base(Origin="null")),
            "empty origin": request(headers=base(Origin=" ")),
            "two origins": request(headers=base(Origin="http://proxy.test:6080") + [("Origin", "http://proxy.test:6080")]),
            "short key": request(headers=base(Sec_WebSocket_Key="abc==")),
            "bad key": request(headers=base(Sec_WebSocket_Key="dGhlIHNhbXBsZSBub25jZQ!=")),
            "no key": request(headers=base(Sec_WebSocket_Key="")),
            "two extension fields": request(headers=base() + [("Sec-WebSocket-Extensions", "a"), ("Sec-WebSocket-Extensions", "b")]),
            "obs-fold": request(headers=base() + [(" X-Fold", "x")]),
            "space before colon": request(headers=base() + [("X-A ", "x")]),
            "control in value": request(headers=base() + [("X-A", "a\x01b")]),
            "bare LF": request(headers=base(X_A="a\nb")),
            "no headers": b"GET /console/ws/vm-1 HTTP/1.1\r\n\r\n",
        }
        options = {"allowedOrigins": ["http://proxy.test:6080"]}
        for name, data in cases.items():
            with self.subTest(name):
                self.compare(data, False, options=options)
        self.flushLoggedErrors()

    def test_nullOriginAllowed(self) -> None:
        """When the factory allows the null origin, a null Origin is let in by ours as by Autobahn's."""
        self.compare(request(headers=base(Origin="null")), True, options={"allowNullOrigin": True})

    def test_connectionCap(self) -> None:
        """When the connection cap is passed, Autobahn's 503 answers."""
        data = request()
        factory = FastServerFactory(url="ws://proxy.test:6080", reactor=MemoryReactorClock())
        factory.use_reactor(factory.reactor)
        factory.setProtocolOptions(maxConnections=1)
        factory.protocol = _Recorder
        first, second = factory.buildProtocol(None), factory.buildProtocol(None)
        first.makeConnection(_Socket())
        second.makeConnection(_Socket())
        second.dataReceived(data)
        self.assertIn(b"503", second.transport.value())
        self.assertFalse(hasattr(second, "seen"))

    def test_incomplete(self) -> None:
        """When the header block has not ended, nothing is answered and nothing is taken from the buffer."""
        ours = _open(_Recorder, request()[:-2])
        self.assertEqual(ours.transport.value(), b"")
        self.assertEqual(ours.data, request()[:-2])
