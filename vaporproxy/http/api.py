"""
The HTTP API of vaporproxy: L{ConsoleAPI}.

A class holding its collaborators, with C{app = Klein()} on the class (Klein's
"non-global state" shape).  Routes:

    - C{GET /api/v1/virtualization/virtualmachines/{id}/console}: console
      info and a fresh one-time token (Bearer key).
    - C{GET …/{id}/console/ws?token=T}: the console WebSocket (the bridge).
    - C{GET /api/v1/console/stats}: live consoles (admin).
    - C{DELETE …/{id}/console/sessions}: close every live console of a VM
      (admin).
    - C{GET /metrics}: Prometheus text (admin key, or loopback without key).
    - C{GET /healthz}, C{GET /readyz}: liveness and readiness.
    - C{GET /console/{id}}: the bundled console page;
      C{/static/novnc/…}, C{/static/spice-html5/…}: the client libraries.

Every error answer is C{{"type": "error", "code": CODE, "error": message}}
with a fitting status; tracebacks go to the log only, and no token is ever
logged (only the first 12 hex digits of its SHA-256).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from fnmatch import fnmatchcase
from typing import Any, Dict, Mapping, Optional, Sequence
from urllib.parse import quote, unquote_to_bytes, urlsplit

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferTimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python import log as _legacy_log
from twisted.python.failure import Failure
from twisted.web.http import combinedLogFormatter
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import Site
from twisted.web.static import File
from werkzeug.exceptions import MethodNotAllowed, NotFound

from vaporproxy.http.auth import Authenticator, Principal, bearer_credential
from vaporproxy.http.request import client_ip_from
from vaporproxy.timestamps import iso_utc
from vaporproxy.config import Config
from vaporproxy.vm.libvirt import UUID_RE
from vaporproxy.vm.target import dial_host, is_loopback, select_console
from vaporproxy.errors import ConsoleError, ErrorCode, error_body
from vaporproxy.interfaces import CONSOLE_TYPES, Grant
from vaporproxy.logs import debug_enabled
from vaporproxy.stores.tokens import token_log_id

VM_PATH = "/api/v1/virtualization/virtualmachines"
PASSWORD_MASK = "********"
METRICS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
JSON_CONTENT_TYPE = b"application/json"

#: The Content-Security-Policy of the bundled console page: scripts and
#: styles from this origin only, WebSockets to any host (the page may sit
#: behind a proxy that rewrites the host), sound from blob: URLs (spice-html5
#: plays the playback channel through a MediaSource), nothing else.
CONSOLE_PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; media-src blob:; font-src 'self'; connect-src 'self' ws: wss:; "
    "base-uri 'none'; form-action 'none'; object-src 'none'"
)

_DISPLAY_RE = re.compile(r"^[0-9]{1,4}$")
#: The console WebSocket path as raw request bytes, for the fast route: one
#: path segment for the VM, no percent-escapes (anything else goes through
#: Klein, which decodes them).
_WS_PATH_RE = re.compile(rb"^/api/v1/virtualization/virtualmachines/[^/%]+/console/ws$")
#: The console-info path as raw request bytes, for its fast route: a VM id of
#: printable ASCII without C{/} or C{%} (so that the raw bytes are exactly
#: what Klein would decode); anything else goes through Klein.
_INFO_PATH_RE = re.compile(rb"^/api/v1/virtualization/virtualmachines/([!-$&-.0-~]+)/console$")
_READY_CHECK_TIMEOUT = 5.0
_CHECK_DETAIL_MAX = 120

_STATIC_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "static")
_STATIC_PAGE = os.path.join(_STATIC_DIR, "console.html")


def _client_ip(request: IRequest, trusted_proxies: Sequence[str]) -> str:
    """
    The client's address: the peer, or the X-Forwarded-For address given
    by a trusted proxy (the bridge's rule).
    """
    peer = request.getClientAddress()
    peer_host = getattr(peer, "host", None) or ""
    forwarded = request.getHeader(b"x-forwarded-for")
    forwarded_text = forwarded.decode("latin-1") if forwarded is not None else None
    return client_ip_from(peer_host, forwarded_text, trusted_proxies)


class _JSONError(Resource):
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


_NOT_FOUND = _JSONError(ErrorCode.NOT_FOUND, 404, "Not found")


class _Root(Resource):
    """
    The root resource: the two requests of every console go straight to
    their handlers, everything else to the Klein app.

      - a console WebSocket upgrade (C{GET} of the console WebSocket path)
        to L{ConsoleAPI.console_ws};
      - console info (C{GET} of C{.../virtualmachines/{id}/console} with a
        plain VM id) to L{ConsoleAPI.render_console_info}.

    Skipping Klein's per-request URL map binding, matching and Deferred
    plumbing for them is a measurable part of a console's set-up cost
    (issue #3).  The answers, errors included, are the same as through
    Klein (tests compare both routes).
    """

    isLeaf = True

    def __init__(self, api: "ConsoleAPI", klein_resource: IResource):
        super().__init__()
        self._api = api
        self._klein = klein_resource

    def render(self, request: IRequest) -> Any:
        if request.method == b"GET":
            path = request.path
            if path.endswith(b"/ws"):
                if _WS_PATH_RE.match(path):
                    try:
                        return self._api.console_ws(request, "").render(request)
                    except Exception:
                        self._api.log.failure("unexpected error opening a console WebSocket")
                        request.setResponseCode(500)
                        request.setHeader(b"content-type", JSON_CONTENT_TYPE)
                        return json.dumps(ConsoleError(ErrorCode.INTERNAL_ERROR).to_dict()).encode("utf-8")
            else:
                match = _INFO_PATH_RE.match(path)
                if match is not None:
                    return self._api.render_console_info(request, match.group(1).decode("ascii"))
        return self._klein.render(request)


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
    if b"?" not in request.uri:
        # No query, no token: nothing to redact.
        return combinedLogFormatter(timestamp, request)
    return combinedLogFormatter(timestamp, _RedactedRequest(request))


#: The access log: one line per request (C{logging.access_log}).
access_log = Logger(namespace="vaporproxy.access")


class ConsoleSite(Site):
    """
    The HTTP site: Twisted's L{Site} whose access log (one combined-format
    line per request, through the log observer, tokens redacted) can be
    switched off.

    @ivar access_log: whether requests are logged (default on;
        C{logging.access_log} in the configuration, applied on SIGHUP).
    """

    access_log = True

    def __init__(self, resource: IResource, *args: Any, **kwargs: Any):
        kwargs.setdefault("logFormatter", redacting_log_formatter)
        super().__init__(resource, *args, **kwargs)

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


class _StaticFiles(File):
    """
    A L{File} that never lists directories and answers JSON 404s.
    """

    childNotFound = _NOT_FOUND
    forbidden = _JSONError(ErrorCode.UNAUTHORIZED, 403, "Forbidden")
    contentTypes = dict(File.contentTypes)
    contentTypes.update({".js": "text/javascript", ".mjs": "text/javascript", ".json": "application/json"})

    def directoryListing(self) -> Resource:
        return _NOT_FOUND

    def render_GET(self, request: IRequest) -> Any:
        request.setHeader(b"x-content-type-options", b"nosniff")
        return super().render_GET(request)


class ConsoleAPI:
    """
    The HTTP API.

    @ivar app: the L{Klein} app; C{api.app.resource()} or
        L{ConsoleAPI.resource} give the root resource.
    """

    app = Klein()
    log = Logger(namespace="vaporproxy.web.ConsoleAPI")

    def __init__(
        self,
        *,
        config: Config,
        token_store: Any,
        locator: Any,
        limiter: Any,
        host_policy: Any,
        registry: Any,
        bridge_factory: Any,
        metrics: Any,
        reactor: IReactorTime,
        static_dirs: Mapping[str, str],
        cluster: Any = None,
    ):
        """
        @param cluster: the L{vaporproxy.stores.redis.RedisBackend} when
            this process is one of a cluster (C{tokens.backend: redis}),
            else C{None}.  With it, stats report cluster totals and every
            process's figures, and DELETE of a VM's sessions reaches every
            process.
        """
        self._cluster = cluster
        self._token_store = token_store
        self._locator = locator
        self._limiter = limiter
        self._host_policy = host_policy
        self._registry = registry
        self._bridge_factory = bridge_factory
        self._metrics = metrics
        self._reactor = reactor
        self._static_dirs = dict(static_dirs)
        self.reload(config)

    # -- composition -------------------------------------------------------

    def resource(self) -> IResource:
        """
        The root resource to serve: the Klein app, with a direct route for
        console WebSocket upgrades.
        """
        return _Root(self, self.app.resource())

    def reload(self, config: Config) -> None:
        """
        Take a new configuration: API keys and JWT settings (the JWT key
        file is read again), trusted proxies, the TLS flag, client-IP
        binding.  Live consoles are not touched.  (The bridge factory is
        reloaded by its owner.)

        @raise vaporproxy.config.ConfigError: when the JWT key cannot be
            loaded; nothing changes then.
        """
        authenticator: Optional[Authenticator] = getattr(self, "_auth", None)
        if authenticator is None:
            self._auth = Authenticator(config.auth, self._reactor)
        else:
            authenticator.reload(config.auth)
        self._config = config

    # -- helpers -------------------------------------------------------------

    def _json(self, request: IRequest, body: Any, status: int = 200) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", JSON_CONTENT_TYPE)
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        return json.dumps(body).encode("utf-8")

    def _error(self, request: IRequest, error: ConsoleError) -> bytes:
        if error.code is ErrorCode.UNAUTHORIZED and error.http_status == 401:
            request.setHeader(b"www-authenticate", b'Bearer realm="vaporproxy"')
        return self._json(request, error.to_dict(), error.http_status)

    def _authenticate(self, request: IRequest) -> Principal:
        """
        The caller of C{request}: an API key or a JWT (L{Authenticator}).

        @raise ConsoleError: UNAUTHORIZED (401) when unknown.
        """
        return self._auth.authenticate(request.getHeader(b"authorization"))

    def _require_admin(self, request: IRequest) -> Principal:
        key = self._authenticate(request)
        if not key.admin:
            raise ConsoleError(ErrorCode.UNAUTHORIZED, "Administrator access required", http_status=403)
        return key

    @staticmethod
    def _key_allows(key: Principal, *names: str) -> bool:
        return any(fnmatchcase(name, pattern) for pattern in key.vms for name in names if name)

    @staticmethod
    def _arg(request: IRequest, name: bytes) -> Optional[str]:
        values = request.args.get(name)
        if not values:
            return None
        if len(values) > 1:
            raise ConsoleError(ErrorCode.BAD_REQUEST, f"Parameter {name.decode()} given more than once")
        try:
            return values[0].decode("utf-8")
        except UnicodeDecodeError:
            raise ConsoleError(ErrorCode.BAD_REQUEST, f"Parameter {name.decode()} is not UTF-8")

    def _console_params(self, request: IRequest) -> tuple[Optional[str], Optional[int]]:
        console_type = self._arg(request, b"type")
        if console_type is not None and console_type not in CONSOLE_TYPES:
            raise ConsoleError(ErrorCode.BAD_REQUEST, "Parameter type must be vnc or spice")
        display_text = self._arg(request, b"display")
        display: Optional[int] = None
        if display_text is not None:
            if not _DISPLAY_RE.match(display_text):
                raise ConsoleError(ErrorCode.BAD_REQUEST, "Parameter display must be a non-negative integer")
            display = int(display_text)
        return console_type, display

    # -- console info ------------------------------------------------------

    @app.route(VM_PATH + "/<string:vm_id>/console", methods=["GET"])
    def console_info(self, request: IRequest, vm_id: str) -> Deferred:
        """
        Console info and a fresh token for one console of C{vm_id}.
        """
        return Deferred.fromCoroutine(self._console_info(request, vm_id))

    def render_console_info(self, request: IRequest, vm_id: str) -> Any:
        """
        The console-info route without Klein (L{_Root}): the same handler,
        the same error answers as Klein's error handlers give
        (L{_console_error}, L{_unexpected}), and, as Klein does, the
        handler is cancelled when the client goes away first.  The one
        difference on the wire: the body goes out with a Content-Length
        (Klein writes it chunked).
        """
        from twisted.web.server import NOT_DONE_YET

        d = Deferred.fromCoroutine(self._console_info(request, vm_id))
        if d.called:
            # Answered without waiting (memory token store, cached VM).
            result: list = []
            d.addBoth(result.append)
            answer = result[0]
            if isinstance(answer, Failure):
                return self._error_answer(request, answer)
            return answer
        gone: list = []

        def lost(failure: Failure) -> None:
            gone.append(True)
            d.cancel()

        request.notifyFinish().addErrback(lost)

        def answered(body: Any) -> None:
            if gone:
                if isinstance(body, Failure) and not body.check(CancelledError):
                    self.log.failure("console info failed after the client went away", body)
                return
            if isinstance(body, Failure):
                body = self._error_answer(request, body)
            # As twisted.web frames a body that render() returns.
            request.setHeader(b"content-length", b"%d" % len(body))
            request.write(body)
            request.finish()

        d.addBoth(answered)
        return NOT_DONE_YET

    def _error_answer(self, request: IRequest, failure: Failure) -> bytes:
        """
        The answer Klein's error handlers give to C{failure}.
        """
        if failure.check(ConsoleError):
            return self._console_error(request, failure)
        return self._unexpected(request, failure)

    async def _console_info(self, request: IRequest, vm_id: str) -> bytes:
        key = self._authenticate(request)
        console_type, display = self._console_params(request)
        try:
            vm = await self._locator.locate(vm_id)
        except ConsoleError as e:
            if e.code is ErrorCode.VM_NOT_FOUND and not self._key_allows(key, vm_id):
                # Do not tell a key which VMs exist outside its reach.
                raise ConsoleError(ErrorCode.UNAUTHORIZED, http_status=403)
            raise
        if not self._key_allows(key, vm.uuid, vm.name):
            self.log.info("user {user} denied console of {vm_uuid}", user=key.user, vm_uuid=vm.uuid)
            raise ConsoleError(ErrorCode.UNAUTHORIZED, http_status=403)
        graphics = select_console(vm, console_type, display)
        try:
            address = await self._host_policy.resolve(dial_host(vm, graphics))
        except ConsoleError as e:
            if e.code is ErrorCode.UNAUTHORIZED:
                self.log.warn("console host of {vm_uuid} is not in allowed_hosts", vm_uuid=vm.uuid)
                raise ConsoleError(ErrorCode.UNAUTHORIZED, e.message, http_status=403)
            raise
        config = self._config
        client_ip = (
            _client_ip(request, config.server.trusted_proxies) if config.console.bind_client_ip else None
        )
        issued = await self._token_store.issue(
            Grant(
                vm_ref=vm_id,
                vm_uuid=vm.uuid,
                console_type=graphics.type,
                display=graphics.index,
                user=key.user,
                client_ip=client_ip,
            )
        )
        self._metrics.token_issued()
        # Debug: a console's info line is the bridge's "console ... closed"
        # (VM, user, token hash, client, outcome); the request itself is in
        # the access log.
        if debug_enabled():
            self.log.debug(
                "issued {console_type} console token {token_hash} for {vm_uuid} to {user}",
                console_type=graphics.type,
                token_hash=token_log_id(issued.token),
                vm_uuid=vm.uuid,
                user=key.user,
            )
        return self._json(
            request,
            {
                "type": graphics.type,
                "host": address,
                "port": graphics.port,
                "token": issued.token,
                "ws_path": f"{VM_PATH}/{quote(vm_id, safe='')}/console/ws",
                "expires_at": iso_utc(issued.expires_at),
                "tls_enabled": config.console.enable_tls,
                "password": PASSWORD_MASK if graphics.has_password else None,
            },
        )

    # -- WebSocket ---------------------------------------------------------

    @app.route(VM_PATH + "/<string:vm_id>/console/ws", methods=["GET"])
    def console_ws(self, request: IRequest, vm_id: str) -> IResource:
        """
        The console WebSocket: the bridge factory reads the token, the VM
        id and the client address from the request itself.
        """
        from autobahn.twisted.resource import WebSocketResource

        return WebSocketResource(self._bridge_factory)

    # -- admin -------------------------------------------------------------

    @app.route("/api/v1/console/stats", methods=["GET"])
    def stats(self, request: IRequest) -> Deferred:
        """
        Live consoles of this process (admin).
        """
        return Deferred.fromCoroutine(self._stats(request))

    async def _stats(self, request: IRequest) -> bytes:
        self._require_admin(request)
        if self._cluster is not None:
            return self._json(request, await self._cluster_stats_body())
        limits = await self._limiter.stats()
        total_tokens = await self._token_store.count()
        now = self._reactor.seconds()
        return self._json(
            request,
            {
                "total_connections": limits["total_connections"],
                "total_tokens": total_tokens,
                "connections_per_vm": dict(limits["connections_per_vm"]),
                "connections": [record.as_dict(now) for record in self._registry.consoles()],
            },
        )

    async def _cluster_stats_body(self) -> Dict[str, Any]:
        """
        The stats of a cluster: C{total_connections}, C{total_tokens} and
        C{connections_per_vm} are cluster-wide; C{connections} lists this
        process's consoles; C{cluster} names this process and gives every
        live process's figures.
        """
        figures = await self._cluster.cluster_stats()
        now = self._reactor.seconds()
        processes = []
        for process in figures.get("processes", ()):
            entry = dict(process)
            for field in ("started_at", "updated_at"):
                if isinstance(entry.get(field), (int, float)):
                    entry[field] = iso_utc(entry[field])
            processes.append(entry)
        per_vm = dict(figures["connections_per_vm"])
        return {
            "total_connections": figures["total_connections"],
            "total_tokens": figures["total_tokens"],
            "connections_per_vm": per_vm,
            "connections": [record.as_dict(now) for record in self._registry.consoles()],
            "cluster": {
                "node_id": self._cluster.node_id,
                "total_connections": figures["total_connections"],
                "total_tokens": figures["total_tokens"],
                "connections_per_vm": per_vm,
                "processes": processes,
            },
        }

    @app.route(VM_PATH + "/<string:vm_id>/console/sessions", methods=["DELETE"])
    def delete_sessions(self, request: IRequest, vm_id: str) -> Deferred:
        """
        Close every live console of C{vm_id} (admin).
        """
        return Deferred.fromCoroutine(self._delete_sessions(request, vm_id))

    async def _delete_sessions(self, request: IRequest, vm_id: str) -> bytes:
        key = self._require_admin(request)
        try:
            vm = await self._locator.locate(vm_id)
            vm_uuid = vm.uuid
        except ConsoleError as e:
            # A VM that is gone (or whose hypervisor is down) may still have
            # live consoles: accept its UUID as given.
            if e.code not in (ErrorCode.VM_NOT_FOUND, ErrorCode.INTERNAL_ERROR) or not UUID_RE.match(vm_id):
                raise
            # The canonical form (dashed, lower case) the registry keys on.
            vm_uuid = str(uuid.UUID(vm_id))
        terminated = await self.terminate_vm(vm_uuid)
        self.log.info(
            "{user} terminated {count} console(s) of {vm_uuid}", user=key.user, count=terminated, vm_uuid=vm_uuid
        )
        return self._json(request, {"terminated": terminated})

    async def terminate_vm(self, vm_uuid: str) -> int:
        """
        Close every live console of C{vm_uuid}; answer how many.

        Alone, that is this process's consoles.  In a cluster, the consoles
        of this process close at once and every process (this one too) is
        told over Redis pub/sub to close its own; the answer is then the
        number of consoles of the VM that held a slot anywhere in the
        cluster when the request arrived (or this process's count, if
        larger).  Remote consoles close asynchronously, within
        milliseconds of the answer.

        @raise ConsoleError: SERVICE_UNAVAILABLE when Redis cannot be
            reached (this process's consoles are closed all the same).
        """
        if self._cluster is None:
            return int(self._registry.terminate_vm(vm_uuid))
        try:
            limits = await self._limiter.stats()
        except ConsoleError:
            self._registry.terminate_vm(vm_uuid)
            raise
        live = int(dict(limits["connections_per_vm"]).get(vm_uuid, 0))
        local = int(self._registry.terminate_vm(vm_uuid))
        processes = await self._cluster.publish_terminate(vm_uuid)
        self.log.info(
            "terminate request for {vm_uuid} sent to {processes} process(es)", vm_uuid=vm_uuid, processes=processes
        )
        return max(live, local)

    def _is_local(self, request: IRequest) -> bool:
        """
        Whether C{request} comes from this machine itself.  A forwarded
        request is never local: a reverse proxy on loopback carries other
        people's requests.
        """
        if request.getHeader(b"x-forwarded-for") is not None or request.getHeader(b"forwarded") is not None:
            return False
        return is_loopback(_client_ip(request, self._config.server.trusted_proxies))

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: IRequest) -> Deferred:
        """
        Prometheus text: for an admin key, or from loopback without a key.
        """
        return Deferred.fromCoroutine(self._metrics_text(request))

    async def _metrics_text(self, request: IRequest) -> bytes:
        if bearer_credential(request.getHeader(b"authorization")) is not None or not self._is_local(request):
            self._require_admin(request)
        body = await self._metrics.render()
        request.setHeader(b"content-type", METRICS_CONTENT_TYPE)
        request.setHeader(b"cache-control", b"no-store")
        return body

    # -- health --------------------------------------------------------------

    @app.route("/healthz", methods=["GET"])
    def healthz(self, request: IRequest) -> bytes:
        """
        Liveness: the process answers.
        """
        return self._json(request, {"status": "ok"})

    @app.route("/readyz", methods=["GET"])
    def readyz(self, request: IRequest) -> Deferred:
        """
        Readiness: the token store and every hypervisor are reachable.
        """
        return Deferred.fromCoroutine(self._readyz(request))

    async def _check(self, call: Any) -> tuple[Optional[str], Any]:
        """
        Run one readiness check with a timeout; answer C{(error, result)}
        where C{error} is a short, client-safe string or C{None}.
        """
        try:
            d = call()
            d.addTimeout(_READY_CHECK_TIMEOUT, self._reactor)
            return None, await d
        except ConsoleError as e:
            return e.message, None
        except DeferTimeoutError:
            self.log.warn("readiness check timed out after {timeout}s", timeout=_READY_CHECK_TIMEOUT)
            return "timeout", None
        except Exception as e:  # noqa: BLE001 (reported, never raised)
            self.log.failure("readiness check failed", Failure(e))
            return "unavailable", None

    async def _readyz(self, request: IRequest) -> bytes:
        store_error, _ = await self._check(self._token_store.check)
        locator_error, hypervisors = await self._check(self._locator.check)
        if locator_error is not None:
            hypervisors = {h.uri: locator_error for h in self._config.hypervisors} or {"*": locator_error}
        hv_detail: Dict[str, str] = {}
        for uri, state in dict(hypervisors).items():
            label = _public_uri(str(uri))
            if label in hv_detail:
                label = f"{label} #{len(hv_detail) + 1}"
            hv_detail[label] = str(state)[:_CHECK_DETAIL_MAX]
        ready = store_error is None and all(state == "ok" for state in hv_detail.values())
        return self._json(
            request,
            {
                "ready": ready,
                "checks": {"token_store": store_error or "ok", "hypervisors": hv_detail},
            },
            200 if ready else 503,
        )

    # -- pages and static files -------------------------------------------

    @app.route("/console/<string:vm_id>", methods=["GET"])
    def console_page(self, request: IRequest, vm_id: str) -> bytes:
        """
        The bundled console page; it picks noVNC or spice-html5 from the
        console info it fetches.
        """
        try:
            with open(_STATIC_PAGE, "rb") as f:
                page = f.read()
        except OSError:
            raise ConsoleError(ErrorCode.NOT_FOUND, "Console page not installed")
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"content-security-policy", CONSOLE_PAGE_CSP.encode("ascii"))
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(b"cache-control", b"no-cache")
        return page

    def _static(self, name: str) -> IResource:
        directory = self._static_dirs.get(name)
        if not directory or not os.path.isdir(directory):
            return _JSONError(ErrorCode.NOT_FOUND, 404, "Not found")
        return _StaticFiles(directory)

    @app.route("/static/app/", branch=True, methods=["GET", "HEAD"])
    def static_app(self, request: IRequest) -> IResource:
        """
        The console page's own script and style (the package's C{static}).
        """
        if not os.path.isdir(_STATIC_DIR):
            return _JSONError(ErrorCode.NOT_FOUND, 404, "Not found")
        return _StaticFiles(_STATIC_DIR)

    @app.route("/static/novnc/", branch=True, methods=["GET", "HEAD"])
    def static_novnc(self, request: IRequest) -> IResource:
        """
        The noVNC files.
        """
        return self._static("novnc")

    @app.route("/static/spice-html5/", branch=True, methods=["GET", "HEAD"])
    def static_spice(self, request: IRequest) -> IResource:
        """
        The spice-html5 files.
        """
        return self._static("spice-html5")

    # -- errors ------------------------------------------------------------

    @app.handle_errors(ConsoleError)
    def _console_error(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        self.log.debug("answered {code}: {message}", code=error.code.name, message=error.message)
        return self._error(request, error)

    @app.handle_errors(NotFound)
    def _not_found(self, request: IRequest, failure: Failure) -> bytes:
        return self._json(request, error_body(ErrorCode.NOT_FOUND, "Not found"), 404)

    @app.handle_errors(MethodNotAllowed)
    def _method_not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        allowed = failure.value.valid_methods or ()
        if allowed:
            request.setHeader(b"allow", ", ".join(sorted(allowed)).encode("ascii"))
        return self._json(request, error_body(ErrorCode.METHOD_NOT_ALLOWED, "Method not allowed"), 405)

    @app.handle_errors(Exception)
    def _unexpected(self, request: IRequest, failure: Failure) -> Any:
        from werkzeug.exceptions import HTTPException

        if failure.check(HTTPException):
            return failure  # werkzeug's own answer (e.g. a redirect)
        self.log.failure("unexpected error answering {method} {path}", failure,
                         method=request.method, path=request.path)
        return self._error(request, ConsoleError(ErrorCode.INTERNAL_ERROR))


def _public_uri(uri: str) -> str:
    """
    A hypervisor URI as /readyz (open to anyone) may show it: the host part
    and the query (socket paths, key files) are hidden, so no internal host
    name reaches a client.
    """
    parts = urlsplit(uri)
    netloc = "\N{HORIZONTAL ELLIPSIS}" if parts.netloc else ""
    return f"{parts.scheme}://{netloc}{parts.path}"
