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
logged (only the first 12 hex digits of its SHA-256).  The site itself
(access log, static files) is L{vaporproxy.http.site}; console info is
L{vaporproxy.http.console_info}; stats and termination
L{vaporproxy.http.admin}; readiness L{vaporproxy.http.health}.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Mapping, Optional

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import MethodNotAllowed, NotFound

from vaporproxy.config import Config
from vaporproxy.errors import ConsoleError, ErrorCode, error_body
from vaporproxy.http.admin import ConsoleAdmin
from vaporproxy.http.auth import Authenticator, Principal, bearer_credential
from vaporproxy.http.console_info import VM_PATH, ConsoleIssuer, check_id, console_mode, console_params, query_arg
from vaporproxy.http.health import readiness
from vaporproxy.http.mint import MintLimits
from vaporproxy.http.request import client_ip_from
from vaporproxy.http.routing import Root, relative_redirect, render_deferred
from vaporproxy.http.recordings import RecordingsAPI
from vaporproxy.http.revocation import terminate_share
from vaporproxy.http.shares import ShareRoutes, creator_allows, share_secret
from vaporproxy.http.site import ADMIN_PAGE, JSON_CONTENT_TYPE, PLAYBACK_PAGE, STATIC_DIR, console_page_body, page_body, static_tree
from vaporproxy.vm.libvirt import UUID_RE
from vaporproxy.vm.target import is_loopback

METRICS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

#: Module level: a Logger on a class takes the class's own name as namespace.
log = Logger(namespace="vaporproxy.web.ConsoleAPI")



def request_client_ip(request: IRequest, trusted_proxies: Any) -> str:
    """
    The client's address: the peer, or the X-Forwarded-For address given
    by a trusted proxy (the bridge's rule).
    """
    peer = request.getClientAddress()
    peer_host = getattr(peer, "host", None) or ""
    forwarded = request.getHeader(b"x-forwarded-for")
    forwarded_text = forwarded.decode("latin-1") if forwarded is not None else None
    return client_ip_from(peer_host, forwarded_text, trusted_proxies)


def is_local(request: IRequest, trusted_proxies: Any) -> bool:
    """
    Whether C{request} comes from this machine itself.  A forwarded request
    is never local: a reverse proxy on loopback carries other people's
    requests.
    """
    if request.getHeader(b"x-forwarded-for") is not None or request.getHeader(b"forwarded") is not None:
        return False
    return is_loopback(request_client_ip(request, trusted_proxies))


class ConsoleAPI:
    """
    The HTTP API.

    @ivar app: the L{Klein} app; C{api.app.resource()} or
        L{ConsoleAPI.resource} give the root resource.
    """

    app = Klein()

    def __init__(self, *, config: Config, token_store: Any, locator: Any, limiter: Any, host_policy: Any,
                 registry: Any, bridge_factory: Any, metrics: Any, reactor: IReactorTime,
                 static_dirs: Mapping[str, str], cluster: Any = None, audit: Any = None,
                 recordings: Any = None, shares: Any = None):  # fmt: skip
        """
        @param cluster: the L{vaporproxy.stores.redis.RedisBackend} when
            this process is one of a cluster (C{tokens.backend: redis}),
            else C{None}.  With it, stats report cluster totals and every
            process's figures, and DELETE of a VM's sessions reaches every
            process.
        @param audit: the L{vaporproxy.audit.AuditTrail} (token issued,
            sessions terminated), or C{None}.
        @param recordings: the L{vaporproxy.recordings.store.RecordingStore}
            when C{recording} is configured, else C{None} (its routes then
            answer 404).
        """
        self._audit = audit
        self._shares = None if shares is None else ShareRoutes(
            shares, locator, lambda share_id: terminate_share(registry, token_store, share_id), audit,
            creator_allows=lambda user, vm: creator_allows(self._config.auth, user, vm),
        )
        self._recordings = None if recordings is None else RecordingsAPI(
            recordings, self._require_admin, self._json, query_arg
        )
        self._token_store = token_store
        self._locator = locator
        self._bridge_factory = bridge_factory
        self._metrics = metrics
        self._reactor = reactor
        self._static_dirs = dict(static_dirs)
        self._mint = MintLimits(reactor, config.auth)
        self._issuer = ConsoleIssuer(token_store=token_store, locator=locator, host_policy=host_policy,
                                     metrics=metrics, mint=self._mint, clock=reactor, audit=audit)  # fmt: skip
        self._admin = ConsoleAdmin(limiter=limiter, token_store=token_store, registry=registry, reactor=reactor,
                                   cluster=cluster)  # fmt: skip
        self.reload(config)

    # -- composition -------------------------------------------------------

    def resource(self) -> IResource:
        """
        The root resource to serve: the Klein app, with a direct route for
        console WebSocket upgrades.
        """
        return Root(self, self.app.resource())

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
        mint = getattr(self, "_mint", None)
        if mint is not None:
            mint.reload(config.auth)
        self._issuer.policies = config.auth.policies

    # -- helpers -------------------------------------------------------------

    def _json(self, request: IRequest, body: Any, status: int = 200) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", JSON_CONTENT_TYPE)
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        return json.dumps(body).encode("utf-8")

    def _error(self, request: IRequest, error: ConsoleError) -> bytes:
        if error.challenge is not None:
            request.setHeader(b"www-authenticate", error.challenge.encode("ascii", "replace"))
        elif error.code is ErrorCode.UNAUTHORIZED and error.http_status == 401:
            request.setHeader(b"www-authenticate", b'Bearer realm="vaporproxy"')
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            request.setHeader(b"retry-after", b"%d" % retry_after)
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

    # -- console info ------------------------------------------------------

    @app.route(VM_PATH + "/<string:vm_id>/console", methods=["GET"])
    def console_info(self, request: IRequest, vm_id: str) -> Deferred:
        """
        Console info and a fresh token for one console of C{vm_id}.
        """
        return Deferred.fromCoroutine(self._console_info(request, vm_id))

    def render_console_info(self, request: IRequest, vm_id: str) -> Any:
        """
        The console-info route without Klein (L{Root}): the same handler,
        the same error answers as Klein's error handlers give
        (L{_console_error}, L{_unexpected}), and, as Klein does, the
        handler is cancelled when the client goes away first.  The one
        difference on the wire: the body goes out with a Content-Length
        (Klein writes it chunked).
        """
        d = Deferred.fromCoroutine(self._console_info(request, vm_id))
        return render_deferred(request, d, self._error_answer, log)

    def _error_answer(self, request: IRequest, failure: Failure) -> bytes:
        """
        The answer Klein's error handlers give to C{failure}.
        """
        if failure.check(ConsoleError):
            return self._console_error(request, failure)
        return self._unexpected(request, failure)

    async def _console_info(self, request: IRequest, vm_id: str) -> bytes:
        check_id(vm_id)
        secret = share_secret(request.getHeader(b"authorization"))
        if secret is not None and self._shares is not None:
            key = await self._shares.principal(secret, vm_id)
        else:
            key = self._authenticate(request)
        console_type, display = console_params(request)
        config = self._config
        client = request_client_ip(request, config.server.trusted_proxies)
        client_ip = client if config.console.bind_client_ip else None
        mode = console_mode(request, key)
        body = await self._issuer.issue(key, vm_id, console_type, display, client_ip, config.console.enable_tls,
                                        client=client, mode=mode)  # fmt: skip
        return self._json(request, body)

    # -- WebSocket ---------------------------------------------------------

    @app.route(VM_PATH + "/<string:vm_id>/console/ws", methods=["GET"])
    def console_ws(self, request: IRequest, vm_id: str) -> IResource:
        """
        The console WebSocket: the bridge factory reads the token, the VM
        id and the client address from the request itself.  An id with a
        control character is refused here (400), before the bridge logs it.
        """
        from autobahn.twisted.resource import WebSocketResource

        check_id(vm_id)
        return WebSocketResource(self._bridge_factory)

    # -- admin -------------------------------------------------------------

    @app.route("/api/v1/console/stats", methods=["GET"])
    def stats(self, request: IRequest) -> Deferred:
        """
        Live consoles of this process, or of the cluster (admin).
        """
        return Deferred.fromCoroutine(self._stats(request))

    async def _stats(self, request: IRequest) -> bytes:
        self._require_admin(request)
        return self._json(request, await self._admin.stats())

    @app.route(VM_PATH + "/<string:vm_id>/console/sessions", methods=["DELETE"])
    def delete_sessions(self, request: IRequest, vm_id: str) -> Deferred:
        """
        Close every live console of C{vm_id} (admin).
        """
        return Deferred.fromCoroutine(self._delete_sessions(request, vm_id))

    async def _delete_sessions(self, request: IRequest, vm_id: str) -> bytes:
        key = self._require_admin(request)
        check_id(vm_id)
        vm_name = None
        try:
            vm = await self._locator.locate(vm_id)
            vm_uuid, vm_name = vm.uuid, vm.name
        except ConsoleError as e:
            # A VM that is gone (or whose hypervisor is down) may still have
            # live consoles: accept its UUID as given.
            if e.code not in (ErrorCode.VM_NOT_FOUND, ErrorCode.INTERNAL_ERROR) or not UUID_RE.match(vm_id):
                raise
            # The canonical form (dashed, lower case) the registry keys on.
            vm_uuid = str(uuid.UUID(vm_id))
        terminated = await self.terminate_vm(vm_uuid)
        log.info(
            "{user} terminated {count} console(s) of {vm_uuid}", user=key.user, count=terminated, vm_uuid=vm_uuid
        )
        if self._audit is not None:
            self._audit.sessions_terminated(by=key.user, vm_uuid=vm_uuid, vm_name=vm_name, count=terminated)
        return self._json(request, {"terminated": terminated})

    async def terminate_vm(self, vm_uuid: str) -> int:
        """
        Close every live console of C{vm_uuid} (L{ConsoleAdmin.terminate_vm}).
        """
        return await self._admin.terminate_vm(vm_uuid)

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: IRequest) -> Deferred:
        """
        Prometheus text: for an admin key, or, with C{server.metrics_local},
        from loopback without a key.
        """
        return Deferred.fromCoroutine(self._metrics_text(request))

    async def _metrics_text(self, request: IRequest) -> bytes:
        keyless = bearer_credential(request.getHeader(b"authorization")) is None
        if not (keyless and self._config.server.metrics_local and is_local(request, self._config.server.trusted_proxies)):
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

    async def _readyz(self, request: IRequest) -> bytes:
        uris = [h.uri for h in self._config.hypervisors]
        body, status = await readiness(self._token_store, self._locator, uris, self._reactor)
        return self._json(request, body, status)

    # -- pages and static files -------------------------------------------

    @app.route("/console/<string:vm_id>", methods=["GET"])
    def console_page(self, request: IRequest, vm_id: str) -> bytes:
        """
        The bundled console page; it picks noVNC or spice-html5 from the
        console info it fetches.
        """
        check_id(vm_id)
        return console_page_body(request)

    # -- share links (issue 9) -----------------------------------------------

    def _share_routes(self) -> ShareRoutes:
        if self._shares is None:
            raise ConsoleError(ErrorCode.NOT_FOUND, "Share links are not available on this server")
        return self._shares

    @app.route(VM_PATH + "/<string:vm_id>/console/shares", methods=["POST"])
    def share_create(self, request: IRequest, vm_id: str) -> Deferred:
        async def go() -> bytes:
            check_id(vm_id)
            body = await self._share_routes().create(request, self._authenticate(request), vm_id)
            return self._json(request, body, 201)

        return Deferred.fromCoroutine(go())

    @app.route(VM_PATH + "/<string:vm_id>/console/shares", methods=["GET"])
    def share_list(self, request: IRequest, vm_id: str) -> Deferred:
        async def go() -> bytes:
            check_id(vm_id)
            return self._json(request, await self._share_routes().list(self._authenticate(request), vm_id))

        return Deferred.fromCoroutine(go())

    @app.route(VM_PATH + "/<string:vm_id>/console/shares/<string:share_id>", methods=["DELETE"])
    def share_revoke(self, request: IRequest, vm_id: str, share_id: str) -> Deferred:
        async def go() -> bytes:
            check_id(vm_id)
            body = await self._share_routes().revoke(self._authenticate(request), vm_id, share_id)
            return self._json(request, body)

        return Deferred.fromCoroutine(go())

    @app.route("/admin", methods=["GET"])
    def admin_page(self, request: IRequest) -> bytes:
        """The control room (its script asks the admin API with the key from the fragment)."""
        return page_body(request, ADMIN_PAGE)

    # -- recordings (issue 10) -------------------------------------------------

    def _recordings_api(self) -> RecordingsAPI:
        if self._recordings is None:
            raise ConsoleError(ErrorCode.NOT_FOUND, "Recording is not enabled on this server")
        return self._recordings

    @app.route("/console/recordings/<string:recording_id>", methods=["GET"])
    def playback_page(self, request: IRequest, recording_id: str) -> bytes:
        """The page that plays a recording in the browser."""
        return page_body(request, PLAYBACK_PAGE)

    @app.route("/api/v1/console/recordings", methods=["GET"])
    def recordings_list(self, request: IRequest) -> Any:
        return self._recordings_api().list(request)

    @app.route("/api/v1/console/recordings/<string:recording_id>", methods=["GET"])
    def recording(self, request: IRequest, recording_id: str) -> Any:
        return self._recordings_api().one(request, recording_id)

    @app.route("/api/v1/console/recordings/<string:recording_id>", methods=["DELETE"])
    def recording_delete(self, request: IRequest, recording_id: str) -> Any:
        return self._recordings_api().delete(request, recording_id)

    @app.route("/api/v1/console/recordings/<string:recording_id>/data", methods=["GET"])
    def recording_data(self, request: IRequest, recording_id: str) -> Any:
        return self._recordings_api().data(request, recording_id)

    def _static(self, name: str) -> IResource:
        return static_tree(self._static_dirs.get(name))

    @app.route("/static/app/", branch=True, methods=["GET", "HEAD"])
    def static_app(self, request: IRequest) -> IResource:
        """
        The console page's own script and style (the package's C{static}).
        """
        return static_tree(STATIC_DIR)

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
        log.debug("answered {code}: {message}", code=error.code.name, message=error.message)
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
        from werkzeug.routing import RequestRedirect

        if failure.check(RequestRedirect):
            return self._json(request, *relative_redirect(request, failure.value))
        if failure.check(HTTPException):
            return failure  # werkzeug's own answer
        log.failure("unexpected error answering {method} {path}", failure,
                         method=request.method, path=request.path)
        return self._error(request, ConsoleError(ErrorCode.INTERNAL_ERROR))
