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
with a fitting status (L{vaporproxy.http.answers}); tracebacks go to the
log only, and no token is ever logged (only the first 12 hex digits of its
SHA-256).  This class is the route table: each route hands its request to
the piece whose job it is.  The site itself (access log, static files) is
L{vaporproxy.http.site}; who is calling L{vaporproxy.http.auth}; console
info L{vaporproxy.http.console_info}; stats and termination
L{vaporproxy.http.admin}; readiness L{vaporproxy.http.health}; share links
L{vaporproxy.http.shares}; recordings L{vaporproxy.http.recordings}.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Mapping

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import MethodNotAllowed, NotFound

from vaporproxy.config import Config
from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.http.admin import ConsoleAdmin
from vaporproxy.http.answers import (
    console_error_answer,
    failure_answer,
    json_answer,
    method_not_allowed_answer,
    not_found_answer,
    unexpected_answer,
)
from vaporproxy.http.auth import Authenticator, Principal, bearer_credential
from vaporproxy.http.console_info import VM_PATH, ConsoleIssuer, check_id, query_arg
from vaporproxy.http.health import readiness
from vaporproxy.http.mint import MintLimits
from vaporproxy.http.request import client_ip_from
from vaporproxy.http.routing import Root, render_coroutine
from vaporproxy.http.recordings import NoRecordings, RecordingsAPI
from vaporproxy.http.revocation import terminate_share
from vaporproxy.http.shares import ShareRoutes, creator_allows, share_secret
from vaporproxy.http.site import ADMIN_PAGE, PLAYBACK_PAGE, STATIC_DIR, console_page_body, page_body, static_tree
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
    The HTTP API: its route table (see the module docstring).

    @ivar app: the L{Klein} app; C{api.app.resource()} or
        L{ConsoleAPI.resource} give the root resource.
    """

    app = Klein()

    def __init__(self, *, config: Config, token_store: Any, locator: Any, limiter: Any, host_policy: Any,
                 registry: Any, bridge_factory: Any, metrics: Any, reactor: IReactorTime,
                 static_dirs: Mapping[str, str], cluster: Any = None, audit: Any = None,
                 recordings: Any = None, shares: Any = None):  # fmt: skip
        """
        C{cluster}: the Redis backend of a cluster (stats and DELETE reach
        every process), else C{None}; C{audit}, C{recordings}, C{shares}:
        the audit trail, recording store and share store, or C{None}.
        """
        self._shares = None if shares is None else ShareRoutes(
            shares, locator, lambda share_id: terminate_share(registry, token_store, share_id), audit,
            creator_allows=lambda user, vm: creator_allows(self._config.auth, user, vm),
        )
        self._recordings: Any = NoRecordings() if recordings is None else RecordingsAPI(
            recordings, self._require_admin, json_answer, query_arg
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
                                   cluster=cluster, locator=locator, audit=audit)  # fmt: skip
        self._auth = Authenticator(config.auth, reactor)
        self._config = config
        self._issuer.policies = config.auth.policies

    # -- composition -------------------------------------------------------

    def resource(self) -> IResource:
        """
        The root resource to serve: the Klein app, with the fast route for
        console info (L{Root}).
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
        self._auth.reload(config.auth)
        self._config = config
        self._mint.reload(config.auth)
        self._issuer.policies = config.auth.policies

    # -- helpers -------------------------------------------------------------

    def _answer(self, request: IRequest, work: Callable[[], Awaitable[Any]], status: int = 200) -> Deferred:
        """Run C{work}; its result is the JSON body, answered with C{status}."""

        async def run() -> bytes:
            return json_answer(request, await work(), status)

        return Deferred.fromCoroutine(run())

    def _authenticate(self, request: IRequest) -> Principal:
        """The caller of C{request} (L{Authenticator}); 401 when unknown."""
        return self._auth.authenticate(request.getHeader(b"authorization"))

    def _require_admin(self, request: IRequest) -> Principal:
        """The caller of C{request}, who must be an administrator (401, 403)."""
        return self._auth.authenticate_admin(request.getHeader(b"authorization"))

    # -- console info ------------------------------------------------------

    @app.route(VM_PATH + "/<string:vm_id>/console", methods=["GET"])
    def console_info(self, request: IRequest, vm_id: str) -> Deferred:
        """Console info and a fresh token for one console of C{vm_id}."""
        return Deferred.fromCoroutine(self._console_info(request, vm_id))

    def render_console_info(self, request: IRequest, vm_id: str) -> Any:
        """
        The console-info route without Klein (L{Root}): the same handler,
        the same error answers as Klein's error handlers give
        (L{failure_answer}), and, as Klein does, the handler is cancelled
        when the client goes away first.  The one difference on the wire:
        the body goes out with a Content-Length (Klein writes it chunked).
        When nothing it awaits is pending, it is answered at once, without
        Twisted's coroutine driver (L{render_coroutine}).
        """
        return render_coroutine(request, self._console_info(request, vm_id), failure_answer, log)

    async def _console_info(self, request: IRequest, vm_id: str) -> bytes:
        check_id(vm_id)
        secret = share_secret(request.getHeader(b"authorization"))
        if secret is not None and self._shares is not None:
            key = await self._shares.principal(secret, vm_id)
        else:
            key = self._authenticate(request)
        client = request_client_ip(request, self._config.server.trusted_proxies)
        body = await self._issuer.answer(request, key, vm_id, client, self._config.console)
        return json_answer(request, body)

    # -- WebSocket ---------------------------------------------------------

    @app.route(VM_PATH + "/<string:vm_id>/console/ws", methods=["GET"])
    def console_ws(self, request: IRequest, vm_id: str) -> IResource:
        """
        The console WebSocket of requests the port switch
        (L{vaporproxy.ws.switch}) did not take: the bridge factory reads the
        token, the VM id and the client address from the request itself.
        An id with a control character is refused here (400), before the
        bridge logs it.
        """
        from autobahn.twisted.resource import WebSocketResource

        check_id(vm_id)
        return WebSocketResource(self._bridge_factory)

    # -- admin -------------------------------------------------------------

    @app.route("/api/v1/console/stats", methods=["GET"])
    def stats(self, request: IRequest) -> Deferred:
        """Live consoles of this process, or of the cluster (admin)."""

        async def work() -> Any:
            self._require_admin(request)
            return await self._admin.stats()

        return self._answer(request, work)

    @app.route(VM_PATH + "/<string:vm_id>/console/sessions", methods=["DELETE"])
    def delete_sessions(self, request: IRequest, vm_id: str) -> Deferred:
        """Close every live console of C{vm_id} (admin)."""

        async def work() -> Any:
            key = self._require_admin(request)
            check_id(vm_id)
            return {"terminated": await self._admin.delete_sessions(key, vm_id)}

        return self._answer(request, work)

    async def terminate_vm(self, vm_uuid: str) -> int:
        """Close every live console of C{vm_uuid} (L{ConsoleAdmin.terminate_vm})."""
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
        """Liveness: the process answers."""
        return json_answer(request, {"status": "ok"})

    @app.route("/readyz", methods=["GET"])
    def readyz(self, request: IRequest) -> Deferred:
        """Readiness: the token store and every hypervisor are reachable."""

        async def run() -> bytes:
            uris = [h.uri for h in self._config.hypervisors]
            body, status = await readiness(self._token_store, self._locator, uris, self._reactor)
            return json_answer(request, body, status)

        return Deferred.fromCoroutine(run())

    # -- share links (issue 9) -----------------------------------------------

    def _share_routes(self, vm_id: str) -> ShareRoutes:
        check_id(vm_id)
        if self._shares is None:
            raise ConsoleError(ErrorCode.NOT_FOUND, "Share links are not available on this server")
        return self._shares

    @app.route(VM_PATH + "/<string:vm_id>/console/shares", methods=["POST"])
    def share_create(self, request: IRequest, vm_id: str) -> Deferred:
        """A share link of C{vm_id}'s console (201)."""
        return self._answer(
            request, lambda: self._share_routes(vm_id).create(request, self._authenticate(request), vm_id), 201
        )

    @app.route(VM_PATH + "/<string:vm_id>/console/shares", methods=["GET"])
    def share_list(self, request: IRequest, vm_id: str) -> Deferred:
        """The live share links of C{vm_id} the caller may see."""
        return self._answer(request, lambda: self._share_routes(vm_id).list(self._authenticate(request), vm_id))

    @app.route(VM_PATH + "/<string:vm_id>/console/shares/<string:share_id>", methods=["DELETE"])
    def share_revoke(self, request: IRequest, vm_id: str, share_id: str) -> Deferred:
        """Revoke a share link, closing the consoles opened through it."""
        return self._answer(
            request, lambda: self._share_routes(vm_id).revoke(self._authenticate(request), vm_id, share_id)
        )

    # -- recordings (issue 10) -------------------------------------------------

    @app.route("/api/v1/console/recordings", methods=["GET"])
    def recordings_list(self, request: IRequest) -> Any:
        return self._recordings.list(request)

    @app.route("/api/v1/console/recordings/<string:recording_id>", methods=["GET"])
    def recording(self, request: IRequest, recording_id: str) -> Any:
        return self._recordings.one(request, recording_id)

    @app.route("/api/v1/console/recordings/<string:recording_id>", methods=["DELETE"])
    def recording_delete(self, request: IRequest, recording_id: str) -> Any:
        return self._recordings.delete(request, recording_id)

    @app.route("/api/v1/console/recordings/<string:recording_id>/data", methods=["GET"])
    def recording_data(self, request: IRequest, recording_id: str) -> Any:
        return self._recordings.data(request, recording_id)

    # -- pages and static files -------------------------------------------

    @app.route("/console/<string:vm_id>", methods=["GET"])
    def console_page(self, request: IRequest, vm_id: str) -> bytes:
        """
        The bundled console page; it picks noVNC or spice-html5 from the
        console info it fetches.
        """
        check_id(vm_id)
        return console_page_body(request)

    @app.route("/admin", methods=["GET"])
    def admin_page(self, request: IRequest) -> bytes:
        """The control room (its script asks the admin API with the key from the fragment)."""
        return page_body(request, ADMIN_PAGE)

    @app.route("/console/recordings/<string:recording_id>", methods=["GET"])
    def playback_page(self, request: IRequest, recording_id: str) -> bytes:
        """The page that plays a recording in the browser."""
        return page_body(request, PLAYBACK_PAGE)

    @app.route("/static/app/", branch=True, methods=["GET", "HEAD"])
    def static_app(self, request: IRequest) -> IResource:
        """The console page's own script and style (the package's C{static})."""
        return static_tree(STATIC_DIR)

    @app.route("/static/novnc/", branch=True, methods=["GET", "HEAD"])
    def static_novnc(self, request: IRequest) -> IResource:
        """The noVNC files."""
        return static_tree(self._static_dirs.get("novnc"))

    @app.route("/static/spice-html5/", branch=True, methods=["GET", "HEAD"])
    def static_spice(self, request: IRequest) -> IResource:
        """The spice-html5 files."""
        return static_tree(self._static_dirs.get("spice-html5"))

    # -- errors (L{vaporproxy.http.answers}) ---------------------------------

    @app.handle_errors(ConsoleError)
    def _console_error(self, request: IRequest, failure: Failure) -> bytes:
        return console_error_answer(request, failure)

    @app.handle_errors(NotFound)
    def _not_found(self, request: IRequest, failure: Failure) -> bytes:
        return not_found_answer(request)

    @app.handle_errors(MethodNotAllowed)
    def _method_not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        return method_not_allowed_answer(request, failure)

    @app.handle_errors(Exception)
    def _unexpected(self, request: IRequest, failure: Failure) -> Any:
        return unexpected_answer(request, failure)
