"""
Autobahn's opening-handshake check for the common request, done with less
work (part of the compat room: the private names are listed in
L{vaporproxy.ws.autobahn_compat.RELIES_ON}).

Autobahn's C{WebSocketServerProtocol.processHandshake} splits and checks
the header block line by line in Python, parses the request URI with
C{urllib.parse.urlparse} and computes the arguments of about fifteen debug
lines even when debug logging is off: with C{parseHttpHeader} about 0.25 M
instructions of a console's 2.85 M set-up (bench/setupcost.py with
py-spy, 2026-12-06).  L{fast_handshake} checks an ordinary request (a
GET to an origin-form path, HTTP/1.1, one Host, the usual upgrade
headers, a well-formed key) with C-level regular expressions and
sets the same state Autobahn sets; for anything else it changes nothing
and answers False, and Autobahn's own method runs, so every refusal
(and its wording) is Autobahn's.  C{tests/ws/test_fast_handshake.py}
compares the state both leave for a set of requests.
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import parse_qs

import txaio
from autobahn.websocket.protocol import WebSocketProtocol, _is_same_origin, _url_to_origin
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

__all__ = ["fast_handshake", "open_websocket"]

# The request line Autobahn accepts, in its plainest form: GET, one space,
# an origin-form target of printable ASCII without a fragment, one space,
# HTTP/1.1.  (Autobahn splits on any whitespace and allows more; those
# requests take Autobahn's path.)
_REQUEST_LINE = re.compile(r"GET (/[!-~]*) HTTP/1\.1\r\n")
# RFC 9110 field-name (a token) and field value, as Autobahn's
# parseHttpHeader checks them (VCHAR, obs-text, SP, HTAB; no obs-fold).
_FIELD = r"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):([^\x00-\x08\x0a-\x1f\x7f]*)\r\n"
_HEADER_BLOCK = re.compile(f"(?:{_FIELD})*")
_HEADER_LINE = re.compile(_FIELD)
_KEY = re.compile(r"[a-zA-Z0-9+/]{22}==")


def _headers(block: str) -> Tuple[Dict[str, str], Dict[str, int]]:
    """
    The header fields as Autobahn's parseHttpHeader makes them: names in
    lower case, values stripped of SP/HTAB, a repeated field's values
    joined with ", " and counted.
    """
    headers: Dict[str, str] = {}
    counts: Dict[str, int] = {}
    for name, value in _HEADER_LINE.findall(block):
        key = name.lower()
        value = value.strip(" \t")
        if key in headers:
            headers[key] += f", {value}"
            counts[key] += 1
        else:
            headers[key] = value
            counts[key] = 1
    return headers, counts


def _has_token(value: str, token: str) -> bool:
    """Whether a comma-separated field holds C{token} (any case)."""
    if value.lower() == token:  # (the usual field: one value)
        return True
    return any(part.strip().lower() == token for part in value.split(","))


def _request(text: str) -> Any:
    """
    The request line and header fields of an ordinary request (its
    target in origin form, without ";params" or a fragment, which
    urlparse would split off): (target, path, query, headers, counts),
    or None.
    """
    line = _REQUEST_LINE.match(text)
    if line is None:
        return None
    uri = line.group(1)
    block = text[line.end() :]
    if uri.startswith("//") or "#" in uri or _HEADER_BLOCK.fullmatch(block) is None:
        return None
    path, _, query = uri.partition("?")
    if ";" in path:
        return None
    return (uri, path, query) + _headers(block)


def fast_handshake(protocol: Any) -> bool:
    """
    Check and answer C{protocol}'s opening handshake request the way
    Autobahn's C{processHandshake} does, when it is an ordinary one;
    False (nothing changed) when Autobahn's own method must run: an
    incomplete request, anything unusual and every refusal.
    """
    data = protocol.data
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return False
    text = data[: end + 2].decode("iso-8859-1")
    parsed = _request(text)
    if parsed is None:
        return False
    uri, path, query, headers, counts = parsed
    host = _host(headers, counts, protocol.factory.externalPort)
    if host is None:
        return False
    if not (_has_token(headers.get("upgrade", ""), "websocket") and _has_token(headers.get("connection", ""), "upgrade")):
        return False
    version = _version(headers, counts, protocol.versions)
    if version is None:
        return False
    protocols = _protocols(headers)
    origin = _origin(protocol, headers, counts)
    if protocols is None or origin is None:
        return False
    key = headers.get("sec-websocket-key", "").strip()
    if counts.get("sec-websocket-key") != 1 or _KEY.fullmatch(key) is None:
        return False
    extensions = _extensions(protocol, headers, counts)
    if extensions is None or protocol.maxConnections > 0 and protocol.factory.countConnections > protocol.maxConnections:
        return False
    if "x-forwarded-for" in headers and protocol.trustXForwardedFor:
        addresses = [x.strip() for x in headers["x-forwarded-for"].split(",")]
        protocol.peer = addresses[-protocol.trustXForwardedFor :][0]
    # The state Autobahn's processHandshake leaves.
    protocol.http_request_data = data[: end + 4]
    protocol.http_status_line = text[: text.index("\r\n")]
    protocol.http_headers = headers
    protocol.http_request_uri = uri
    protocol.http_request_path = path
    protocol.http_request_params = params = _params(query)
    protocol.http_request_host = host
    protocol.websocket_version = version
    protocol.websocket_protocols = protocols
    protocol.websocket_origin = origin
    protocol.websocket_extensions = extensions
    protocol.data = data[end + 4 :]
    protocol._wskey = key
    request = ConnectionRequest(
        protocol.peer, headers, host, path, params, version, origin, protocols, extensions
    )
    _connect(protocol, request)
    return True


def _params(query: str) -> Dict[str, List[str]]:
    """
    C{parse_qs(query)}; a query of one plain "name=value" (the console
    token) without parse_qs's splitting and unquoting.
    """
    if not query:
        return {}
    name, equals, value = query.partition("=")
    if equals and value and "&" not in query and "%" not in query and "+" not in query:
        return {name: [value]}
    return parse_qs(query)


def _host(headers: Dict[str, str], counts: Dict[str, int], external_port: Any) -> Any:
    """The Host header without its port, as Autobahn keeps it; None when Autobahn would refuse it."""
    if counts.get("host") != 1:
        return None
    host = headers["host"].strip()
    if ":" in host and not host.endswith("]"):
        name, port = host.rsplit(":", 1)
        try:
            number = int(port.strip())
        except ValueError:
            return None
        if external_port and number != external_port:
            return None
        host = name
    return host


def _version(headers: Dict[str, str], counts: Dict[str, int], versions: Any) -> Any:
    """The WebSocket version (RFC 6455's 13 and later only); None otherwise."""
    if counts.get("sec-websocket-version") != 1:
        return None
    try:
        version = int(headers["sec-websocket-version"])
    except ValueError:
        return None
    return version if version in versions and version >= 13 else None


def _protocols(headers: Dict[str, str]) -> Optional[List[str]]:
    """The subprotocols offered, in order; None when one is repeated."""
    if "sec-websocket-protocol" not in headers:
        return []
    protocols = [str(x.strip()) for x in headers["sec-websocket-protocol"].split(",")]
    return protocols if len(set(protocols)) == len(protocols) else None


def _origin(protocol: Any, headers: Dict[str, str], counts: Dict[str, int]) -> Optional[str]:
    """
    The Origin ("" without one: non-browser clients may omit it); None
    when Autobahn would not let it in (its own two helpers decide).
    """
    if "origin" not in headers:
        return ""
    origin = headers["origin"].strip()
    if counts["origin"] > 1:
        return None
    try:
        origin_tuple = _url_to_origin(origin)
    except ValueError:
        return None
    factory = protocol.factory
    if origin_tuple == "null" and factory.allowNullOrigin:
        return origin
    allowed = _is_same_origin(
        origin_tuple,
        "https" if factory.isSecure else "http",
        factory.externalPort or factory.port,
        protocol.allowedOriginsPatterns,
    )
    return origin if allowed else None


def _extensions(protocol: Any, headers: Dict[str, str], counts: Dict[str, int]) -> Optional[List[Any]]:
    """The extensions offered, parsed by Autobahn; None when the field is repeated."""
    if "sec-websocket-extensions" not in headers:
        return []
    if counts["sec-websocket-extensions"] > 1:
        return None
    return protocol._parseExtensionsHeader(headers["sec-websocket-extensions"])


def _connect(protocol: Any, request: ConnectionRequest) -> None:
    """
    C{onConnect}, then C{succeedHandshake} with its answer, as Autobahn's
    C{txaio.as_future}/C{add_callbacks} pair does, without the two
    Deferreds when the answer is already there.
    """
    try:
        answer = protocol.onConnect(request)
    except Exception:
        _refuse(protocol, Failure())
        return
    if isinstance(answer, Deferred):
        txaio.add_callbacks(answer, protocol.succeedHandshake, lambda failure: _refuse(protocol, failure))
        return
    try:
        protocol.succeedHandshake(answer)
    except Exception:
        # As Autobahn: its errback is beside this callback, not after it
        # (nothing is answered; its Deferred would log it as unhandled).
        protocol.log.failure("succeedHandshake failed", Failure())


def _refuse(protocol: Any, err: Failure) -> None:
    """Autobahn's C{forward_error}: a ConnectionDeny is the answer, anything else a 500."""
    if isinstance(err.value, ConnectionDeny):
        protocol.failHandshake(err.value.reason, err.value.code)
        return
    protocol.log.warn("Unexpected exception in onConnect ['{err.value}']", err=err)
    protocol.log.warn("{tb}", tb=txaio.failure_format_traceback(err))
    protocol.failHandshake(f"Internal server error: {err.value}", ConnectionDeny.INTERNAL_SERVER_ERROR)


_ACCEPT_MAGIC = WebSocketProtocol._WS_MAGIC


def open_websocket(protocol: Any, answer: Any) -> bool:
    """
    Autobahn's C{succeedHandshake} for onConnect's usual answer (a
    subprotocol the client offered, or None) to a request without
    extensions: the same 101 answer and the same steps into the open
    state, without its extension loop and debug lines (2.711 M -> 2.670 M
    instructions per set-up, -1.5%, bench/setupcost.py 2026-12-06; the
    query fast path and the one-value token check are in that figure).  False,
    with nothing done, for anything else: Autobahn's own method runs.
    """
    if type(answer) is tuple or protocol.websocket_extensions:
        return False
    if answer is not None and answer not in protocol.websocket_protocols:
        return False  # (Autobahn raises)
    factory = protocol.factory
    protocol.websocket_protocol_in_use = answer
    protocol.websocket_extensions_in_use = []
    response = ["HTTP/1.1 101 Switching Protocols\r\n"]
    if factory.server:
        response.append(f"Server: {factory.server}\r\n")
    response.append("Upgrade: WebSocket\r\nConnection: Upgrade\r\n")
    for name, value in factory.headers.items():
        values = [value] if isinstance(value, str) else _values(value)
        response.extend(f"{name}: {one}\r\n" for one in values)
    if answer is not None:
        response.append(f"Sec-WebSocket-Protocol: {answer}\r\n")
    accept = base64.b64encode(hashlib.sha1(protocol._wskey.encode("utf8") + _ACCEPT_MAGIC).digest())
    response.append(f"Sec-WebSocket-Accept: {accept.decode()}\r\n\r\n")
    text = "".join(response)
    protocol.sendData(text.encode("utf8"))
    protocol.http_response_data = text
    # The rest as Autobahn's succeedHandshake does it.
    protocol.state = WebSocketProtocol.STATE_OPEN
    if protocol.openHandshakeTimeoutCall is not None:
        protocol.openHandshakeTimeoutCall.cancel()
        protocol.openHandshakeTimeoutCall = None
    protocol.inside_message = False
    protocol.current_frame = None
    if protocol.autoPingInterval:
        protocol.autoPingPendingCall = factory._batched_timer.call_later(protocol.autoPingInterval, protocol._sendAutoPing)
    if protocol.trackedTimings:
        protocol.trackedTimings.track("onOpen")
    protocol._onOpen()
    txaio.resolve(protocol.is_open, None)
    if len(protocol.data) > 0:
        protocol.consumeData()
    return True


def _values(value: Any) -> Any:
    """A header's values as Autobahn takes them (an iterable, or one value)."""
    try:
        return iter(value)
    except TypeError:
        return [value]
