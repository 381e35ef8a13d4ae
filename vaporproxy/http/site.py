"""
The HTTP site of vaporproxy: L{ConsoleSite} (twisted.web's L{Site} with an
access log that never shows a console token), and the resources that serve
files (L{StaticFiles}) and fixed JSON errors (L{JSONError}).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Optional, Pattern, Sequence, Tuple
from urllib.parse import unquote_to_bytes

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.python import log as _legacy_log
from twisted.web.http import combinedLogFormatter
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site
from twisted.web.static import File

from vaporproxy.errors import ConsoleError, ErrorCode, error_body
from vaporproxy.logs import QuickLogger
from vaporproxy.timers import timers_for

JSON_CONTENT_TYPE = b"application/json"

#: The package's own static files (the console page, its script and style).
STATIC_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "static")
STATIC_PAGE = os.path.join(STATIC_DIR, "console.html")
PLAYBACK_PAGE = os.path.join(STATIC_DIR, "playback.html")
ADMIN_PAGE = os.path.join(STATIC_DIR, "admin.html")


class JSONError(Resource):
    """
    A leaf resource answering one JSON error (used inside static trees).
    """

    isLeaf = True

    def __init__(self, code: ErrorCode, status: int, message: Optional[str] = None):
        super().__init__()
        self._status = status
        self._body = json.dumps(error_body(code, message)).encode("utf-8")

    def render(self, request: IRequest) -> bytes:
        request.setResponseCode(self._status)
        request.setHeader(b"content-type", JSON_CONTENT_TYPE)
        return self._body

    def getChild(self, path: bytes, request: IRequest) -> Resource:
        return self


NOT_FOUND = JSONError(ErrorCode.NOT_FOUND, 404, "Not found")


_REDACTED = b"<redacted>"


def _is_token_name(raw_name: bytes) -> bool:
    """
    Whether a raw query-parameter name decodes to C{token} (any case), as
    the WebSocket handshake decodes it: C{+} is a space, percent-escapes
    are decoded (C{%74oken} is C{token}).
    """
    name = unquote_to_bytes(raw_name.replace(b"+", b" ")).decode("utf-8", "replace")
    return name.casefold() == "token"


def redact_uri(uri: bytes) -> bytes:
    """
    C{uri} with the value of every query parameter named C{token} (after
    percent- and C{+}-decoding, in any case) replaced by C{<redacted>};
    everything else is kept byte for byte.
    """
    path, question, rest = uri.partition(b"?")
    if not question:
        return uri
    query, hash_, fragment = rest.partition(b"#")
    parts = query.split(b"&")
    for i, part in enumerate(parts):
        name, equals, _ = part.partition(b"=")
        if equals and _is_token_name(name):
            parts[i] = name + b"=" + _REDACTED
    return path + b"?" + b"&".join(parts) + hash_ + fragment


class _RedactedRequest:
    """
    A request as the access log sees it: the value of every C{token} query
    parameter is replaced (L{redact_uri}), so no console token is ever
    written to a log.
    """

    def __init__(self, request: IRequest):
        self._request = request
        self.uri = redact_uri(request.uri)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


def redacting_log_formatter(timestamp: str, request: IRequest) -> str:
    """
    Twisted's combined log format, with console tokens redacted.
    """
    uri = request.uri
    query = b"?" in uri  # (no query, no token: nothing to redact)
    line = _plain_line(timestamp, request, redact_uri(uri) if query else uri)
    if line is not None:
        return line
    line = combinedLogFormatter(timestamp, _RedactedRequest(request) if query else request)
    return escape_controls(line)


#: What the combined log format writes as it is (twisted.web's escaping
#: leaves it alone, and it holds no control character): printable ASCII
#: but the quotes and the backslash.
_PLAIN = re.compile(rb"[ !#-&(-\[\]-~]*")


def _plain_line(timestamp: str, request: IRequest, uri: bytes) -> Optional[str]:
    """
    The line L{combinedLogFormatter} writes for C{request} (with C{uri}),
    built at once when no field needs escaping (a console-info request's
    line: every console logs one); C{None} otherwise.
    """
    client = request.getClientAddress()
    if not isinstance(client, (IPv4Address, IPv6Address)):
        return None
    referrer = request.getHeader(b"referer") or b"-"
    agent = request.getHeader(b"user-agent") or b"-"
    method, protocol = request.method, request.clientproto
    try:
        fields = b" ".join((client.host.encode("ascii"), method, uri, protocol, referrer, agent))
    except (TypeError, UnicodeEncodeError):
        return None
    if _PLAIN.fullmatch(fields) is None:
        return None
    return '"%s" - - %s "%s %s %s" %d %s "%s" "%s"' % (
        client.host, timestamp, method.decode("ascii"), uri.decode("ascii"), protocol.decode("ascii"),
        request.code, request.sentLength or "-", referrer.decode("ascii"), agent.decode("ascii"),
    )  # fmt: skip


_CONTROL_TEXT = re.compile(r"[\x00-\x1f\x7f]")


def escape_controls(text: str) -> str:
    """
    C{text} with every control character written as C{\\xNN}: nothing a
    client sends can start a new log line.
    """
    if _CONTROL_TEXT.search(text) is None:
        return text
    return _CONTROL_TEXT.sub(lambda m: "\\x%02x" % ord(m.group()), text)


#: The access log: one line per request (C{logging.access_log}).
access_log = QuickLogger(namespace="vaporproxy.access")


#: The request bodies routes take: (method, raw path pattern, most bytes).
#: Every other request may carry no body at all (issue #11).
BODY_LIMITS: Sequence[Tuple[bytes, Pattern[bytes], int]] = (
    (b"POST", re.compile(rb"^/api/v1/virtualization/virtualmachines/[^/?]+/console/shares$"), 4096),
)

_CONTROL_BYTES = re.compile(rb"[\x00-\x1f\x7f]")
_TOO_LARGE = json.dumps(error_body(ErrorCode.BAD_REQUEST, "Request body too large")).encode("utf-8")


def body_limit(method: bytes, path: bytes) -> int:
    """
    The most body bytes a request of C{method} to C{path} (the raw request
    target, query included) may carry.
    """
    path = path.split(b"?", 1)[0]
    for allowed_method, pattern, limit in BODY_LIMITS:
        if method == allowed_method and pattern.match(path):
            return limit
    return 0


class ConsoleRequest(Request):
    """
    twisted.web's request, but a body larger than its route takes
    (L{body_limit}) is answered 413 and the connection closed before the
    body is read or stored (twisted.web would spool it to a temporary file
    first), and answers name no server software.
    """

    _body_limit = 0
    _body_seen = 0
    _refused = False

    def gotLength(self, length: Optional[int]) -> None:
        channel = self.channel
        self._body_limit = body_limit(getattr(channel, "_command", b""), getattr(channel, "_path", b""))
        if length is not None and length > self._body_limit:
            self._refuse()
            return
        # Small in memory, as twisted.web does for short bodies.
        super().gotLength(min(length, self._body_limit) if length is not None else self._body_limit)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._body_seen += len(data)
        if self._body_seen > self._body_limit:
            self._refuse()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return  # answered 413 already; the connection is closing
        super().requestReceived(command, path, version)

    def _refuse(self) -> None:
        """
        Answer 413 on the raw connection and close it: the body is not read.
        """
        self._refused = True
        self.requestHeaders.removeHeader(b"expect")  # no "100 Continue" after the answer
        channel = self.channel
        channel.transport.write(
            b"HTTP/1.1 413 Content Too Large\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_TOO_LARGE), _TOO_LARGE)
        )
        channel.loseConnection()

    def setHeader(self, name: Any, value: Any) -> None:
        # (The length first: most names are not six letters long.)
        if isinstance(name, bytes) and len(name) == 6 and name.lower() == b"server":
            return  # twisted.web's "TwistedWeb/<version>"
        super().setHeader(name, value)


class ConsoleSite(Site):
    """
    The HTTP site: Twisted's L{Site} whose access log (one combined-format
    line per request, through the log observer, tokens redacted) can be
    switched off.

    @ivar access_log: whether requests are logged (default on;
        C{logging.access_log} in the configuration, applied on SIGHUP).
    """

    access_log = True
    requestFactory = ConsoleRequest

    def __init__(self, resource: IResource, *args: Any, **kwargs: Any):
        kwargs.setdefault("logFormatter", redacting_log_formatter)
        super().__init__(resource, *args, **kwargs)
        # twisted.web's idle and abort timeouts on the shared timers (one
        # reactor timer for all: L{vaporproxy.timers}), looked up once.
        self._call_later = timers_for(self.reactor).callLater

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        if protocol is not None:
            protocol.callLater = self._call_later
        return protocol

    def log(self, request: IRequest) -> None:
        """
        The request's line, to the log (namespace C{vaporproxy.access}), or
        to the log file this site was given (Twisted's C{logPath}).
        """
        if not self.access_log:
            return
        if self._logFile is _legacy_log.logfile:
            # What Site.log does when no log file is set (it writes to the
            # global log's file object, which makes the same event of each
            # line), without that detour.
            access_log.info("{log_io}", log_io=self._logFormatter(self._logDateTime, request))
        else:
            Site.log(self, request)


class StaticFiles(File):
    """
    A L{File} that never lists directories and answers JSON 404s, also for
    a name with a control character (NUL would make C{os.stat} raise).
    """

    childNotFound = NOT_FOUND
    forbidden = JSONError(ErrorCode.UNAUTHORIZED, 403, "Forbidden")
    contentTypes = dict(File.contentTypes)
    contentTypes.update({".js": "text/javascript", ".mjs": "text/javascript", ".json": "application/json"})

    def getChild(self, path: bytes, request: IRequest) -> Resource:
        if _CONTROL_BYTES.search(path):
            return NOT_FOUND
        return super().getChild(path, request)

    def directoryListing(self) -> Resource:
        return NOT_FOUND

    def render_GET(self, request: IRequest) -> Any:
        request.setHeader(b"x-content-type-options", b"nosniff")
        return super().render_GET(request)


#: The Content-Security-Policy of the bundled console page: scripts and
#: styles from this origin only, WebSockets to any host (the page may sit
#: behind a proxy that rewrites the host), sound from blob: URLs (spice-html5
#: plays the playback channel through a MediaSource), nothing else.
CONSOLE_PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; media-src blob:; font-src 'self'; connect-src 'self' ws: wss:; "
    "base-uri 'none'; form-action 'none'; object-src 'none'"
)


def console_page_body(request: IRequest) -> bytes:
    """
    The bundled console page, with its headers set (a strict CSP).

    @raise ConsoleError: NOT_FOUND when the page is not installed.
    """
    return page_body(request, STATIC_PAGE)


def page_body(request: IRequest, path: str) -> bytes:
    """
    One of the bundled pages (console, playback, control room), with the
    console page's headers: a strict CSP (no inline script), no referrer,
    no sniffing, revalidated on every load.

    @raise ConsoleError: NOT_FOUND when the page is not installed.
    """
    try:
        with open(path, "rb") as f:
            page = f.read()
    except OSError:
        raise ConsoleError(ErrorCode.NOT_FOUND, "Page not installed")
    request.setHeader(b"content-type", b"text/html; charset=utf-8")
    request.setHeader(b"content-security-policy", CONSOLE_PAGE_CSP.encode("ascii"))
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"referrer-policy", b"no-referrer")
    request.setHeader(b"cache-control", b"no-cache")
    return page


def static_tree(directory: Optional[str]) -> IResource:
    """
    The files under C{directory}, or a JSON 404 when it is missing.
    """
    if not directory or not os.path.isdir(directory):
        return JSONError(ErrorCode.NOT_FOUND, 404, "Not found")
    return StaticFiles(directory)
