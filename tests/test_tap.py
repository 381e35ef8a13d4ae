"""
Tests for L{vaporproxy.tap}, L{vaporproxy.logs} and the twistd plugin.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, List

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import Application
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, Logger, globalLogPublisher
from twisted.python import usage
from twisted.python.logfile import LogFile
from twisted.trial.unittest import SynchronousTestCase

from tests.integration.qemu_fixture import write_x509_credentials
from vaporproxy import tap
from vaporproxy.app.reload import ReloadService, apply_reload
from vaporproxy.app.services import ShutdownService, ThreadPoolService, VaporService, purge_tokens
from vaporproxy.config import Config
from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.logs import LogSetup, log_setup_for, twistd_destination

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = """
hypervisors: [{uri: "test:///default"}]
server: {listen: ["tcp:0:interface=127.0.0.1"]}
console: {max_connections_per_vm: 5, max_total_connections: 3}
"""


def vnc_tls_config(ca_file: str) -> str:
    """
    CONFIG with VeNCrypt towards the hypervisor's VMs, trusting C{ca_file}.
    """
    return CONFIG.replace(
        'hypervisors: [{uri: "test:///default"}]',
        f'hypervisors: [{{uri: "test:///default", vnc_tls: {{ca_file: "{ca_file}"}}}}]',
    )


class ThreadingReactor(MemoryReactorClock):
    """
    A memory reactor with C{callFromThread}, run on the next
    C{advance(0)} (what a signal handler uses).
    """

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        self.callLater(0, f, *args, **kwargs)


def write(path: str, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    return path


def options(*argv: str, environ: Any = None) -> tap.Options:
    o = tap.Options()
    o.environ = environ if environ is not None else {}
    o.parseOptions(list(argv))
    return o


class OptionsTests(SynchronousTestCase):
    def test_defaultsWhenNoFile(self) -> None:
        """
        When no --config is given and vapor.conf is absent, the built-in defaults are used.
        """
        self.patch(tap, "DEFAULT_CONFIG", self.mktemp())
        o = options()
        self.assertEqual(o["parsed"], Config())
        self.assertIsNone(o["config_path"])

    def test_configFile(self) -> None:
        """
        When --config names a file, its values are parsed.
        """
        path = write(self.mktemp(), CONFIG)
        o = options("--config", path)
        self.assertEqual(o["parsed"].console.max_total_connections, 3)
        self.assertEqual(o["config_path"], path)

    def test_listenReplaces(self) -> None:
        """
        When --listen is given twice, both endpoints replace server.listen.
        """
        path = write(self.mktemp(), CONFIG)
        o = options("-c", path, "--listen", "tcp:9001", "-l", "unix:/tmp/vapor-test.sock")
        self.assertEqual(o["parsed"].server.listen, ("tcp:9001", "unix:/tmp/vapor-test.sock"))

    def test_badConfig(self) -> None:
        """
        When the file has a bad value, UsageError carries the one-line config error.
        """
        path = write(self.mktemp(), "console: {idle_timeout: soon}\n")
        error = self.assertRaises(usage.UsageError, options, "--config", path)
        self.assertEqual(
            str(error),
            "console.idle_timeout: 'soon' is not a duration (expected e.g. 500ms, 30s, 5m, 1h)",
        )

    def test_badJWTKey(self) -> None:
        """
        When auth.jwt names a key file that cannot be used, start-up stops with a one-line error naming it.
        """
        key = write(self.mktemp(), "too-short")
        path = write(self.mktemp(), f"auth: {{jwt: {{algorithms: [HS256], key_file: {key!r}}}}}\n")
        error = self.assertRaises(usage.UsageError, options, "--config", path)
        self.assertIn("auth.jwt", str(error))
        self.assertNotIn("\n", str(error))

    def test_missingExplicitConfig(self) -> None:
        """
        When --config names a missing file, it is an error rather than defaults.
        """
        path = self.mktemp()
        error = self.assertRaises(usage.UsageError, options, "--config", path)
        self.assertEqual(str(error), f"{path}: cannot read the config file (No such file or directory)")

    def test_badListen(self) -> None:
        """
        When --listen is not an endpoint, UsageError names the option.
        """
        self.patch(tap, "DEFAULT_CONFIG", self.mktemp())
        error = self.assertRaises(usage.UsageError, options, "--listen", "tcp:http")
        self.assertTrue(str(error).startswith("--listen[0]: 'tcp:http' is not a valid endpoint"), str(error))

    def test_badEnvLevel(self) -> None:
        """
        When VAPOR_LOG_LEVEL is not a level, start-up fails naming it.
        """
        self.patch(tap, "DEFAULT_CONFIG", self.mktemp())
        error = self.assertRaises(usage.UsageError, options, environ={"VAPOR_LOG_LEVEL": "loud"})
        self.assertEqual(
            str(error),
            "VAPOR_LOG_LEVEL: 'loud' is not a valid choice (expected one of debug, info, warn, error)",
        )

    def test_badVncTLSCertificate(self) -> None:
        """
        When a hypervisor's vnc_tls names a CA file that is not a certificate, start-up stops with a one-line error naming the key.
        """
        junk = write(self.mktemp(), "not a certificate\n")
        path = write(self.mktemp(), vnc_tls_config(junk))
        error = self.assertRaises(usage.UsageError, options, "--config", path)
        self.assertEqual(
            str(error),
            f"hypervisors[0].vnc_tls.ca_file: {junk!r} is not a PEM certificate file"
            " (expected one or more CERTIFICATE blocks)",
        )

    def test_goodVncTLSCertificate(self) -> None:
        """
        When a hypervisor's vnc_tls names a usable CA file, the config is accepted with it.
        """
        ca_file = write_x509_credentials(self.mktemp())["ca-cert.pem"]
        path = write(self.mktemp(), vnc_tls_config(ca_file))
        [hypervisor] = options("--config", path)["parsed"].hypervisors
        self.assertEqual(hypervisor.vnc_tls.ca_file, ca_file)


class MakeServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = write(self.mktemp(), CONFIG)
        self.reactor = ThreadingReactor()

    def make(self, *argv: str, environ: Any = None) -> VaporService:
        root = tap.makeService(options("--config", self.path, *argv, environ=environ), self.reactor)
        self.addCleanup(lambda: root.running and root.stopService())
        return root

    def test_listensOnEveryEndpoint(self) -> None:
        """
        When started, one port per listen endpoint serves the guard, then the switch in front of the API site and the bridge; stopping stops them.
        """
        from vaporproxy.ws.switch import SwitchFactory

        root = self.make("--listen", "tcp:8123:interface=127.0.0.1", "--listen", "tcp6:8124:interface=\\:\\:1")
        endpoints = [s for s in root if isinstance(s, StreamServerEndpointService)]
        self.assertEqual(len(endpoints), 2)
        root.startService()
        ports = [(port, interface) for port, _, _, interface in self.reactor.tcpServers]
        self.assertEqual(ports, [(8123, "127.0.0.1"), (8124, "::1")])
        self.assertEqual({id(f) for _, f, _, _ in self.reactor.tcpServers}, {id(root.pieces["guard"])})
        listening = root.pieces["listening"]
        self.assertIs(root.pieces["guard"].wrappedFactory, listening)
        self.assertIsInstance(listening, SwitchFactory)
        self.assertIs(listening.http_factory, root.pieces["site"])
        self.assertIs(listening.ws_factory, root.pieces["bridge_factory"])
        self.assertIs(listening.clock, self.reactor)
        self.successResultOf(root.stopService())
        self.assertFalse(root.running)

    def test_wiring(self) -> None:
        """
        When built with the memory backend, the agreed pieces are wired with the config's values.
        """
        from vaporproxy.stores.limits import MemoryLimiter
        from vaporproxy.stores.tokens import MemoryTokenStore

        root = self.make()
        pieces = root.pieces
        self.assertIsInstance(pieces["token_store"].wrapped, MemoryTokenStore)
        self.assertIsInstance(pieces["limiter"], MemoryLimiter)
        self.assertEqual((pieces["limiter"].max_per_vm, pieces["limiter"].max_total), (5, 3))
        self.assertIs(pieces["reactor"], self.reactor)
        timers = [s for s in root if isinstance(s, TimerService)]
        self.assertEqual([t.step for t in timers], [60.0])
        self.assertIsInstance(root.getServiceNamed("reload"), ReloadService)

    def test_redisBackend(self) -> None:
        """
        When tokens.backend is redis, the Redis store and limiter are wired and dial the URL.
        """
        from vaporproxy.stores.redis_limits import RedisLimiter
        from vaporproxy.stores.redis_tokens import RedisTokenStore

        write(self.path, CONFIG + "tokens: {backend: redis, redis_url: 'redis://127.0.0.1:6390/0'}\n")
        root = self.make()
        self.assertIsInstance(root.pieces["token_store"].wrapped, RedisTokenStore)
        self.assertIsInstance(root.pieces["limiter"], RedisLimiter)
        root.startService()
        self.assertEqual({(host, port) for host, port, *_ in self.reactor.tcpClients}, {("127.0.0.1", 6390)})

    def test_redisWaitsForStart(self) -> None:
        """
        When the service tree is built with the Redis backend, nothing dials Redis or runs a timer until startService (twistd forks in between).
        """
        write(self.path, CONFIG + "tokens: {backend: redis, redis_url: 'redis://127.0.0.1:6390/0'}\n")
        root = self.make()
        services = list(root)
        redis = services.index(root.getServiceNamed("redis"))
        listeners = [i for i, s in enumerate(services) if isinstance(s, StreamServerEndpointService)]
        self.assertLess(redis, min(listeners))  # started before, stopped after the listeners
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        root.startService()
        # The command connection and the pub/sub connection.
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.assertNotEqual(self.reactor.getDelayedCalls(), [])

    def test_redisTerminateAndClose(self) -> None:
        """
        When Redis relays a terminate request it reaches the registry; starting starts the backend, stopping closes it.
        """
        import vaporproxy.stores.redis
        from vaporproxy.stores.limits import MemoryLimiter
        from vaporproxy.stores.tokens import MemoryTokenStore

        class FakeBackend:
            def __init__(self, reactor: Any) -> None:
                self.token_store = MemoryTokenStore(reactor, 300)
                self.limiter = MemoryLimiter(5, 3)
                self.client = object()  # the share store's connection (not used here)
                self.callbacks: List[Any] = []
                self.share_callbacks: List[Any] = []
                self.closed = 0

                self.started = 0

            def on_terminate(self, callback: Any) -> None:
                self.callbacks.append(callback)

            def on_share_revoked(self, callback: Any) -> None:
                self.share_callbacks.append(callback)

            def start(self) -> None:
                self.started += 1

            def close(self) -> Any:
                self.closed += 1
                return succeed(None)

        backends: List[FakeBackend] = []

        def connect_redis(tokens: Any, console: Any, reactor: Any) -> FakeBackend:
            backends.append(FakeBackend(reactor))
            return backends[-1]

        self.patch(vaporproxy.stores.redis, "connect_redis", connect_redis)
        write(self.path, CONFIG + "tokens: {backend: redis}\n")
        root = self.make()
        [backend] = backends
        self.assertEqual(backend.callbacks, [root.pieces["registry"].terminate_vm])
        self.assertEqual(backend.callbacks[0]("no-such-vm"), 0)
        self.assertEqual(backend.share_callbacks[0]("no-such-share"), 0)  # closes that share's consoles (none)
        self.assertEqual(backend.started, 0)
        root.startService()
        self.assertEqual((backend.started, backend.closed), (1, 0))
        self.successResultOf(root.stopService())
        self.assertEqual((backend.started, backend.closed), (1, 1))

    def test_workersSupervise(self) -> None:
        """
        When server.workers > 1, the process only supervises workers: no API of its own.
        """
        from vaporproxy.app.workers import WorkerSupervisor

        write(self.path, CONFIG.replace("server: {", "server: {workers: 2, ") + "tokens: {backend: redis}\n")
        root = self.make("--listen", "tcp:0:interface=127.0.0.1", "--listen", "haproxy:tcp:0:interface=127.0.0.1")
        self.assertEqual([type(s) for s in root], [WorkerSupervisor])
        supervisor = root.getServiceNamed("workers")
        self.assertEqual(supervisor.count, 2)
        command = supervisor.argv([5, 6])
        self.assertEqual(
            command[command.index("vaporproxy") + 1 :],
            ["--config", os.path.abspath(self.path), "--listen", "tcp:0:interface=127.0.0.1",
             "--listen", "haproxy:tcp:0:interface=127.0.0.1", "--worker-fds", "5,6"],
        )  # fmt: skip

    def test_workerAdoptsSockets(self) -> None:
        """
        When run as a worker, the process serves the inherited sockets instead of listening, with the PROXY wrapper where its endpoint has it.
        """
        from vaporproxy.app.workers import AdoptedPortService

        root = self.make("--worker-fds", "7,8", "--listen", "tcp:0", "--listen", "haproxy:tcp:0")
        adopted = [s for s in root if isinstance(s, AdoptedPortService)]
        self.assertEqual([(s.fd, s.proxy) for s in adopted], [(7, False), (8, True)])
        self.assertEqual([s for s in root if isinstance(s, StreamServerEndpointService)], [])
        self.assertEqual({id(s.factory) for s in adopted}, {id(root.pieces["guard"])})
        self.assertIs(root.pieces["listening"].http_factory, root.pieces["site"])

    def test_workerFdsMatchListen(self) -> None:
        """
        When a worker gets another number of descriptors than listen endpoints, the options are refused.
        """
        error = self.assertRaises(usage.UsageError, options, "--config", self.path, "--worker-fds", "7,8")
        self.assertEqual(
            str(error),
            "--worker-fds: 2 descriptors for 1 server.listen endpoints (expected one each, in order)",
        )

    def test_cleanupTimerPurges(self) -> None:
        """
        When cleanup_interval passes, expired tokens are purged by the timer.
        """
        from vaporproxy.interfaces import Grant

        root = self.make()
        store = root.pieces["token_store"]
        grant = Grant("vm", "uuid", "vnc", 0, "alice")
        root.startService()
        self.successResultOf(store.issue(grant))
        self.assertEqual(self.successResultOf(store.count()), 1)
        self.reactor.advance(361)  # past token_ttl (300s) and the next tick
        self.assertEqual(self.successResultOf(store.purge()), 0)  # the timer got it
        self.successResultOf(root.stopService())
        self.successResultOf(store.issue(grant))
        self.reactor.advance(361)  # timer stopped: nobody purges
        self.assertEqual(self.successResultOf(store.purge()), 1)

    def test_logsNvx(self) -> None:
        """
        When the service is built, whether autobahn uses NVX is logged.
        """
        events: List[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.make()
        import autobahn.websocket

        nvx = [e for e in events if "nvx" in e]
        self.assertEqual(len(nvx), 1)
        self.assertEqual(nvx[0]["nvx"], "on" if autobahn.websocket.USES_NVX else "off")

    def test_logsFeaturesOn(self) -> None:
        """
        When the config turns recording, bandwidth limits and step-up on, the start-up log names them; a plain config logs none.
        """
        from vaporproxy.app.reload import features_on
        from vaporproxy.config import parse_config

        self.assertEqual(features_on(parse_config(CONFIG)), [])
        config = parse_config(
            CONFIG.replace("max_total_connections: 3}", "max_total_connections: 3, max_bandwidth: 8}")
            + "recording: {enabled: true, dir: /srv/rec, include_input: true}\n"
            + "auth: {policies: [{vms: [prod-*], require_mfa: true}]}\n"
        )
        self.assertEqual(
            features_on(config),
            ["recording to /srv/rec (VMs *, with the browser's input)", "max_bandwidth 8 KB/s per console",
             "1 step-up policy(ies)"],
        )  # fmt: skip

    def test_envLevel(self) -> None:
        """
        When VAPOR_LOG_LEVEL is set, the service's log setup uses it over the config.
        """
        root = self.make(environ={"VAPOR_LOG_LEVEL": "debug"})
        self.assertEqual(root.log_setup.level, "debug")
        self.assertEqual(self.make().log_setup.level, "info")


class AccessLogWiringTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = write(self.mktemp(), CONFIG)
        self.reactor = ThreadingReactor()

    def test_accessLogOnByDefault(self) -> None:
        """When the config says nothing about it, the site writes the access log."""
        from vaporproxy.http.site import ConsoleSite

        root = tap.makeService(options("--config", self.path, environ={}), self.reactor)
        site = root.pieces["site"]
        self.assertIsInstance(site, ConsoleSite)
        self.assertTrue(site.access_log)

    def test_accessLogSetting(self) -> None:
        """When logging.access_log is false the site writes no access log; a SIGHUP to true turns it on."""
        write(self.path, CONFIG + "logging: {access_log: false}\n")
        root = tap.makeService(options("--config", self.path, environ={}), self.reactor)
        site = root.pieces["site"]
        self.assertFalse(site.access_log)
        write(self.path, CONFIG + "logging: {access_log: true}\n")
        self.assertTrue(root.getServiceNamed("reload").reload())
        self.assertTrue(site.access_log)


class ReloadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = write(self.mktemp(), CONFIG)
        self.reactor = ThreadingReactor()
        self.root = tap.makeService(options("--config", self.path, environ={}), self.reactor)
        self.reload = self.root.getServiceNamed("reload")
        self.limiter = self.root.pieces["limiter"]

    def admitted(self, count: int) -> int:
        """
        Try C{count} consoles of one VM; answer how many were admitted.
        """
        results = [self.limiter.acquire("vm-1", f"c{i}") for i in range(count)]
        ok = 0
        for d in results:
            if isinstance(self.successResultOf(d.addErrback(lambda f: f.value)), ConsoleError):
                continue
            ok += 1
        return ok

    def test_reloadAppliesLimits(self) -> None:
        """
        When the file changes and reload runs, the new limits apply and live leases stay.
        """
        lease = self.successResultOf(self.limiter.acquire("vm-1", "live"))
        write(self.path, CONFIG.replace("max_total_connections: 3", "max_total_connections: 2"))
        self.assertTrue(self.reload.reload())
        self.assertEqual(self.limiter.max_total, 2)
        self.assertEqual(self.admitted(3), 1)
        self.assertEqual(self.reload.config.console.max_total_connections, 2)
        lease.release()

    def test_reloadHostileLimits(self) -> None:
        """
        When the file changes the request deadline, pending caps, per-user console cap and token limits, reload applies them all.
        """
        text = CONFIG.replace("max_total_connections: 3}", "max_total_connections: 3, max_connections_per_user: 2}")
        text = text.replace('interface=127.0.0.1"]}', 'interface=127.0.0.1"], request_timeout: 5s,'
                            " max_pending_connections: 9, max_pending_per_client: 4, metrics_local: true}")
        write(self.path, text + "auth: {max_outstanding_tokens: 7, mint_rate: 1, mint_burst: 2}\n")
        self.assertTrue(self.reload.reload())
        guard = self.root.pieces["guard"]
        self.assertEqual((guard.request_timeout, guard.max_pending, guard.max_pending_per_client), (5.0, 9, 4))
        self.assertEqual(self.limiter.max_per_user, 2)
        mint = self.root.pieces["api"]._mint
        self.assertEqual((mint.max_outstanding, mint.rate, mint.burst), (7, 1.0, 2))

    def test_reloadRevokes(self) -> None:
        """
        When the file removes an API key, the token store refuses that key's grants from then on.
        """
        from vaporproxy.http.auth import key_id_of
        from vaporproxy.config import ApiKey
        from vaporproxy.interfaces import Grant

        digest = "a" * 64
        write(self.path, CONFIG + f'auth: {{api_keys: [{{user: alice, sha256: "{digest}"}}]}}\n')
        self.assertTrue(self.reload.reload())
        revocation = self.root.pieces["token_store"].revocation
        grant = Grant(vm_ref="vm", vm_uuid="u", console_type="vnc", display=0, user="alice",
                      key_id=key_id_of(ApiKey("alice", digest)))  # fmt: skip
        self.assertTrue(revocation.allows(grant))
        write(self.path, CONFIG)
        self.assertTrue(self.reload.reload())
        self.assertFalse(revocation.allows(grant))

    def test_badFileKeepsOldConfig(self) -> None:
        """
        When the file is bad on reload, the error is logged and the old config stays.
        """
        events: List[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        write(self.path, "console: {max_total_connections: none}\n")
        self.assertFalse(self.reload.reload())
        self.assertEqual(self.limiter.max_total, 3)
        self.assertEqual(self.reload.config.console.max_total_connections, 3)
        errors = [e for e in events if e.get("error")]
        self.assertEqual(
            errors[0]["error"],
            "console.max_total_connections: 'none' is not a valid integer (expected an integer >= 1)",
        )

    def test_reloadTokenTTL(self) -> None:
        """
        When token_ttl changes on reload, tokens issued from then on get the new lifetime.
        """
        store = self.root.pieces["token_store"]
        write(self.path, CONFIG.replace("max_total_connections: 3}", "max_total_connections: 3, token_ttl: 42s}"))
        self.assertTrue(self.reload.reload())
        self.assertEqual(store.ttl, 42.0)

    def test_badJWTKeyChangesNothing(self) -> None:
        """
        When a reloaded file has new limits and an unusable JWT key, nothing of it is applied.
        """
        key = write(self.mktemp(), "too-short")
        write(
            self.path,
            CONFIG.replace("max_total_connections: 3", "max_total_connections: 2")
            + f"auth: {{jwt: {{algorithms: [HS256], key_file: {key!r}}}}}\n",
        )
        self.assertFalse(self.reload.reload())
        self.assertEqual(self.limiter.max_total, 3)
        self.assertIsNone(self.reload.config.auth.jwt)

    def test_sighup(self) -> None:
        """
        When the process gets SIGHUP, the file is reloaded on the reactor thread.
        """
        self.root.startService()
        self.addCleanup(self.root.stopService)
        write(self.path, CONFIG.replace("max_connections_per_vm: 5", "max_connections_per_vm: 1"))
        os.kill(os.getpid(), signal.SIGHUP)
        self.assertEqual(self.limiter.max_per_vm, 5)  # not yet: waits for the reactor
        self.reactor.advance(0)
        self.assertEqual(self.limiter.max_per_vm, 1)

    def test_sighupHandlerRestored(self) -> None:
        """
        When the service stops, the previous SIGHUP handler is back.
        """
        before = signal.getsignal(signal.SIGHUP)
        self.root.startService()
        self.assertNotEqual(signal.getsignal(signal.SIGHUP), before)
        self.successResultOf(self.root.stopService())
        self.assertEqual(signal.getsignal(signal.SIGHUP), before)

    def test_applyReload(self) -> None:
        """
        When a config is applied, limits, hosts, API, bridge and log level all get it.
        """
        calls: List[Any] = []

        class Fake:
            def __init__(self, name: str) -> None:
                self.name = name

            def __getattr__(self, method: str) -> Any:
                return lambda *args: calls.append((self.name, method, args))

        setup = LogSetup("info", "text", io.StringIO())
        new = Config()
        apply_reload(
            new,
            limiter=Fake("limiter"),
            host_policy=Fake("hosts"),
            api=Fake("api"),
            bridge_factory=Fake("bridge"),
            log_setup=setup,
            environ={"VAPOR_LOG_LEVEL": "error"},
        )
        # The steps that may refuse the config (they load files) come first.
        self.assertEqual(
            calls,
            [
                ("api", "reload", (new,)),
                ("bridge", "reload", (new,)),
                ("limiter", "set_limits", (5, 100, 0, 0)),
                ("hosts", "set_allowed", (("localhost", "127.0.0.1", "::1"),)),
            ],
        )
        self.assertEqual(setup.level, "error")

    def restart_warnings(self, text: str) -> List[str]:
        """Reload C{text}; the settings the log says need a restart."""
        events: List[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        write(self.path, text)
        self.assertTrue(self.reload.reload(), [e.get("error") for e in events])
        return [e["keys"] for e in events if "restart to apply" in e.get("log_format", "")]

    def test_recordingTurnedOnNeedsRestart(self) -> None:
        """
        When a reload turns recording on (its store is made at start-up) or changes the audit file, the log says a restart is needed.
        """
        recordings, audit = (json.dumps(os.path.abspath(self.mktemp())) for _ in range(2))
        warned = self.restart_warnings(
            CONFIG + f"recording: {{enabled: true, dir: {recordings}}}\naudit: {{file: {audit}}}\n"
        )
        self.assertEqual(warned, ["audit.file, recording"])

    def test_recordingOffNeedsNoRestart(self) -> None:
        """
        When a reload leaves recording off, no restart is asked for.
        """
        self.assertEqual(self.restart_warnings(CONFIG + "recording: {enabled: false, dir: /elsewhere}\n"), [])

    def test_badVncTLSCertificateChangesNothing(self) -> None:
        """
        When a reloaded file has new limits and an unusable vnc_tls certificate, nothing of it is applied and the error is logged.
        """
        events: List[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        bridge_factory = self.root.pieces["bridge_factory"]
        before = bridge_factory.vnc_tls
        junk = write(self.mktemp(), "not a certificate\n")
        write(
            self.path,
            vnc_tls_config(junk).replace("max_total_connections: 3", "max_total_connections: 2"),
        )
        self.assertFalse(self.reload.reload())
        self.assertEqual(self.limiter.max_total, 3)
        self.assertIsNone(self.reload.config.hypervisors[0].vnc_tls)
        self.assertIs(bridge_factory.vnc_tls, before)
        [error] = [e["error"] for e in events if e.get("error")]
        self.assertTrue(error.startswith("hypervisors[0].vnc_tls.ca_file: "), error)

    def test_vncTLSReloaded(self) -> None:
        """
        When a reloaded file has a usable vnc_tls section, the bridge loads it for new consoles.
        """
        ca_file = write_x509_credentials(self.mktemp())["ca-cert.pem"]
        write(self.path, vnc_tls_config(ca_file))
        self.assertTrue(self.reload.reload())
        vnc_tls = self.root.pieces["bridge_factory"].vnc_tls
        self.assertEqual(list(vnc_tls), ["test:///default"])
        self.assertEqual(vnc_tls["test:///default"].config.ca_file, ca_file)


class ServiceHelpersTests(SynchronousTestCase):
    def test_poolStopsAfterClose(self) -> None:
        """
        When the thread-pool service stops, it waits for before_stop (the locator closing its connections) first.
        """
        events: List[str] = []
        closing: Deferred = Deferred()

        class Pool:
            def start(self) -> None:
                events.append("start")

            def stop(self) -> None:
                events.append("stop")

        service = ThreadPoolService(Pool(), Clock(), before_stop=lambda: closing)  # type: ignore[arg-type]
        service.startService()
        d = service.stopService()
        self.assertEqual(events, ["start"])
        closing.callback(None)
        self.successResultOf(d)
        self.assertEqual(events, ["start", "stop"])

    def test_poolStopsWhenCloseHangs(self) -> None:
        """
        When before_stop never answers, the pool still stops after close_timeout.
        """
        events: List[str] = []
        clock = Clock()

        class Pool:
            def start(self) -> None:
                pass

            def stop(self) -> None:
                events.append("stop")

        service = ThreadPoolService(Pool(), clock, before_stop=Deferred)  # type: ignore[arg-type]
        service.startService()
        d = service.stopService()
        clock.advance(service.close_timeout)
        self.successResultOf(d)
        self.assertEqual(events, ["stop"])
        self.flushLoggedErrors()

    def test_purgeNeverFails(self) -> None:
        """
        When the store's purge fails, the timer body logs it and still succeeds.
        """

        class Broken:
            def purge(self) -> Any:
                return fail(ConsoleError(ErrorCode.SERVICE_UNAVAILABLE))

        self.assertIsNone(self.successResultOf(purge_tokens(Broken())))
        self.assertEqual(len(self.flushLoggedErrors(ConsoleError)), 1)

    def test_purgeRaisesSynchronously(self) -> None:
        """
        When purge raises instead of failing a Deferred, the timer body still succeeds.
        """

        class Raising:
            def purge(self) -> Any:
                raise RuntimeError("boom")

        self.assertIsNone(self.successResultOf(purge_tokens(Raising())))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_shutdownSteps(self) -> None:
        """
        When stopped, every step runs in order even if one fails.
        """
        ran: List[str] = []

        def bad() -> None:
            ran.append("bad")
            raise RuntimeError("x")

        service = ShutdownService(lambda: ran.append("a"), bad, lambda: succeed(ran.append("c")))
        service.startService()
        self.successResultOf(service.stopService())
        self.assertEqual(ran, ["a", "bad", "c"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_staticDirs(self) -> None:
        """
        When the environment names static directories, they are used.
        """
        novnc = self.mktemp()
        os.mkdir(novnc)
        found = tap.static_dirs({"VAPOR_NOVNC_DIR": novnc, "VAPOR_SPICE_HTML5_DIR": "/nonexistent"})
        self.assertEqual(found["novnc"], novnc)
        self.assertNotEqual(found.get("spice-html5"), "/nonexistent")


class LoggingTests(SynchronousTestCase):
    def emit(self, setup: LogSetup) -> None:
        logger = Logger(namespace="vaporproxy.test", observer=setup.observer)
        logger.debug("debug event {n}", n=1)
        logger.info("info event {n}", n=2)

    def test_infoHidesDebug(self) -> None:
        """
        When the level is info, a debug event is hidden and an info event is written.
        """
        out = io.StringIO()
        self.emit(log_setup_for("info", "text", {}, None, destination=lambda _: out))
        self.assertNotIn("debug event", out.getvalue())
        self.assertIn("[vaporproxy.test#info] info event 2", out.getvalue())

    def test_envShowsDebug(self) -> None:
        """
        When VAPOR_LOG_LEVEL=debug, a debug event is written despite the config's info.
        """
        out = io.StringIO()
        self.emit(log_setup_for("info", "text", {"VAPOR_LOG_LEVEL": "debug"}, None, destination=lambda _: out))
        self.assertIn("[vaporproxy.test#debug] debug event 1", out.getvalue())

    def test_setLevel(self) -> None:
        """
        When the level is raised to error at run time, info events are hidden.
        """
        out = io.StringIO()
        setup = LogSetup("info", "text", out)
        setup.set_level("error")
        self.emit(setup)
        self.assertEqual(out.getvalue(), "")

    def test_json(self) -> None:
        """
        When the format is json, each event is one JSON object with its fields.
        """
        out = io.StringIO()
        self.emit(LogSetup("debug", "json", out))
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual([line["message"] for line in lines], ["debug event 1", "info event 2"])
        self.assertEqual(lines[1]["level"], "info")
        self.assertEqual(lines[1]["namespace"], "vaporproxy.test")
        self.assertEqual(lines[1]["n"], 2)
        self.assertTrue(lines[1]["time"].endswith("Z"))

    def test_applicationObserver(self) -> None:
        """
        When twistd parents the root service to its application, the application gets our observer.
        """
        setup = LogSetup("info", "text", io.StringIO())
        root = VaporService(setup)
        application = Application("vaporproxy")
        self.addCleanup(setup.uninstall)
        root.setServiceParent(application)
        self.assertIs(application.getComponent(ILogObserver), setup.observer)

    def test_twistdDestination(self) -> None:
        """
        When twistd runs in the foreground the log goes to stdout; with --logfile to that file.
        """
        self.assertIs(twistd_destination({"nodaemon": True, "logfile": None}), sys.stdout)
        self.assertIs(twistd_destination({"nodaemon": True, "logfile": "-"}), sys.stdout)
        path = os.path.abspath(self.mktemp())
        log_file = twistd_destination({"nodaemon": False, "logfile": path})
        self.addCleanup(log_file.close)
        self.assertIsInstance(log_file, LogFile)
        self.assertEqual(log_file.path, path)


def run_twistd(test: SynchronousTestCase, argv: List[str], environ: dict, until: str, then: Any = None) -> str:
    """
    Run C{twistd -n ... vaporproxy ARGV} logging to a file, wait until the
    log holds C{until} (calling C{then(process, logfile)} once it does, and
    waiting for C{then}'s own returned marker), stop it, answer the log.
    """
    logfile = os.path.abspath(test.mktemp())
    env = {k: v for k, v in os.environ.items() if k != "VAPOR_LOG_LEVEL"}
    env.update(environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
               "-n", "--pidfile=", "--logfile", logfile, "vaporproxy", *argv]  # fmt: skip
    process = subprocess.Popen(command, env=env, cwd=os.path.dirname(logfile) or ".",
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip

    def wait_for(marker: str) -> str:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            text = open(logfile).read() if os.path.exists(logfile) else ""
            if marker in text:
                return text
            if process.poll() is not None:
                break
            time.sleep(0.05)
        process.kill()
        process.wait()
        test.fail(f"twistd never logged {marker!r}; stderr: {process.stderr.read()!r}")

    try:
        wait_for(until)
        if then is not None:
            wait_for(then(process))
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait(10)
        process.stderr.close()
    return open(logfile).read()


class TwistdTests(SynchronousTestCase):
    def test_help(self) -> None:
        """
        When `twistd vaporproxy --help` runs with the repo on PYTHONPATH, it lists --config and --listen.
        """
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        result = subprocess.run(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "vaporproxy", "--help"],
            env=env, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("--config=", result.stdout)
        self.assertIn("--listen=", result.stdout)

    def test_levelFilteringAndReload(self) -> None:
        """
        When twistd runs at info the debug line is hidden; after SIGHUP to level debug it shows.
        """
        path = write(os.path.abspath(self.mktemp()), CONFIG)

        def reload(process: subprocess.Popen) -> str:
            write(path, CONFIG.replace("per_vm: 5", "per_vm: 4") + "logging: {level: debug}\n")
            process.send_signal(signal.SIGHUP)
            return "config: 4 consoles per VM"

        text = run_twistd(self, ["--config", path], {}, "Site starting", then=reload)
        before, _, after = text.partition("SIGHUP: reloaded")
        self.assertIn("[vaporproxy.tap#info] vaporproxy starting", before)
        self.assertNotIn("#debug]", before)
        self.assertIn("[vaporproxy.tap#debug] config: 4 consoles per VM, 3 in total", after)

    def test_envDebugJson(self) -> None:
        """
        When VAPOR_LOG_LEVEL=debug and format json, twistd writes the debug event as JSON.
        """
        path = write(os.path.abspath(self.mktemp()), CONFIG + "logging: {format: json}\n")
        text = run_twistd(self, ["--config", path], {"VAPOR_LOG_LEVEL": "debug"}, "Site starting")
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        debug = [r for r in records if r["level"] == "debug" and r["namespace"] == "vaporproxy.tap"]
        self.assertEqual(len(debug), 1)
        self.assertTrue(debug[0]["message"].startswith("config: 5 consoles per VM, 3 in total"))
