"""
Tests for L{vaporproxy.http.api}: the HTTP API, driven in memory with L{StubTreq}.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from typing import Any, Dict, List, Optional

from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IHostnameResolver
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.test.iosim import FakeTransport, connect
from twisted.web.server import Site
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from twisted.logger import globalLogPublisher
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from vaporproxy.http import api as web
from vaporproxy.http import site as web_site
from vaporproxy.timestamps import iso_utc
from vaporproxy.config import ApiKey, AuthConfig, Config, ConsoleConfig, HypervisorConfig, JWTConfig, StepUpPolicy
from vaporproxy.vm.hosts import HostPolicy
from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.interfaces import Graphics, VMConsoles
from vaporproxy.stores.limits import MemoryLimiter
from vaporproxy.metrics import Metrics
from vaporproxy.testing import FakeConsoleLocator
from vaporproxy.stores.tokens import MemoryTokenStore

BASE = "http://proxy.example"
VMS = "/api/v1/virtualization/virtualmachines"

ADMIN_KEY = "admin-key-7f3b0c2e9a"
USER_KEY = "user-key-51d2aa0e44"
WEB_KEY = "web-only-key-0c9d3e"
UUID_KEY = "uuid-only-key-b81f22"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


WEB_UUID = "6f1c2a4e-3b5d-4c8e-9a7f-0123456789ab"
DB_UUID = "0a9b8c7d-6e5f-4a3b-8c2d-1e0f9a8b7c6d"
BARE_UUID = "11111111-2222-4333-8444-555555555555"
GONE_UUID = "99999999-8888-4777-8666-555555555555"

WEB_VM = VMConsoles(
    uuid=WEB_UUID,
    name="web-1",
    running=True,
    graphics=(Graphics("vnc", 0, 5901, listen="127.0.0.1", password="vnc-secret-pw"),),
    hypervisor="fake:///",
)
DB_VM = VMConsoles(
    uuid=DB_UUID,
    name="db-1",
    running=True,
    graphics=(
        Graphics("vnc", 0, 5902, listen="127.0.0.1"),
        Graphics("spice", 0, 5930, listen="127.0.0.1", password="spice-pw"),
        Graphics("spice", 1, 5931, listen="127.0.0.1"),
    ),
    hypervisor="fake:///",
)
NAMED_VM = VMConsoles(
    uuid="22222222-3333-4444-8555-666666666666",
    name="named-1",
    running=True,
    graphics=(Graphics("vnc", 0, 5903, listen="console.internal"),),
    hypervisor="fake:///",
)
FAR_VM = VMConsoles(
    uuid="33333333-4444-4555-8666-777777777777",
    name="far-1",
    running=True,
    graphics=(Graphics("vnc", 0, 5904, listen="192.0.2.7"),),
    hypervisor="fake:///",
)
LOST_VM = VMConsoles(
    uuid="44444444-5555-4666-8777-888888888888",
    name="lost-1",
    running=True,
    graphics=(Graphics("vnc", 0, 5905, listen="nowhere.invalid"),),
    hypervisor="fake:///",
)
BARE_VM = VMConsoles(uuid=BARE_UUID, name="bare-1", running=True, graphics=(), hypervisor="fake:///")

#: 2024-01-15T10:25:00Z; tokens live 300 s, so they expire at 10:30:00Z.
NOW = 1705314300.0
EXPIRES = "2024-01-15T10:30:00Z"

KEYS = (
    ApiKey(user="root", sha256=sha(ADMIN_KEY), vms=("*",), admin=True),
    ApiKey(user="alice", sha256=sha(USER_KEY), vms=("*",)),
    ApiKey(user="webops", sha256=sha(WEB_KEY), vms=("web-*",)),
    ApiKey(user="dbops", sha256=sha(UUID_KEY), vms=(DB_UUID,)),
)

CONFIG = Config(
    console=ConsoleConfig(allowed_hosts=("127.0.0.1", "10.0.0.0/8")),
    auth=AuthConfig(api_keys=KEYS),
    hypervisors=(HypervisorConfig("fake:///"),),
)

INFO_FIELDS = {"type", "host", "port", "token", "ws_path", "expires_at", "tls_enabled", "password", "mode"}


def auth(key: str) -> Dict[str, List[str]]:
    return {"Authorization": [f"Bearer {key}"]}


@implementer(IHostnameResolver)
class FakeResolver:
    """
    An L{IHostnameResolver} over a fixed table of names.
    """

    def __init__(self, table: Dict[str, List[str]]):
        self.table = table

    def resolveHostName(self, receiver: Any, hostName: str, portNumber: int = 0, *args: Any, **kw: Any) -> Any:
        receiver.resolutionBegan(None)
        for address in self.table.get(hostName, []):
            receiver.addressResolved(IPv4Address("TCP", address, portNumber))
        receiver.resolutionComplete()
        return receiver


class FakeRecord:
    def __init__(self, console_id: str, vm_id: str, console_type: str, user: str, started_at: float):
        self.console_id = console_id
        self.vm_id = vm_id
        self.type = console_type
        self.user = user
        self.started_at = started_at

    def as_dict(self, now: float) -> Dict[str, Any]:
        return {
            "console_id": self.console_id,
            "vm_id": self.vm_id,
            "type": self.type,
            "user": self.user,
            "bytes_sent": 10,
            "bytes_received": 20,
            "started_at": iso_utc(self.started_at),
            "duration_s": now - self.started_at,
            "last_activity": iso_utc(now),
        }


class FakeRegistry:
    """
    The part of C{ConsoleRegistry} the API uses.
    """

    def __init__(self) -> None:
        self.records: List[FakeRecord] = []
        self.terminated: List[str] = []
        #: What each terminate_vm call told the browsers (the JSON error text).
        self.messages: List[Any] = []

    def consoles(self) -> List[FakeRecord]:
        return list(self.records)

    def terminate_vm(self, vm_uuid: str, message: Any = None) -> int:
        self.terminated.append(vm_uuid)
        self.messages.append(message)
        doomed = [r for r in self.records if r.vm_id == vm_uuid]
        self.records = [r for r in self.records if r.vm_id != vm_uuid]
        return len(doomed)


class Harness:
    """
    A L{ConsoleAPI} over memory backends, and a L{StubTreq} on it.
    """

    def __init__(self, config: Config = CONFIG, static_dirs: Optional[Dict[str, str]] = None, cluster: Any = None,
                 audit: Any = None, recordings: Any = None, shares: Any = None):  # fmt: skip
        self.clock = Clock()
        self.clock.advance(NOW)
        self.store = MemoryTokenStore(self.clock, config.console.token_ttl)
        self.locator = FakeConsoleLocator([WEB_VM, DB_VM, BARE_VM, NAMED_VM, FAR_VM, LOST_VM])
        self.limiter = MemoryLimiter(5, 100)
        self.hosts = HostPolicy(
            config.console.allowed_hosts, FakeResolver({"console.internal": ["10.1.2.3"]})
        )
        self.registry = FakeRegistry()
        self.metrics = Metrics(self.registry, self.store, self.clock)
        self.bridge_factory = object()
        self.api = web.ConsoleAPI(
            config=config,
            token_store=self.store,
            locator=self.locator,
            limiter=self.limiter,
            host_policy=self.hosts,
            registry=self.registry,
            bridge_factory=self.bridge_factory,
            metrics=self.metrics,
            reactor=self.clock,
            static_dirs=static_dirs or {},
            cluster=cluster,
            audit=audit,
            recordings=recordings,
            shares=shares,
        )
        self.treq = StubTreq(self.api.resource())


class APITestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.events: List[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def request(self, method: str, path: str, key: Optional[str] = None, **kw: Any) -> Any:
        headers = kw.pop("headers", {})
        if key is not None:
            headers.update(auth(key))
        d = self.h.treq.request(method, BASE + path, headers=headers, **kw)
        self.h.treq.flush()
        for _ in range(10):
            if not [c for c in self.h.clock.getDelayedCalls() if c.getTime() <= self.h.clock.seconds()]:
                break
            self.h.clock.advance(0)
            self.h.treq.flush()
        response = self.successResultOf(d)
        body = self.successResultOf(response.content())
        return response, body

    def json_request(self, method: str, path: str, key: Optional[str] = None, **kw: Any) -> Any:
        response, body = self.request(method, path, key, **kw)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        return response, json.loads(body)

    def assertError(self, response: Any, body: dict, status: int, code: ErrorCode) -> None:
        self.assertEqual(response.code, status)
        self.assertEqual(set(body), {"type", "code", "error"})
        self.assertEqual(body["type"], "error")
        self.assertEqual(body["code"], code.name)

    def logged_text(self) -> str:
        from twisted.logger import formatEvent

        return "\n".join(formatEvent(e) + " " + repr(e) for e in self.events)


class ConsoleInfoTests(APITestCase):
    def test_fields(self) -> None:
        """When a console is asked for, the answer has exactly the documented fields and values."""
        response, body = self.json_request("GET", f"{VMS}/web-1/console", USER_KEY)
        self.assertEqual(response.code, 200)
        self.assertEqual(set(body), INFO_FIELDS)
        self.assertEqual(body["type"], "vnc")
        self.assertEqual(body["host"], "127.0.0.1")
        self.assertEqual(body["port"], 5901)
        self.assertRegex(body["token"], r"^[0-9a-f]{64}$")
        self.assertEqual(body["ws_path"], f"{VMS}/web-1/console/ws")
        self.assertEqual(body["expires_at"], EXPIRES)
        self.assertIs(body["tls_enabled"], False)
        self.assertEqual(body["password"], "********")
        self.assertEqual(response.headers.getRawHeaders("cache-control"), ["no-store"])

    def test_token_is_bound(self) -> None:
        """When a token is issued, it redeems for that VM with the issuing user and console."""
        _, body = self.json_request("GET", f"{VMS}/web-1/console", USER_KEY)
        redemption = self.successResultOf(self.h.store.redeem(body["token"], "web-1", None))
        grant = redemption.grant
        self.assertTrue(redemption.first)
        self.assertEqual(
            (grant.vm_ref, grant.vm_uuid, grant.console_type, grant.display, grant.user, grant.client_ip),
            ("web-1", WEB_UUID, "vnc", 0, "alice", None),
        )

    def test_by_uuid(self) -> None:
        """When the VM is named by its UUID, the ws_path uses the UUID and the grant the same VM."""
        _, body = self.json_request("GET", f"{VMS}/{WEB_UUID}/console", USER_KEY)
        self.assertEqual(body["ws_path"], f"{VMS}/{WEB_UUID}/console/ws")
        redemption = self.successResultOf(self.h.store.redeem(body["token"], WEB_UUID, None))
        self.assertEqual(redemption.grant.vm_uuid, WEB_UUID)

    def test_no_password(self) -> None:
        """When the console has no password, password is null."""
        _, body = self.json_request("GET", f"{VMS}/db-1/console?type=vnc", USER_KEY)
        self.assertEqual((body["type"], body["port"]), ("vnc", 5902))
        self.assertIsNone(body["password"])

    def test_type_and_display(self) -> None:
        """When type and display are given, that graphics device is the one issued."""
        _, body = self.json_request("GET", f"{VMS}/db-1/console?type=spice&display=1", USER_KEY)
        self.assertEqual((body["type"], body["port"], body["password"]), ("spice", 5931, None))
        grant = self.successResultOf(self.h.store.redeem(body["token"], "db-1", None)).grant
        self.assertEqual((grant.console_type, grant.display), ("spice", 1))

    def test_spice_password_masked(self) -> None:
        """When the SPICE console has a password, only the mask is answered."""
        response, body = self.request("GET", f"{VMS}/db-1/console?type=spice", USER_KEY)
        self.assertEqual(json.loads(body)["password"], "********")
        self.assertNotIn(b"spice-pw", body)

    def test_bad_type(self) -> None:
        """When type is neither vnc nor spice, the answer is 400 BAD_REQUEST."""
        response, body = self.json_request("GET", f"{VMS}/web-1/console?type=rdp", USER_KEY)
        self.assertError(response, body, 400, ErrorCode.BAD_REQUEST)

    def test_bad_display(self) -> None:
        """When display is not a non-negative integer, the answer is 400 BAD_REQUEST."""
        for display in ("-1", "x", "1.5", ""):
            response, body = self.json_request("GET", f"{VMS}/web-1/console?display={display}", USER_KEY)
            self.assertError(response, body, 400, ErrorCode.BAD_REQUEST)
        self.assertEqual(self.successResultOf(self.h.store.count()), 0)

    def test_repeated_parameter(self) -> None:
        """When a parameter is given twice, the answer is 400 BAD_REQUEST."""
        response, body = self.json_request("GET", f"{VMS}/db-1/console?type=vnc&type=spice", USER_KEY)
        self.assertError(response, body, 400, ErrorCode.BAD_REQUEST)

    def test_no_console(self) -> None:
        """When the VM has no graphics device, the answer is 409 NO_CONSOLE_AVAILABLE."""
        response, body = self.json_request("GET", f"{VMS}/bare-1/console", USER_KEY)
        self.assertError(response, body, 409, ErrorCode.NO_CONSOLE_AVAILABLE)

    def test_missing_type(self) -> None:
        """When the VM has no console of the asked type, no token is issued."""
        response, body = self.json_request("GET", f"{VMS}/web-1/console?type=spice", USER_KEY)
        self.assertIn(response.code, (400, 409))
        self.assertEqual(self.successResultOf(self.h.store.count()), 0)

    def test_vm_not_found(self) -> None:
        """When no hypervisor knows the VM, the answer is 404 VM_NOT_FOUND."""
        response, body = self.json_request("GET", f"{VMS}/nope/console", USER_KEY)
        self.assertError(response, body, 404, ErrorCode.VM_NOT_FOUND)

    def test_vm_not_found_outside_reach(self) -> None:
        """When a restricted key asks for an unknown VM outside its patterns, the answer is 403, not 404."""
        response, body = self.json_request("GET", f"{VMS}/nope/console", WEB_KEY)
        self.assertError(response, body, 403, ErrorCode.UNAUTHORIZED)

    def test_hypervisor_down(self) -> None:
        """When the hypervisor cannot be reached, the answer is 500 INTERNAL_ERROR with a safe message."""
        self.h.locator.broken = "connection refused"
        response, body = self.json_request("GET", f"{VMS}/web-1/console", USER_KEY)
        self.assertError(response, body, 500, ErrorCode.INTERNAL_ERROR)
        self.assertNotIn("refused", body["error"])

    def test_host_resolved(self) -> None:
        """When the console listens on a host name, host is the checked address the proxy will dial."""
        response, body = self.json_request("GET", f"{VMS}/named-1/console", USER_KEY)
        self.assertEqual((response.code, body["host"], body["port"]), (200, "10.1.2.3", 5903))

    def test_host_not_allowed(self) -> None:
        """When the console host is not allowed, the answer is 403 and no token is issued."""
        response, body = self.json_request("GET", f"{VMS}/far-1/console", USER_KEY)
        self.assertError(response, body, 403, ErrorCode.UNAUTHORIZED)
        self.assertIsNone(response.headers.getRawHeaders("www-authenticate"))
        self.assertNotIn("192.0.2.7", body["error"])
        self.assertEqual(self.successResultOf(self.h.store.count()), 0)

    def test_host_unresolvable(self) -> None:
        """When the console host does not resolve, the answer is 502 CONNECTION_FAILED."""
        response, body = self.json_request("GET", f"{VMS}/lost-1/console", USER_KEY)
        self.assertError(response, body, 502, ErrorCode.CONNECTION_FAILED)
        self.assertNotIn("nowhere", body["error"])

    def test_store_unavailable(self) -> None:
        """When the token store cannot issue, the answer is 503 SERVICE_UNAVAILABLE."""
        self.patch(self.h.store, "issue", lambda grant: fail(ConsoleError(ErrorCode.SERVICE_UNAVAILABLE)))
        response, body = self.json_request("GET", f"{VMS}/web-1/console", USER_KEY)
        self.assertError(response, body, 503, ErrorCode.SERVICE_UNAVAILABLE)

    def test_unexpected_error(self) -> None:
        """When a collaborator raises unexpectedly, the answer is 500 without a traceback, which is logged."""

        def explode(vm_ref: str) -> Deferred:
            raise ZeroDivisionError("internal-host.example secret detail")

        self.patch(self.h.locator, "locate", explode)
        response, raw = self.request("GET", f"{VMS}/web-1/console", USER_KEY)
        body = json.loads(raw)
        self.assertError(response, body, 500, ErrorCode.INTERNAL_ERROR)
        self.assertNotIn(b"internal-host", raw)
        self.assertNotIn(b"Traceback", raw)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_bind_client_ip(self) -> None:
        """When bind_client_ip is on, the token is bound to the caller's address."""
        config = replace(CONFIG, console=replace(CONFIG.console, bind_client_ip=True))
        self.h.api.reload(config)
        _, body = self.json_request("GET", f"{VMS}/web-1/console", USER_KEY)
        grant = self.successResultOf(self.h.store.redeem(body["token"], "web-1", "127.0.0.1")).grant
        self.assertEqual(grant.client_ip, "127.0.0.1")

    def test_bind_client_ip_behind_proxy(self) -> None:
        """When a trusted proxy forwards the request, the token is bound to the forwarded client address."""
        config = replace(
            CONFIG,
            console=replace(CONFIG.console, bind_client_ip=True),
            server=replace(CONFIG.server, trusted_proxies=("127.0.0.1",)),
        )
        self.h.api.reload(config)
        _, body = self.json_request(
            "GET", f"{VMS}/web-1/console", USER_KEY, headers={"X-Forwarded-For": ["198.51.100.7"]}
        )
        grant = self.successResultOf(self.h.store.redeem(body["token"], "web-1", "198.51.100.7")).grant
        self.assertEqual(grant.client_ip, "198.51.100.7")

    def test_tls_flag_reload(self) -> None:
        """When the configuration is reloaded with TLS on, tls_enabled follows."""
        self.h.api.reload(replace(CONFIG, console=replace(CONFIG.console, enable_tls=True)))
        _, body = self.json_request("GET", f"{VMS}/web-1/console", USER_KEY)
        self.assertIs(body["tls_enabled"], True)

    def test_token_not_logged(self) -> None:
        """When a token is issued, the log carries its short hash and never the token."""
        _, body = self.json_request("GET", f"{VMS}/web-1/console", USER_KEY)
        text = self.logged_text()
        self.assertNotIn(body["token"], text)
        self.assertIn(sha(body["token"])[:12], text)
        self.assertNotIn("vnc-secret-pw", text)

    def test_token_counted(self) -> None:
        """When a token is issued, the metrics count it."""
        self.json_request("GET", f"{VMS}/web-1/console", USER_KEY)
        text = self.successResultOf(self.h.metrics.render()).decode()
        self.assertIn("vaporproxy_tokens_issued_total 1.0", text)
        self.assertIn("vaporproxy_tokens_outstanding 1.0", text)

    def test_expires_at_follows_clock(self) -> None:
        """When time has moved on, expires_at is the store's expiry from the clock."""
        self.h.clock.advance(3600 + 0.75)
        _, body = self.json_request("GET", f"{VMS}/web-1/console", USER_KEY)
        self.assertEqual(body["expires_at"], "2024-01-15T11:30:00Z")


class AuthTests(APITestCase):
    def test_missing(self) -> None:
        """When no Authorization header is sent, the answer is 401 with a Bearer challenge."""
        response, body = self.json_request("GET", f"{VMS}/web-1/console")
        self.assertError(response, body, 401, ErrorCode.UNAUTHORIZED)
        self.assertTrue(response.headers.getRawHeaders("www-authenticate")[0].startswith("Bearer"))

    def test_unknown_key(self) -> None:
        """When the key is unknown, the answer is 401."""
        response, body = self.json_request("GET", f"{VMS}/web-1/console", "not-a-key")
        self.assertError(response, body, 401, ErrorCode.UNAUTHORIZED)

    def test_hash_is_not_a_key(self) -> None:
        """When the stored SHA-256 itself is presented, the answer is 401."""
        response, body = self.json_request("GET", f"{VMS}/web-1/console", sha(USER_KEY))
        self.assertError(response, body, 401, ErrorCode.UNAUTHORIZED)

    def test_other_scheme(self) -> None:
        """When the Authorization header is not Bearer, the answer is 401."""
        response, body = self.json_request(
            "GET", f"{VMS}/web-1/console", headers={"Authorization": [f"Basic {USER_KEY}"]}
        )
        self.assertError(response, body, 401, ErrorCode.UNAUTHORIZED)

    def test_name_pattern(self) -> None:
        """When a key's pattern matches the VM name, it may open the console by name or UUID."""
        for ref in ("web-1", WEB_UUID):
            response, body = self.json_request("GET", f"{VMS}/{ref}/console", WEB_KEY)
            self.assertEqual(response.code, 200)

    def test_uuid_pattern(self) -> None:
        """When a key's pattern matches the VM UUID, it may open the console by name."""
        response, body = self.json_request("GET", f"{VMS}/db-1/console", UUID_KEY)
        self.assertEqual(response.code, 200)

    def test_vm_not_allowed(self) -> None:
        """When a known key may not reach the VM, the answer is 403 and no token is issued."""
        response, body = self.json_request("GET", f"{VMS}/db-1/console", WEB_KEY)
        self.assertError(response, body, 403, ErrorCode.UNAUTHORIZED)
        self.assertEqual(self.successResultOf(self.h.store.count()), 0)

    def test_reload_keys(self) -> None:
        """When the keys are reloaded, a removed key is refused and a new one accepted."""
        new_key = ApiKey(user="bob", sha256=sha("bob-new-key-0001"))
        self.h.api.reload(replace(CONFIG, auth=AuthConfig(api_keys=(new_key,))))
        response, _ = self.json_request("GET", f"{VMS}/web-1/console", USER_KEY)
        self.assertEqual(response.code, 401)
        response, _ = self.json_request("GET", f"{VMS}/web-1/console", "bob-new-key-0001")
        self.assertEqual(response.code, 200)

    def test_keys_not_logged(self) -> None:
        """When a request is refused, the presented key is not logged."""
        self.json_request("GET", f"{VMS}/web-1/console", "wrong-key-xyz")
        self.json_request("GET", f"{VMS}/db-1/console", WEB_KEY)
        text = self.logged_text()
        self.assertNotIn("wrong-key-xyz", text)
        self.assertNotIn(WEB_KEY, text)


class RoutingTests(APITestCase):
    def test_unknown_route(self) -> None:
        """When the path matches no route, the answer is a JSON 404."""
        response, body = self.json_request("GET", "/nothing/here", USER_KEY)
        self.assertEqual(response.code, 404)
        self.assertEqual(body["type"], "error")
        self.assertEqual(body["code"], "NOT_FOUND")

    def test_wrong_method(self) -> None:
        """When the method is not allowed on a route, the answer is a JSON 405 with Allow."""
        response, body = self.json_request("POST", f"{VMS}/web-1/console", USER_KEY)
        self.assertEqual(response.code, 405)
        self.assertEqual(body["type"], "error")
        self.assertEqual(body["code"], "METHOD_NOT_ALLOWED")
        self.assertIn("GET", response.headers.getRawHeaders("allow")[0])

    def test_websocket_route(self) -> None:
        """When the WebSocket path is routed, the bridge factory is mounted in a WebSocketResource."""
        from autobahn.twisted.resource import WebSocketResource

        resource = self.h.api.console_ws(None, "web-1")
        self.assertIsInstance(resource, WebSocketResource)
        self.assertIs(resource._factory, self.h.bridge_factory)


class EchoServer(WebSocketServerProtocol):
    def onConnect(self, request: Any) -> None:
        self.factory.seen.append(("connect", request.path, request.params))

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.sendMessage(payload, isBinary)


class RecordingClient(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.sendMessage(b"\x00RFB", True)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.seen.append(("message", payload, isBinary))


class WebSocketRouteTests(SynchronousTestCase):
    def test_handshake_in_memory(self) -> None:
        """When a WebSocket client opens the ws path, the bridge factory's protocol gets the upgrade and the query."""
        reactor = MemoryReactorClock()
        server_factory = WebSocketServerFactory("ws://proxy.example", reactor=reactor)
        server_factory.protocol = EchoServer
        server_factory.seen = []
        h = Harness()
        h.api._bridge_factory = server_factory
        site = Site(h.api.resource(), reactor=reactor)
        client_factory = WebSocketClientFactory(
            f"ws://proxy.example{VMS}/web-1/console/ws?token=t0k", reactor=reactor
        )
        client_factory.protocol = RecordingClient
        client_factory.seen = []
        server = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8080))
        client = client_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8080))
        pump = connect(
            server,
            FakeTransport(server, isServer=True, peerAddress=IPv4Address("TCP", "127.0.0.1", 40000)),
            client,
            FakeTransport(client, isServer=False),
        )
        for _ in range(4):
            pump.flush()
        self.assertEqual(server_factory.seen, [("connect", f"{VMS}/web-1/console/ws", {"token": ["t0k"]})])
        self.assertEqual(client_factory.seen, [("message", b"\x00RFB", True)])


class FastWebSocketRouteTests(APITestCase):
    """
    Tests for the direct route of console WebSocket upgrades past Klein.
    """

    def test_sameAnswerAsKlein(self) -> None:
        """
        When the ws path is asked with GET (direct route) or with a
        percent-escape (through Klein), the answer is the same as Klein's
        own route gives: here the bridge factory fails, a JSON 500.
        """
        answers = []
        for treq, path in (
            (self.h.treq, f"{VMS}/web-1/console/ws"),
            (self.h.treq, f"{VMS}/web%2D1/console/ws"),
            (StubTreq(self.h.api.app.resource()), f"{VMS}/web-1/console/ws"),
        ):
            self.h.treq = treq
            response, body = self.json_request("GET", path + "?token=x")
            answers.append((response.code, body))
        self.assertEqual(answers, [(500, ConsoleError(ErrorCode.INTERNAL_ERROR).to_dict())] * 3)
        self.flushLoggedErrors(AttributeError)

    def test_otherMethodsGoThroughKlein(self) -> None:
        """
        When the ws path is asked with POST, Klein answers 405 as before.
        """
        response, body = self.json_request("POST", f"{VMS}/web-1/console/ws")
        self.assertError(response, body, 405, ErrorCode.METHOD_NOT_ALLOWED)

    def test_deeperPathNotFound(self) -> None:
        """
        When a path only starts like the ws path, Klein answers 404.
        """
        response, body = self.json_request("GET", f"{VMS}/web-1/console/ws/more")
        self.assertError(response, body, 404, ErrorCode.NOT_FOUND)


class FastInfoRouteTests(APITestCase):
    """
    Tests for the direct route of console-info requests past Klein: the
    same answers as Klein's route, errors included.
    """

    #: Headers that frame the body (the direct route sends a
    #: Content-Length, Klein chunks) or vary with the moment.
    FRAMING = {b"content-length", b"transfer-encoding", b"date"}

    def answer(self, through_klein: bool, path: str, key: Optional[str], setup: Any = None) -> Any:
        """
        Status, headers (without framing) and body of one request on a
        fresh harness, the token in the body replaced by a placeholder.
        """
        self.h = Harness()
        if setup is not None:
            setup(self.h)
        if through_klein:
            self.h.treq = StubTreq(self.h.api.app.resource())
        response, raw = self.request("GET", path, key)
        headers = sorted(
            (name.lower(), tuple(values))
            for name, values in response.headers.getAllRawHeaders()
            if name.lower() not in self.FRAMING
        )
        body = json.loads(raw)
        if "token" in body:
            self.assertRegex(body["token"], r"^[0-9a-f]{64}$")
            body["token"] = "T"
        return response.code, headers, body

    def assertSameAnswer(self, path: str, key: Optional[str], status: int, setup: Any = None) -> None:
        direct = self.answer(False, path, key, setup)
        klein = self.answer(True, path, key, setup)
        self.assertEqual(direct, klein)
        self.assertEqual(direct[0], status)

    def test_directRouteSkipsKlein(self) -> None:
        """When console info is asked with GET and a plain VM id, Klein is not involved."""

        class NoKlein:
            def render(self, request: Any) -> None:
                raise AssertionError("went through Klein")

        self.h.treq = StubTreq(web.Root(self.h.api, NoKlein()))
        response, body = self.json_request("GET", f"{VMS}/web-1/console", USER_KEY)
        self.assertEqual((response.code, body["type"]), (200, "vnc"))
        self.assertEqual(response.length, len(json.dumps(body)))

    def test_success(self) -> None:
        """When a token is issued, both routes give the same answer."""
        self.assertSameAnswer(f"{VMS}/web-1/console", USER_KEY, 200)
        self.assertSameAnswer(f"{VMS}/db-1/console?type=spice&display=1", USER_KEY, 200)
        self.assertSameAnswer(f"{VMS}/{WEB_UUID}/console", WEB_KEY, 200)

    def test_authErrors(self) -> None:
        """When the key is missing, unknown, not Bearer or not allowed, both routes give the same error."""
        self.assertSameAnswer(f"{VMS}/web-1/console", None, 401)
        self.assertSameAnswer(f"{VMS}/web-1/console", "wrong-key", 401)
        self.assertSameAnswer(f"{VMS}/db-1/console", WEB_KEY, 403)
        self.assertSameAnswer(f"{VMS}/nope/console", WEB_KEY, 403)

    def test_requestErrors(self) -> None:
        """When parameters are bad or the VM has no such console, both routes give the same error."""
        self.assertSameAnswer(f"{VMS}/web-1/console?type=rdp", USER_KEY, 400)
        self.assertSameAnswer(f"{VMS}/web-1/console?display=x", USER_KEY, 400)
        self.assertSameAnswer(f"{VMS}/db-1/console?type=vnc&type=spice", USER_KEY, 400)
        self.assertSameAnswer(f"{VMS}/bare-1/console", USER_KEY, 409)
        self.assertSameAnswer(f"{VMS}/nope/console", USER_KEY, 404)

    def test_backendErrors(self) -> None:
        """When the host, hypervisor or token store fails, both routes give the same error."""

        def down(h: Harness) -> None:
            h.locator.broken = "connection refused"

        def store(h: Harness) -> None:
            h.store.issue = lambda grant: fail(ConsoleError(ErrorCode.SERVICE_UNAVAILABLE))

        self.assertSameAnswer(f"{VMS}/far-1/console", USER_KEY, 403)
        self.assertSameAnswer(f"{VMS}/lost-1/console", USER_KEY, 502)
        self.assertSameAnswer(f"{VMS}/web-1/console", USER_KEY, 500, down)
        self.assertSameAnswer(f"{VMS}/web-1/console", USER_KEY, 503, store)

    def test_unexpectedError(self) -> None:
        """When a collaborator raises unexpectedly, both routes answer the same 500 and log it."""

        def explode(h: Harness) -> None:
            def locate(vm_ref: str) -> Deferred:
                raise ZeroDivisionError("secret detail")

            h.locator.locate = locate

        self.assertSameAnswer(f"{VMS}/web-1/console", USER_KEY, 500, explode)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 2)

    def test_answerLater(self) -> None:
        """When the VM is found later, the direct route answers then, with a Content-Length."""
        pending: List[Deferred] = []
        real = self.h.locator.locate
        self.h.locator.locate = lambda vm_ref: pending.append(Deferred()) or pending[-1]
        d = self.h.treq.request("GET", BASE + f"{VMS}/web-1/console", headers=auth(USER_KEY))
        self.h.treq.flush()
        self.assertNoResult(d)
        pending[0].callback(self.successResultOf(real("web-1")))
        self.h.treq.flush()
        response = self.successResultOf(d)
        body = json.loads(self.successResultOf(response.content()))
        self.assertEqual((response.code, body["type"]), (200, "vnc"))
        self.assertEqual(response.length, len(json.dumps(body)))

    def test_errorLater(self) -> None:
        """When the lookup fails later, the direct route answers the JSON error then."""
        pending: List[Deferred] = []
        self.h.locator.locate = lambda vm_ref: pending.append(Deferred()) or pending[-1]
        d = self.h.treq.request("GET", BASE + f"{VMS}/web-1/console", headers=auth(USER_KEY))
        self.h.treq.flush()
        pending[0].errback(ConsoleError(ErrorCode.SERVICE_UNAVAILABLE))
        self.h.treq.flush()
        response = self.successResultOf(d)
        body = json.loads(self.successResultOf(response.content()))
        self.assertError(response, body, 503, ErrorCode.SERVICE_UNAVAILABLE)

    def test_clientGoneCancels(self) -> None:
        """When the client goes away before the answer, the pending lookup is cancelled and nothing is issued."""
        from twisted.web.test.requesthelper import DummyRequest

        pending: List[Deferred] = []
        self.h.locator.locate = lambda vm_ref: pending.append(Deferred()) or pending[-1]
        request = DummyRequest([])
        request.method = b"GET"
        request.path = f"{VMS}/web-1/console".encode()
        request.requestHeaders.setRawHeaders(b"authorization", [f"Bearer {USER_KEY}".encode()])
        result = self.h.api.resource().render(request)
        from twisted.web.server import NOT_DONE_YET

        self.assertIs(result, NOT_DONE_YET)
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        request.processingFailed(Failure(ConnectionDone()))
        self.assertTrue(pending[0].called)  # cancelled (the handler consumed the CancelledError)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(request.written, [])
        self.assertEqual(self.successResultOf(self.h.store.count()), 0)

    def test_escapedIdGoesThroughKlein(self) -> None:
        """When the VM id has a percent-escape, Klein decodes and answers it as before."""
        response, body = self.json_request("GET", f"{VMS}/web%2D1/console", USER_KEY)
        self.assertEqual((response.code, body["ws_path"]), (200, f"{VMS}/web-1/console/ws"))


class ConsoleSiteTests(SynchronousTestCase):
    """
    Tests for L{web_site.ConsoleSite}'s access-log switch.
    """

    def test_accessLogSwitch(self) -> None:
        """When access_log is on a finished request is logged in combined format; off, nothing is written."""
        from io import BytesIO

        from twisted.web.test.requesthelper import DummyRequest

        site = web_site.ConsoleSite(web_site.NOT_FOUND)
        written = BytesIO()
        site.logFile = written  # type: ignore[assignment]
        site._logDateTime = "[01/Jan/2024:00:00:00 +0000]"
        request = DummyRequest([b"healthz"])
        request.method, request.uri, request.clientproto, request.code = b"GET", b"/healthz", b"HTTP/1.1", 200
        request.sentLength = 15
        site.log(request)
        site._logFile.flush()
        self.assertIn(b'"GET /healthz HTTP/1.1" 200 15', written.getvalue())
        site.access_log = False
        before = written.getvalue()
        site.log(request)
        site._logFile.flush()
        self.assertEqual(written.getvalue(), before)

    def test_accessLogEvents(self) -> None:
        """
        When the site writes to the global log (no log file of its own),
        every finished request is one info event of the
        C{vaporproxy.access} namespace whose text is the combined-format
        line, tokens redacted; with access_log off there is none.
        """
        from twisted.logger import LogLevel, capturedLogs, formatEvent
        from twisted.python import log as legacy_log
        from twisted.web.test.requesthelper import DummyRequest

        token = "cd" * 32
        site = web_site.ConsoleSite(web_site.NOT_FOUND)
        site._logFile = legacy_log.logfile
        site._logDateTime = "[01/Jan/2024:00:00:00 +0000]"
        request = DummyRequest([b"ws"])
        request.method, request.clientproto, request.code = b"GET", b"HTTP/1.1", 200
        request.uri = f"{VMS}/web-1/console/ws?token={token}".encode()
        request.sentLength = 7
        plain = DummyRequest([b"healthz"])
        plain.method, plain.uri, plain.clientproto, plain.code = b"GET", b"/healthz", b"HTTP/1.1", 200
        plain.sentLength = 15
        with capturedLogs() as events:
            site.log(request)
            site.log(plain)
            site.access_log = False
            site.log(plain)
        self.assertEqual(
            [(e["log_namespace"], e["log_level"]) for e in events],
            [("vaporproxy.access", LogLevel.info)] * 2,
        )
        first, second = (formatEvent(e) for e in events)
        self.assertNotIn(token, first)
        self.assertIn('"GET /api/v1/virtualization/virtualmachines/web-1/console/ws?token=<redacted> HTTP/1.1" 200 7', first)
        self.assertEqual(second, '"-" - - [01/Jan/2024:00:00:00 +0000] "GET /healthz HTTP/1.1" 200 15 "-" "-"')

    def test_tokenRedacted(self) -> None:
        """When a request carries a token in its query, the access log line has it redacted."""
        from io import BytesIO

        from twisted.web.test.requesthelper import DummyRequest

        token = "ab" * 32
        site = web_site.ConsoleSite(web_site.NOT_FOUND)
        written = BytesIO()
        site.logFile = written  # type: ignore[assignment]
        site._logDateTime = "[01/Jan/2024:00:00:00 +0000]"
        request = DummyRequest([b"ws"])
        request.method, request.clientproto, request.code = b"GET", b"HTTP/1.1", 400
        request.uri = f"{VMS}/web-1/console/ws?a=1&TOKEN={token}&b=2".encode()
        request.sentLength = 10
        site.log(request)
        site._logFile.flush()
        line = written.getvalue()
        self.assertNotIn(token.encode(), line)
        self.assertIn(b"/console/ws?a=1&TOKEN=<redacted>&b=2 HTTP/1.1", line)

    def test_tokenRedactedWhateverItsSpelling(self) -> None:
        """When the token parameter's name is percent- or case-encoded, every such value is redacted and the rest of the line kept."""
        from twisted.web.test.requesthelper import DummyRequest

        secrets = [f"{n}" * 40 for n in "abcdef"]
        query = (
            f"%74oken={secrets[0]}&a=1&TOKEN={secrets[1]}&to%6Ben={secrets[2]}"
            f"&%54%4F%4B%45%4E={secrets[3]}&b=x%20y&token={secrets[4]}&+token={secrets[5]}"
            "&tokens=kept&tok=kept&token"
        )
        request = DummyRequest([b"ws"])
        request.method, request.clientproto, request.code = b"GET", b"HTTP/1.1", 400
        request.uri = f"{VMS}/web-1/console/ws?{query}#frag".encode()
        request.sentLength = 10
        line = web_site.redacting_log_formatter("[01/Jan/2024:00:00:00 +0000]", request)
        for secret in secrets[:5]:
            self.assertNotIn(secret, line)
        self.assertIn(
            "/console/ws?%74oken=<redacted>&a=1&TOKEN=<redacted>&to%6Ben=<redacted>"
            "&%54%4F%4B%45%4E=<redacted>&b=x%20y&token=<redacted>"
            f"&+token={secrets[5]}&tokens=kept&tok=kept&token#frag HTTP/1.1",
            line,
        )

    def test_redactionLeavesQuerylessUriAlone(self) -> None:
        """When a request has no query, its URI is logged unchanged."""
        from twisted.web.test.requesthelper import DummyRequest

        request = DummyRequest([b"healthz"])
        request.method, request.clientproto, request.code = b"GET", b"HTTP/1.1", 200
        request.uri = b"/healthz"
        request.sentLength = 15
        line = web_site.redacting_log_formatter("[01/Jan/2024:00:00:00 +0000]", request)
        self.assertIn('"GET /healthz HTTP/1.1" 200 15', line)


class StatsTests(APITestCase):
    def test_shape(self) -> None:
        """When an admin asks for stats, the answer has the totals, the per-VM counts and each console."""
        self.json_request("GET", f"{VMS}/web-1/console", USER_KEY)
        self.successResultOf(self.h.limiter.acquire(WEB_UUID, "c1"))
        self.h.registry.records.append(FakeRecord("c1", WEB_UUID, "vnc", "alice", NOW - 60))
        self.h.clock.advance(30)
        response, body = self.json_request("GET", "/api/v1/console/stats", ADMIN_KEY)
        self.assertEqual(response.code, 200)
        self.assertEqual(
            set(body), {"total_connections", "total_tokens", "connections_per_vm", "connections"}
        )
        self.assertEqual(body["total_connections"], 1)
        self.assertEqual(body["total_tokens"], 1)
        self.assertEqual(body["connections_per_vm"], {WEB_UUID: 1})
        self.assertEqual(len(body["connections"]), 1)
        self.assertEqual(body["connections"][0]["duration_s"], 90)
        self.assertEqual(body["connections"][0]["vm_id"], WEB_UUID)

    def test_not_admin(self) -> None:
        """When a non-admin key asks for stats, the answer is 403."""
        response, body = self.json_request("GET", "/api/v1/console/stats", USER_KEY)
        self.assertError(response, body, 403, ErrorCode.UNAUTHORIZED)

    def test_anonymous(self) -> None:
        """When no key is given for stats, the answer is 401."""
        response, body = self.json_request("GET", "/api/v1/console/stats")
        self.assertError(response, body, 401, ErrorCode.UNAUTHORIZED)


class DeleteSessionsTests(APITestCase):
    def setUp(self) -> None:
        super().setUp()
        self.h.registry.records += [
            FakeRecord("c1", WEB_UUID, "vnc", "alice", NOW),
            FakeRecord("c2", WEB_UUID, "vnc", "bob", NOW),
            FakeRecord("c3", DB_UUID, "spice", "alice", NOW),
        ]

    def test_by_name(self) -> None:
        """When an admin deletes a VM's sessions by name, its consoles are terminated and counted."""
        response, body = self.json_request("DELETE", f"{VMS}/web-1/console/sessions", ADMIN_KEY)
        self.assertEqual(response.code, 200)
        self.assertEqual(body, {"terminated": 2})
        self.assertEqual(self.h.registry.terminated, [WEB_UUID])
        self.assertEqual(self.h.registry.messages, ["Console ended by an administrator"])
        self.assertEqual([r.console_id for r in self.h.registry.records], ["c3"])

    def test_gone_vm_by_uuid(self) -> None:
        """When the VM no longer exists, its UUID is still accepted."""
        self.h.registry.records.append(FakeRecord("c4", GONE_UUID, "vnc", "alice", NOW))
        response, body = self.json_request("DELETE", f"{VMS}/{GONE_UUID.upper()}/console/sessions", ADMIN_KEY)
        self.assertEqual(body, {"terminated": 1})
        self.assertEqual(self.h.registry.terminated, [GONE_UUID])

    def test_gone_vm_by_uuid_without_dashes(self) -> None:
        """When a gone VM's UUID is given without dashes and in upper case, its consoles are matched by the canonical UUID."""
        self.h.registry.records.append(FakeRecord("c4", GONE_UUID, "vnc", "alice", NOW))
        plain = GONE_UUID.replace("-", "").upper()
        response, body = self.json_request("DELETE", f"{VMS}/{plain}/console/sessions", ADMIN_KEY)
        self.assertEqual((response.code, body), (200, {"terminated": 1}))
        self.assertEqual(self.h.registry.terminated, [GONE_UUID])

    def test_gone_vm_by_name(self) -> None:
        """When an unknown name is given, the answer is 404 VM_NOT_FOUND."""
        response, body = self.json_request("DELETE", f"{VMS}/gone-1/console/sessions", ADMIN_KEY)
        self.assertError(response, body, 404, ErrorCode.VM_NOT_FOUND)
        self.assertEqual(self.h.registry.terminated, [])

    def test_not_admin(self) -> None:
        """When a non-admin key deletes sessions, the answer is 403 and nothing is closed."""
        response, body = self.json_request("DELETE", f"{VMS}/web-1/console/sessions", USER_KEY)
        self.assertError(response, body, 403, ErrorCode.UNAUTHORIZED)
        self.assertEqual(len(self.h.registry.records), 3)


class MetricsRouteTests(APITestCase):
    def test_loopback_without_key_refused(self) -> None:
        """When a loopback client asks without a key and server.metrics_local is off (the default), the answer is 401."""
        response, body = self.json_request("GET", "/metrics")
        self.assertError(response, body, 401, ErrorCode.UNAUTHORIZED)

    def test_loopback_without_key(self) -> None:
        """When server.metrics_local is on and a loopback client asks without a key, the Prometheus text is answered."""
        self.h.api.reload(replace(CONFIG, server=replace(CONFIG.server, metrics_local=True)))
        response, body = self.request("GET", "/metrics")
        self.assertEqual(response.code, 200)
        self.assertTrue(response.headers.getRawHeaders("content-type")[0].startswith("text/plain; version=0.0.4"))
        self.assertIn(b"vaporproxy_consoles_live", body)

    def test_admin_key(self) -> None:
        """When an admin key is given, the Prometheus text is answered."""
        response, body = self.request("GET", "/metrics", ADMIN_KEY)
        self.assertEqual(response.code, 200)
        self.assertIn(b"vaporproxy_tokens_outstanding", body)

    def test_user_key(self) -> None:
        """When a non-admin key is given, the answer is 403 even from loopback."""
        response, body = self.json_request("GET", "/metrics", USER_KEY)
        self.assertError(response, body, 403, ErrorCode.UNAUTHORIZED)

    def test_bad_key(self) -> None:
        """When an unknown key is given, the answer is 401 even from loopback."""
        response, body = self.json_request("GET", "/metrics", "bogus")
        self.assertError(response, body, 401, ErrorCode.UNAUTHORIZED)

    def test_forwarded_without_key(self) -> None:
        """When a loopback reverse proxy forwards a request without a key, the answer is 401."""
        self.h.api.reload(replace(CONFIG, server=replace(CONFIG.server, metrics_local=True)))
        for header in ("X-Forwarded-For", "Forwarded"):
            response, body = self.json_request("GET", "/metrics", headers={header: ["198.51.100.4"]})
            self.assertError(response, body, 401, ErrorCode.UNAUTHORIZED)

    def test_remote_without_key(self) -> None:
        """When a non-loopback client asks without a key, the answer is 401."""
        self.h.api.reload(replace(CONFIG, server=replace(CONFIG.server, metrics_local=True)))
        self.patch(web, "request_client_ip", lambda request, trusted: "203.0.113.9")
        response, body = self.json_request("GET", "/metrics")
        self.assertError(response, body, 401, ErrorCode.UNAUTHORIZED)


class HealthTests(APITestCase):
    def test_healthz(self) -> None:
        """When anyone asks for liveness, the answer is ok."""
        response, body = self.json_request("GET", "/healthz")
        self.assertEqual((response.code, body), (200, {"status": "ok"}))

    def test_ready(self) -> None:
        """When the store and hypervisors are fine, readiness is 200 with every check ok."""
        response, body = self.json_request("GET", "/readyz")
        self.assertEqual(response.code, 200)
        self.assertEqual(
            body, {"ready": True, "checks": {"token_store": "ok", "hypervisors": {"fake:///": "ok"}}}
        )

    def test_hypervisor_down(self) -> None:
        """When a hypervisor is unreachable, readiness is 503 naming it."""
        self.h.locator.broken = "unreachable"
        response, body = self.json_request("GET", "/readyz")
        self.assertEqual(response.code, 503)
        self.assertEqual(body["checks"]["hypervisors"], {"fake:///": "unreachable"})
        self.assertIs(body["ready"], False)

    def test_hypervisor_host_hidden(self) -> None:
        """When a hypervisor URI names a remote host, readiness hides the host, the path and the query."""
        self.h.locator.uri = "qemu+ssh://root@kvm-7.internal/system?keyfile=/etc/k"
        response, body = self.json_request("GET", "/readyz")
        self.assertEqual(body["checks"]["hypervisors"], {"qemu+ssh://\N{HORIZONTAL ELLIPSIS}/\N{HORIZONTAL ELLIPSIS}": "ok"})
        self.assertNotIn("kvm-7", json.dumps(body))
        self.assertNotIn("system", json.dumps(body))

    def test_hypervisor_path_hidden(self) -> None:
        """When a hypervisor URI has a local path (a test driver's node file), readiness hides it."""
        self.h.locator.uri = "test:///srv/private/node.xml"
        response, body = self.json_request("GET", "/readyz")
        self.assertEqual(body["checks"]["hypervisors"], {"test:///\N{HORIZONTAL ELLIPSIS}": "ok"})

    def test_store_down(self) -> None:
        """When the token store fails its check, readiness is 503 with a short safe reason."""
        self.patch(self.h.store, "check", lambda: fail(ConnectionRefusedError("redis at 10.1.2.3:6379")))
        response, body = self.json_request("GET", "/readyz")
        self.assertEqual(response.code, 503)
        self.assertEqual(body["checks"]["token_store"], "unavailable")
        self.assertEqual(len(self.flushLoggedErrors(ConnectionRefusedError)), 1)

    def test_store_hangs(self) -> None:
        """When the token store check never answers, readiness is 503 after the timeout."""
        self.patch(self.h.store, "check", lambda: Deferred())
        d = self.h.treq.get(BASE + "/readyz")
        self.assertNoResult(d)
        self.h.clock.advance(5)
        self.h.treq.flush()
        response = self.successResultOf(d)
        body = self.successResultOf(response.json())
        self.assertEqual((response.code, body["checks"]["token_store"]), (503, "timeout"))


class StaticTests(APITestCase):
    def setUp(self) -> None:
        super().setUp()
        root = FilePath(self.mktemp())
        novnc = root.child("novnc")
        novnc.child("core").makedirs()
        novnc.child("core").child("rfb.js").setContent(b"export default class RFB {}\n")
        self.h = Harness(static_dirs={"novnc": novnc.path, "spice-html5": root.child("absent").path})
        # HTTPChannel drives File's pull producer with the global
        # cooperator; drive it with the test's clock instead.
        from twisted.internet import _producer_helpers
        from twisted.internet.task import Cooperator

        cooperator = Cooperator(scheduler=lambda step: self.h.clock.callLater(0, step))
        self.patch(_producer_helpers, "cooperate", cooperator.cooperate)
        self.page = root.child("console.html")
        self.page.setContent(b"<!DOCTYPE html><title>console</title>")
        self.patch(web_site, "STATIC_PAGE", self.page.path)

    def test_page(self) -> None:
        """When the console page is asked for, it is served as HTML with a strict CSP."""
        response, body = self.request("GET", "/console/web-1")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, self.page.getContent())
        self.assertTrue(response.headers.getRawHeaders("content-type")[0].startswith("text/html"))
        csp = response.headers.getRawHeaders("content-security-policy")[0]
        self.assertIn("script-src 'self'", csp)
        self.assertIn("connect-src 'self' ws: wss:", csp)
        self.assertNotIn("unsafe-eval", csp)

    def test_page_missing(self) -> None:
        """When the page is not installed, the answer is a JSON 404."""
        self.page.remove()
        response, body = self.json_request("GET", "/console/web-1")
        self.assertEqual(response.code, 404)

    def test_app_files(self) -> None:
        """When the console page's script and style are asked for, the packaged files are served."""
        static = FilePath(web.__file__).parent().sibling("static")
        for name, content_type in (("console.js", "text/javascript"), ("console.css", "text/css")):
            response, body = self.request("GET", f"/static/app/{name}")
            self.assertEqual(response.code, 200)
            self.assertEqual(body, static.child(name).getContent())
            self.assertEqual(response.headers.getRawHeaders("content-type")[0], content_type)
            self.assertEqual(response.headers.getRawHeaders("x-content-type-options"), ["nosniff"])

    def test_file(self) -> None:
        """When a noVNC file is asked for, it is served with a JavaScript type."""
        response, body = self.request("GET", "/static/novnc/core/rfb.js")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, b"export default class RFB {}\n")
        self.assertEqual(response.headers.getRawHeaders("content-type")[0], "text/javascript")

    def test_no_listing(self) -> None:
        """When a directory is asked for, no listing is given."""
        response, body = self.json_request("GET", "/static/novnc/core/")
        self.assertEqual(response.code, 404)
        self.assertNotIn(b"rfb.js", json.dumps(body).encode())

    def test_missing_file(self) -> None:
        """When a file does not exist, the answer is a JSON 404."""
        response, body = self.json_request("GET", "/static/novnc/core/nope.js")
        self.assertEqual(response.code, 404)

    def test_missing_dir(self) -> None:
        """When a library directory is not installed, the answer is a JSON 404."""
        response, body = self.json_request("GET", "/static/spice-html5/spicemain.js")
        self.assertEqual(response.code, 404)

    def test_no_escape(self) -> None:
        """When a path tries to climb out of the directory, nothing outside is served."""
        response, body = self.request("GET", "/static/novnc/../console.html")
        self.assertNotEqual(body, self.page.getContent())
        response, body = self.request("GET", "/static/novnc/%2e%2e/console.html")
        self.assertNotEqual(body, self.page.getContent())


class FakeCluster:
    """
    The part of L{vaporproxy.stores.redis.RedisBackend} the API uses: fixed
    cluster figures, and terminate requests that reach this process's
    callbacks (as the pub/sub round trip would) and other processes'
    consoles.
    """

    node_id = "node-a"

    def __init__(self, limiter: Any, store: Any, remote_records: List[FakeRecord]):
        self.limiter = limiter
        self.store = store
        self.remote_records = remote_records
        self.published: List[str] = []
        self.callbacks: List[Any] = []
        self.down = False

    def on_terminate(self, callback: Any) -> None:
        self.callbacks.append(callback)

    def publish_terminate(self, vm_uuid: str) -> Deferred:
        if self.down:
            return fail(ConsoleError(ErrorCode.SERVICE_UNAVAILABLE))
        self.published.append(vm_uuid)
        for callback in self.callbacks:
            callback(vm_uuid)
        self.remote_records[:] = [r for r in self.remote_records if r.vm_id != vm_uuid]
        return succeed(2)

    def cluster_stats(self) -> Deferred:
        if self.down:
            return fail(ConsoleError(ErrorCode.SERVICE_UNAVAILABLE))
        totals = self.successResult(self.limiter.stats())
        return succeed(
            {
                "total_connections": totals["total_connections"],
                "connections_per_vm": totals["connections_per_vm"],
                "total_tokens": self.successResult(self.store.count()),
                "processes": [
                    {"node_id": "node-a", "pid": 11, "started_at": NOW - 100, "updated_at": NOW,
                     "total_connections": 1, "connections_per_vm": {WEB_UUID: 1}},
                    {"node_id": "node-b", "pid": 12, "started_at": NOW - 50, "updated_at": NOW,
                     "total_connections": 2, "connections_per_vm": {WEB_UUID: 1, DB_UUID: 1}},
                ],
            }
        )

    @staticmethod
    def successResult(d: Deferred) -> Any:
        result: List[Any] = []
        d.addCallback(result.append)
        return result[0]


class ClusterTests(APITestCase):
    """
    Stats and DELETE when the process is one of a Redis cluster.
    """

    def setUp(self) -> None:
        super().setUp()
        self.remote: List[FakeRecord] = []
        self.cluster = FakeCluster(None, None, self.remote)
        self.h = Harness(cluster=self.cluster)
        self.cluster.limiter, self.cluster.store = self.h.limiter, self.h.store
        self.cluster.on_terminate(self.h.registry.terminate_vm)
        # One console here (node-a), two on node-b; the limiter is shared.
        for vm, console_id in ((WEB_UUID, "a1"), (WEB_UUID, "b1"), (DB_UUID, "b2")):
            self.successResultOf(self.h.limiter.acquire(vm, console_id))
        self.h.registry.records.append(FakeRecord("a1", WEB_UUID, "vnc", "alice", NOW - 10))
        self.remote += [FakeRecord("b1", WEB_UUID, "vnc", "bob", NOW), FakeRecord("b2", DB_UUID, "vnc", "bob", NOW)]

    def test_statsClusterWide(self) -> None:
        """When the process is in a cluster, the SPEC totals are cluster-wide and C{cluster} holds each process's figures."""
        self.json_request("GET", f"{VMS}/web-1/console", USER_KEY)
        response, body = self.json_request("GET", "/api/v1/console/stats", ADMIN_KEY)
        self.assertEqual(response.code, 200)
        self.assertEqual(
            set(body), {"total_connections", "total_tokens", "connections_per_vm", "connections", "cluster"}
        )
        self.assertEqual(body["total_connections"], 3)
        self.assertEqual(body["total_tokens"], 1)
        self.assertEqual(body["connections_per_vm"], {WEB_UUID: 2, DB_UUID: 1})
        self.assertEqual([c["console_id"] for c in body["connections"]], ["a1"])
        cluster = body["cluster"]
        self.assertEqual(cluster["node_id"], "node-a")
        self.assertEqual(cluster["total_connections"], 3)
        self.assertEqual([p["node_id"] for p in cluster["processes"]], ["node-a", "node-b"])
        self.assertEqual(cluster["processes"][1]["connections_per_vm"], {WEB_UUID: 1, DB_UUID: 1})
        self.assertEqual(cluster["processes"][0]["started_at"], iso_utc(NOW - 100))

    def test_statsRedisDown(self) -> None:
        """When Redis is unreachable, stats answer 503 SERVICE_UNAVAILABLE."""
        self.cluster.down = True
        response, body = self.json_request("GET", "/api/v1/console/stats", ADMIN_KEY)
        self.assertError(response, body, 503, ErrorCode.SERVICE_UNAVAILABLE)

    def test_deleteReachesEveryProcess(self) -> None:
        """When an admin deletes a VM's sessions in a cluster, the request is published and the cluster-wide count answered."""
        response, body = self.json_request("DELETE", f"{VMS}/web-1/console/sessions", ADMIN_KEY)
        self.assertEqual(response.code, 200)
        self.assertEqual(body, {"terminated": 2})
        self.assertEqual(self.cluster.published, [WEB_UUID])
        self.assertEqual(self.h.registry.records, [])
        self.assertEqual([r.console_id for r in self.remote], ["b2"])

    def test_deleteRedisDown(self) -> None:
        """When Redis is unreachable, DELETE closes this process's consoles and answers 503."""
        self.cluster.down = True
        self.h.limiter.stats = lambda: fail(ConsoleError(ErrorCode.SERVICE_UNAVAILABLE))
        response, body = self.json_request("DELETE", f"{VMS}/web-1/console/sessions", ADMIN_KEY)
        self.assertError(response, body, 503, ErrorCode.SERVICE_UNAVAILABLE)
        self.assertEqual(self.h.registry.records, [])
        self.assertEqual(self.cluster.published, [])

    def test_withoutClusterUnchanged(self) -> None:
        """When no cluster is given, stats have exactly the SPEC fields."""
        self.h = Harness()
        response, body = self.json_request("GET", "/api/v1/console/stats", ADMIN_KEY)
        self.assertEqual(set(body), {"total_connections", "total_tokens", "connections_per_vm", "connections"})


class JWTSetup:
    """
    A harness whose API takes JWT bearer tokens (ES256, key generated at
    run time), and C{jwt(**claims)} to make them.
    """

    def setUp(self) -> None:
        import tempfile

        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        super().setUp()
        self.signing_key = ec.generate_private_key(ec.SECP256R1())
        public = self.signing_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        fd, self.key_path = tempfile.mkstemp(prefix="vapor-jwt-", suffix=".pem")
        self.addCleanup(os.remove, self.key_path)
        with os.fdopen(fd, "wb") as f:
            f.write(public)
        self.config = replace(
            CONFIG,
            auth=AuthConfig(
                api_keys=KEYS, jwt=JWTConfig(("ES256",), self.key_path, issuer="https://sso", audience="vaporproxy")
            ),
        )
        self.h = Harness(self.config)

    def jwt(self, **claims: Any) -> str:
        import jwt

        payload = {"sub": "carol", "iss": "https://sso", "aud": "vaporproxy", "exp": int(NOW) + 300, "vms": ["web-*"]}
        payload.update(claims)
        return jwt.encode(payload, self.signing_key, algorithm="ES256")


class JWTRouteTests(JWTSetup, APITestCase):
    """
    Routes called with JWT bearer tokens.
    """

    def test_console(self) -> None:
        """When a valid JWT allows the VM, a console token is issued to the JWT's subject."""
        response, body = self.json_request("GET", f"{VMS}/web-1/console", self.jwt())
        self.assertEqual(response.code, 200)
        grant = self.successResultOf(self.h.store.redeem(body["token"], "web-1", None)).grant
        self.assertEqual((grant.vm_uuid, grant.user), (WEB_UUID, "carol"))

    def test_vm_not_allowed(self) -> None:
        """When a valid JWT's vms claim does not cover the VM, the answer is 403."""
        response, body = self.json_request("GET", f"{VMS}/db-1/console", self.jwt())
        self.assertError(response, body, 403, ErrorCode.UNAUTHORIZED)

    def test_expired(self) -> None:
        """When the JWT has expired, the answer is 401 with a Bearer challenge and the token is not logged."""
        token = self.jwt(exp=int(NOW) - 120)
        response, body = self.json_request("GET", f"{VMS}/web-1/console", token)
        self.assertError(response, body, 401, ErrorCode.UNAUTHORIZED)
        self.assertTrue(response.headers.getRawHeaders("www-authenticate")[0].startswith("Bearer"))
        self.assertNotIn(token, self.logged_text())

    def test_stats_needs_admin(self) -> None:
        """When a non-admin JWT asks for stats the answer is 403; with the admin role it is 200."""
        response, body = self.json_request("GET", "/api/v1/console/stats", self.jwt())
        self.assertError(response, body, 403, ErrorCode.UNAUTHORIZED)
        response, _ = self.json_request("GET", "/api/v1/console/stats", self.jwt(roles=["vaporproxy:admin"]))
        self.assertEqual(response.code, 200)

    def test_api_keys_still_work(self) -> None:
        """When JWT is on, API keys are accepted as before."""
        response, _ = self.json_request("GET", f"{VMS}/web-1/console", USER_KEY)
        self.assertEqual(response.code, 200)

    def test_bad_reload_keeps_auth(self) -> None:
        """When a reload names a missing JWT key file, it raises and the old settings stay."""
        from vaporproxy.config import ConfigError

        bad = replace(self.config, auth=AuthConfig(jwt=JWTConfig(("ES256",), self.key_path + ".missing")))
        self.assertRaises(ConfigError, self.h.api.reload, bad)
        response, _ = self.json_request("GET", f"{VMS}/web-1/console", self.jwt())
        self.assertEqual(response.code, 200)
        response, _ = self.json_request("GET", f"{VMS}/web-1/console", USER_KEY)
        self.assertEqual(response.code, 200)



class StepUpRouteTests(JWTSetup, APITestCase):
    """
    Console info for a VM under an C{auth.policies} step-up rule (issue 9).
    """

    def setUp(self) -> None:
        super().setUp()
        policy = StepUpPolicy(vms=("web-*",), require_mfa=True, max_auth_age=600.0, acr_values="urn:mfa")
        self.config = replace(self.config, auth=replace(self.config.auth, policies=(policy,)))
        self.h = Harness(self.config)

    def assertStepUp(self, response: Any, body: Any) -> None:
        self.assertError(response, body, 401, ErrorCode.MFA_REQUIRED)
        challenge = response.headers.getRawHeaders("www-authenticate")[0]
        self.assertTrue(challenge.startswith('Bearer error="insufficient_user_authentication", error_description="'))
        self.assertIn("max_age=600", challenge)
        self.assertIn('acr_values="urn:mfa"', challenge)
        self.assertEqual(self.successResultOf(self.h.store.count()), 0)  # no token was issued

    def test_jwtWithoutMfa(self) -> None:
        """When a JWT without an MFA amr asks for a step-up VM, the answer is 401 MFA_REQUIRED with the RFC 9470 challenge."""
        response, body = self.json_request("GET", f"{VMS}/web-1/console", self.jwt(amr=["pwd"], auth_time=int(NOW)))
        self.assertStepUp(response, body)

    def test_apiKeyRefused(self) -> None:
        """When an API key asks for a step-up VM, it is refused the same way."""
        response, body = self.json_request("GET", f"{VMS}/web-1/console", USER_KEY)
        self.assertStepUp(response, body)

    def test_staleSignIn(self) -> None:
        """When the MFA sign-in is older than max_auth_age, it is refused."""
        response, body = self.json_request("GET", f"{VMS}/web-1/console", self.jwt(amr=["otp"], auth_time=int(NOW) - 601))
        self.assertStepUp(response, body)

    def test_recentMfa(self) -> None:
        """When the JWT says MFA within max_auth_age, a console token is issued."""
        response, body = self.json_request("GET", f"{VMS}/web-1/console", self.jwt(amr=["pwd", "otp"], auth_time=int(NOW) - 30))
        self.assertEqual(response.code, 200)
        self.assertIn("token", body)


class AuditRouteTests(APITestCase):
    """
    The audit trail of the HTTP API (issue 10): what it writes, and that no
    token it issued is in it.
    """

    def setUp(self) -> None:
        super().setUp()
        from vaporproxy.audit import AuditTrail
        from vaporproxy.filewriter import DiskWriter

        self.path = self.mktemp()
        clock = Clock()
        clock.advance(NOW)
        trail = AuditTrail(clock, DiskWriter(clock, threaded=False).open(self.path, flush_each=True))
        self.h = Harness(audit=trail)

    def lines(self) -> List[Dict[str, Any]]:
        with open(self.path) as f:
            return [json.loads(line) for line in f]

    def test_tokensIssuedAndTerminated(self) -> None:
        """When tokens are issued and an admin terminates a VM's consoles, each is one line, and no token is in the file."""
        tokens = []
        for key in (USER_KEY, WEB_KEY):
            response, body = self.json_request("GET", f"{VMS}/web-1/console", key)
            self.assertEqual(response.code, 200)
            tokens.append(body["token"])
        response, _ = self.json_request("DELETE", f"{VMS}/web-1/console/sessions", ADMIN_KEY)
        self.assertEqual(response.code, 200)
        lines = self.lines()
        self.assertEqual([line["event"] for line in lines], ["token_issued", "token_issued", "sessions_terminated"])
        self.assertEqual([line.get("user") for line in lines[:2]], ["alice", "webops"])
        self.assertEqual(lines[0]["vm_uuid"], WEB_UUID)
        self.assertEqual(lines[0]["vm_name"], "web-1")
        self.assertEqual(lines[0]["via"], "key")
        self.assertEqual(lines[0]["type"], "vnc")
        self.assertEqual((lines[2]["by"], lines[2]["vm_uuid"], lines[2]["count"]), ("root", WEB_UUID, 0))
        with open(self.path) as f:
            text = f.read()
        for secret in tokens + [USER_KEY, WEB_KEY, ADMIN_KEY]:
            self.assertNotIn(secret, text)


class ConsoleModeTests(APITestCase):
    """
    Console info's C{mode} (issue 9): asked with C{?mode=}, capped by the
    credential's C{access}.
    """

    VIEW_KEY = "view-key-5c1e0d9a8b"

    def setUp(self) -> None:
        super().setUp()
        keys = KEYS + (ApiKey(user="watcher", sha256=sha(self.VIEW_KEY), vms=("*",), access="view"),)
        self.h = Harness(replace(CONFIG, auth=AuthConfig(api_keys=keys)))

    def grant_of(self, body: Dict[str, Any]) -> Any:
        return self.successResultOf(self.h.store.redeem(body["token"], "web-1", None)).grant

    def test_defaultControl(self) -> None:
        """When a control key asks without a mode, the console is control."""
        response, body = self.json_request("GET", f"{VMS}/web-1/console", USER_KEY)
        self.assertEqual((response.code, body["mode"]), (200, "control"))
        self.assertEqual(self.grant_of(body).mode, "control")

    def test_viewAsked(self) -> None:
        """When a control key asks ?mode=view, the token is bound to view."""
        response, body = self.json_request("GET", f"{VMS}/web-1/console?mode=view", USER_KEY)
        self.assertEqual(body["mode"], "view")
        self.assertEqual(self.grant_of(body).mode, "view")

    def test_viewKeyAlwaysView(self) -> None:
        """When a view key asks without a mode it gets view; asking control is 403."""
        response, body = self.json_request("GET", f"{VMS}/web-1/console", self.VIEW_KEY)
        self.assertEqual(self.grant_of(body).mode, "view")
        response, body = self.json_request("GET", f"{VMS}/web-1/console?mode=control", self.VIEW_KEY)
        self.assertError(response, body, 403, ErrorCode.UNAUTHORIZED)

    def test_unknownMode(self) -> None:
        """When the mode is neither view nor control, the answer is 400."""
        response, body = self.json_request("GET", f"{VMS}/web-1/console?mode=admin", USER_KEY)
        self.assertError(response, body, 400, ErrorCode.BAD_REQUEST)


class JWTAccessTests(JWTSetup, APITestCase):
    def test_vaporAccessView(self) -> None:
        """When a JWT says vapor_access: view, its console is view-only and asking control is 403."""
        response, body = self.json_request("GET", f"{VMS}/web-1/console", self.jwt(vapor_access="view"))
        self.assertEqual(body["mode"], "view")
        response, body = self.json_request("GET", f"{VMS}/web-1/console?mode=control", self.jwt(vapor_access="view"))
        self.assertError(response, body, 403, ErrorCode.UNAUTHORIZED)
        response, body = self.json_request("GET", f"{VMS}/web-1/console", self.jwt())
        self.assertEqual(body["mode"], "control")


class ShareRouteTests(APITestCase):
    """
    Share links (issue 9): create, use, list, revoke; never more than the
    creator has; secrets never listed.
    """

    VIEW_KEY = "view-key-5c1e0d9a8b"

    def setUp(self) -> None:
        super().setUp()
        from vaporproxy.stores.shares import MemoryShareStore

        keys = KEYS + (ApiKey(user="watcher", sha256=sha(self.VIEW_KEY), vms=("*",), access="view"),)
        self.shares = MemoryShareStore(Clock())
        self.h = Harness(replace(CONFIG, auth=AuthConfig(api_keys=keys)), shares=self.shares)
        self.shares._clock = self.h.clock

    def share(self, key: str = USER_KEY, **body: Any) -> Any:
        return self.json_request("POST", f"{VMS}/web-1/console/shares", key, data=json.dumps(body).encode())

    def use(self, secret: str) -> Any:
        return self.json_request("GET", f"{VMS}/web-1/console", headers={"Authorization": [f"Share {secret}"]})

    def test_createAndUse(self) -> None:
        """When a control user shares a VM's console, the link opens a view console as many times as it allows."""
        response, body = self.share(max_uses=2)
        self.assertEqual(response.code, 201)
        self.assertEqual((body["mode"], body["max_uses"]), ("view", 2))
        secret = body["url"].split("#share=")[1]
        self.assertEqual(body["url"], f"/console/web-1#share={secret}")
        for _ in range(2):
            response, info = self.use(secret)
            self.assertEqual((response.code, info["mode"]), (200, "view"))
        response, info = self.use(secret)
        self.assertError(response, info, 401, ErrorCode.TOKEN_ALREADY_USED)

    def test_listWithoutSecret(self) -> None:
        """When the VM's shares are listed, each shows its id, mode and uses left, never the secret."""
        _, body = self.share(mode="control", ttl="1h")
        secret = body["url"].split("#share=")[1]
        response, listed = self.json_request("GET", f"{VMS}/web-1/console/shares", USER_KEY)
        self.assertEqual(response.code, 200)
        [entry] = listed["shares"]
        self.assertEqual((entry["share_id"], entry["mode"], entry["uses_left"], entry["creator"]),
                         (body["share_id"], "control", 1, "alice"))  # fmt: skip
        self.assertNotIn(secret, json.dumps(listed))
        _, others = self.json_request("GET", f"{VMS}/web-1/console/shares", WEB_KEY)
        self.assertEqual(others["shares"], [])  # not webops's share
        _, admin = self.json_request("GET", f"{VMS}/web-1/console/shares", ADMIN_KEY)
        self.assertEqual(len(admin["shares"]), 1)

    def test_revoke(self) -> None:
        """When the creator revokes a share, its link stops working; another user cannot revoke it."""
        _, body = self.share()
        secret = body["url"].split("#share=")[1]
        path = f"{VMS}/web-1/console/shares/{body['share_id']}"
        response, _ = self.json_request("DELETE", path, WEB_KEY)
        self.assertEqual(response.code, 403)
        response, answer = self.json_request("DELETE", path, USER_KEY)
        self.assertEqual((response.code, answer["revoked"]), (200, body["share_id"]))
        response, info = self.use(secret)
        self.assertError(response, info, 401, ErrorCode.INVALID_TOKEN)

    def test_viewKeyCannotShare(self) -> None:
        """When a view-only credential tries to share, it is refused (a share never grants more than its creator has)."""
        response, body = self.share(key=self.VIEW_KEY)
        self.assertError(response, body, 403, ErrorCode.UNAUTHORIZED)

    def test_badBodies(self) -> None:
        """When the body has an unknown field, a bad mode or uses, or is not JSON, the answer is 400."""
        for body in ({"mode": "admin"}, {"max_uses": 0}, {"ttl": "forever"}, {"owner": "x"}):
            response, answer = self.share(**body)
            self.assertError(response, answer, 400, ErrorCode.BAD_REQUEST)
        response, answer = self.json_request("POST", f"{VMS}/web-1/console/shares", USER_KEY, data=b"{nope")
        self.assertError(response, answer, 400, ErrorCode.BAD_REQUEST)

    def test_wrongVm(self) -> None:
        """When a share of one VM is presented for another, it is refused as an invalid token."""
        _, body = self.share()
        secret = body["url"].split("#share=")[1]
        response, info = self.json_request("GET", f"{VMS}/db-1/console", headers={"Authorization": [f"Share {secret}"]})
        self.assertError(response, info, 401, ErrorCode.INVALID_TOKEN)


    def test_creatorRemoved(self) -> None:
        """When the creator's key is removed on reload, the creator's share link stops working."""
        _, body = self.share()
        secret = body["url"].split("#share=")[1]
        without_alice = tuple(k for k in self.h.api._config.auth.api_keys if k.user != "alice")
        self.h.api.reload(replace(CONFIG, auth=AuthConfig(api_keys=without_alice)))
        response, info = self.use(secret)
        self.assertError(response, info, 401, ErrorCode.INVALID_TOKEN)
