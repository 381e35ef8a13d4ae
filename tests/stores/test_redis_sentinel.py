"""
Tests for C{tokens.redis_sentinel}: its configuration, the Sentinel target
(L{vaporproxy.stores.redis_sentinel}) and the replica acknowledgement of
L{vaporproxy.stores.redis_client.RedisClient}, in memory.  The failover
itself, with real processes, is C{tests.integration.test_redis_sentinel}.
"""

from __future__ import annotations

import textwrap
from typing import Any, List, Tuple

import txredisapi
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from vaporproxy.config import ConfigError, ConsoleConfig, RedisSentinelConfig, parse_config
from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.stores.redis import connect_redis
from vaporproxy.stores.redis_client import RedisClient
from vaporproxy.stores.redis_sentinel import SentinelTarget

SECRET = "s3ntinel-data-pw"
SENTINEL_SECRET = "s3ntinel-own-pw"
MASTER = "vaporproxy"

SENTINEL_CONFIG = f"""
tokens:
  backend: redis
  redis_timeout: 500ms
  redis_sentinel:
    sentinels: ["10.0.0.1:26379", "sentinel-b.example:26380", "[::1]:26381"]
    master: {MASTER}
    password: {SECRET}
    db: 3
    sentinel_password: {SENTINEL_SECRET}
    wait_replicas: 2
"""


def sentinel_config(**overrides: Any) -> RedisSentinelConfig:
    values: dict = {"sentinels": (("127.0.0.1", 26379),), "master": MASTER}
    values.update(overrides)
    return RedisSentinelConfig(**values)


class RedisSentinelConfigTests(SynchronousTestCase):
    """
    C{tokens.redis_sentinel} in vapor.conf.
    """

    def assertConfigError(self, text: str, message: str) -> None:
        error = self.assertRaises(ConfigError, parse_config, textwrap.dedent(text))
        self.assertEqual(str(error), message)

    def test_parsed(self) -> None:
        """
        When every key is given, each is parsed: sentinels as (host, port), durations, numbers.
        """
        tokens = parse_config(SENTINEL_CONFIG).tokens
        self.assertEqual(
            tokens.redis_sentinel,
            RedisSentinelConfig(
                sentinels=(("10.0.0.1", 26379), ("sentinel-b.example", 26380), ("::1", 26381)),
                master=MASTER,
                password=SECRET,
                db=3,
                sentinel_password=SENTINEL_SECRET,
                wait_replicas=2,
            ),
        )
        self.assertEqual(tokens.redis_timeout, 0.5)

    def test_defaults(self) -> None:
        """
        When only sentinels and master are given, there is no password, db 0 and one awaited replica.
        """
        config = parse_config("tokens: {backend: redis, redis_sentinel: {sentinels: ['h:1'], master: m}}")
        self.assertEqual(config.tokens.redis_sentinel, RedisSentinelConfig(sentinels=(("h", 1),), master="m"))
        self.assertIsNone(parse_config("").tokens.redis_sentinel)

    def test_required(self) -> None:
        """
        When sentinels or master is missing, the error names the key.
        """
        self.assertConfigError(
            "tokens: {backend: redis, redis_sentinel: {master: m}}",
            "tokens.redis_sentinel.sentinels: missing (expected a value)",
        )
        self.assertConfigError(
            "tokens: {backend: redis, redis_sentinel: {sentinels: ['h:1']}}",
            "tokens.redis_sentinel.master: missing (expected a value)",
        )

    def test_badAddresses(self) -> None:
        """
        When a sentinel address is not host:port, the error names its index.
        """
        expected = "(expected host:port, e.g. 10.0.0.5:26379 or [::1]:26379)"
        for bad, shown in [
            ("'h'", "'h'"),
            ("'h:0'", "'h:0'"),
            ("'h:70000'", "'h:70000'"),
            ("'::1:26379'", "'::1:26379'"),
            ("'bad host:1'", "'bad host:1'"),
            ("26379", "26379"),
        ]:
            self.assertConfigError(
                f"tokens: {{backend: redis, redis_sentinel: {{sentinels: ['h:1', {bad}], master: m}}}}",
                f"tokens.redis_sentinel.sentinels[1]: {shown} is not a host:port {expected}",
            )
        self.assertConfigError(
            "tokens: {backend: redis, redis_sentinel: {sentinels: [], master: m}}",
            "tokens.redis_sentinel.sentinels: [] is not a non-empty list (expected at least one entry)",
        )

    def test_badNumbers(self) -> None:
        """
        When db or wait_replicas is negative, the error names the key.
        """
        self.assertConfigError(
            "tokens: {backend: redis, redis_sentinel: {sentinels: ['h:1'], master: m, db: -1}}",
            "tokens.redis_sentinel.db: -1 is not a valid integer (expected an integer >= 0)",
        )
        self.assertConfigError(
            "tokens: {backend: redis, redis_sentinel: {sentinels: ['h:1'], master: m, wait_replicas: x}}",
            "tokens.redis_sentinel.wait_replicas: 'x' is not a valid integer (expected an integer >= 0)",
        )

    def test_passwordNeverShown(self) -> None:
        """
        When a password is not a string, the error hides it.
        """
        self.assertConfigError(
            "tokens: {backend: redis, redis_sentinel: {sentinels: ['h:1'], master: m, password: 12345}}",
            "tokens.redis_sentinel.password: <hidden> is not a password (expected a non-empty string, or no key)",
        )
        self.assertConfigError(
            "tokens: {backend: redis, redis_sentinel: {sentinels: ['h:1'], master: m, sentinel_password: ''}}",
            "tokens.redis_sentinel.sentinel_password: <hidden> is not a password"
            " (expected a non-empty string, or no key)",
        )

    def test_contradictions(self) -> None:
        """
        When the backend is not redis, or redis_url is given too, the error says which key conflicts.
        """
        self.assertConfigError(
            "tokens: {redis_sentinel: {sentinels: ['h:1'], master: m}}",
            "tokens.redis_sentinel: needs tokens.backend: redis (backend is memory;"
            " expected backend: redis, or no redis_sentinel)",
        )
        self.assertConfigError(
            "tokens: {backend: redis, redis_url: 'redis://h:1/0', redis_sentinel: {sentinels: ['h:1'], master: m}}",
            "tokens.redis_url: not used with tokens.redis_sentinel (expected one of them:"
            " the sentinels name the master; its password and db go in redis_sentinel)",
        )


class FakeSentinel:
    """
    Stands in for L{txredisapi.Sentinel}: records how it was made and names
    the masters it is given, one per discovery.
    """

    made: List["FakeSentinel"] = []

    def __init__(self, addresses: List[Tuple[str, int]], **kwargs: Any) -> None:
        self.addresses = addresses
        self.kwargs = kwargs
        self.answers: List[Any] = []
        self.asked: List[str] = []
        self.disconnected = 0
        FakeSentinel.made.append(self)

    def discover_master(self, name: str) -> Deferred:
        self.asked.append(name)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            d: Deferred = Deferred()
            d.errback(answer)
            return d
        return succeed(answer)

    def disconnect(self) -> Deferred:
        self.disconnected += 1
        return succeed(None)


class SentinelTargetTests(SynchronousTestCase):
    """
    L{SentinelTarget}: where the master is, asked before every connection.
    """

    def setUp(self) -> None:
        FakeSentinel.made = []
        self.patch(txredisapi, "Sentinel", FakeSentinel)
        self.reactor = MemoryReactorClock()
        self.target = SentinelTarget(
            sentinel_config(password=SECRET, sentinel_password=SENTINEL_SECRET, db=2), timeout=0.5
        )

    def test_lazy(self) -> None:
        """
        When the target is built, no sentinel is contacted; the first connection attempt does it, with the sentinels' own password.
        """
        self.assertEqual(FakeSentinel.made, [])
        endpoint = self.target.endpoint(self.reactor, 0.5)
        self.assertEqual(self.reactor.tcpClients, [])
        self.target._manager().answers.append(("127.0.0.1", 6390))
        endpoint.connect(Factory.forProtocol(Protocol))
        [sentinel] = FakeSentinel.made
        self.assertEqual(sentinel.addresses, [("127.0.0.1", 26379)])
        self.assertEqual(sentinel.kwargs["password"], SENTINEL_SECRET)
        self.assertEqual(sentinel.asked, [MASTER])

    def test_dialsTheNamedMaster(self) -> None:
        """
        When the sentinels name a new master, the next connection dials it on the injected reactor.
        """
        endpoint = self.target.endpoint(self.reactor, 0.5)
        sentinel = self.target._manager()
        sentinel.answers += [("127.0.0.1", 6390), ("127.0.0.1", 6391)]
        endpoint.connect(Factory.forProtocol(Protocol))
        endpoint.connect(Factory.forProtocol(Protocol))
        self.assertEqual([(h, p) for h, p, *_ in self.reactor.tcpClients], [("127.0.0.1", 6390), ("127.0.0.1", 6391)])
        self.assertEqual(self.target.master_address, ("127.0.0.1", 6391))

    def test_noMaster(self) -> None:
        """
        When no sentinel names a healthy master, the connection attempt fails (and is retried by the factory).
        """
        endpoint = self.target.endpoint(self.reactor, 0.5)
        self.target._manager().answers.append(txredisapi.MasterNotFoundError("No master found for vaporproxy"))
        failure = self.failureResultOf(endpoint.connect(Factory.forProtocol(Protocol)))
        failure.trap(txredisapi.MasterNotFoundError)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_commandFactory(self) -> None:
        """
        When the command connection's factory is built, it checks the master role and carries the data password and db.
        """
        factory = self.target.command_factory(0.5)
        self.assertIsInstance(factory, txredisapi.SentinelConnectionFactory)
        self.assertTrue(factory.is_master)
        self.assertEqual((factory.password, factory.dbid), (SECRET, 2))

    def test_wiredByConfig(self) -> None:
        """
        When tokens.redis_sentinel is set, the Redis backend connects through the sentinels, and not before it starts.
        """
        tokens = parse_config(SENTINEL_CONFIG).tokens
        backend = connect_redis(tokens, ConsoleConfig(), self.reactor)
        self.assertIsInstance(backend.token_store._redis._target, SentinelTarget)
        self.assertIn("master vaporproxy of sentinels 10.0.0.1:26379", backend.token_store._redis.describe())
        self.assertEqual(FakeSentinel.made, [])

    def test_describeAndClose(self) -> None:
        """
        When described, the target names the sentinels and no password; closing closes the sentinel connections for good.
        """
        text = self.target.describe()
        self.assertIn("127.0.0.1:26379", text)
        self.assertNotIn(SECRET, text)
        self.assertNotIn(SENTINEL_SECRET, text)
        self.successResultOf(self.target.close())  # never connected: nothing to close
        sentinel = self.target._manager()
        self.successResultOf(self.target.close())
        self.assertEqual(sentinel.disconnected, 1)
        # Closed for good: a late reconnection attempt asks no sentinel.
        failure = self.failureResultOf(self.target.endpoint(self.reactor, 0.5).connect(Factory.forProtocol(Protocol)))
        failure.trap(txredisapi.MasterNotFoundError)
        self.assertEqual(len(FakeSentinel.made), 1)


class FakeHandler:
    """
    Stands in for txredisapi's connection handler: answers C{WAIT} with a
    fixed number of acknowledging replicas.
    """

    def __init__(self, acks: int) -> None:
        self.acks = acks
        self.commands: List[Tuple[Any, ...]] = []

    def execute_command(self, *args: Any) -> Deferred:
        self.commands.append(args)
        return succeed(self.acks)


class ReplicatedTests(SynchronousTestCase):
    """
    L{RedisClient.replicated}: mints and redemptions wait for replicas.
    """

    def client(self, wait_replicas: int, acks: int) -> Tuple[RedisClient, FakeHandler]:
        self.patch(txredisapi, "Sentinel", FakeSentinel)
        target = SentinelTarget(sentinel_config(wait_replicas=wait_replicas), timeout=2.0)
        client = RedisClient(target, MemoryReactorClock(), 2.0)
        client._connecting = True  # no dialling in a unit test
        client._handler = handler = FakeHandler(acks)
        return client, handler

    def test_waits(self) -> None:
        """
        When replicas are connected, WAIT asks for wait_replicas of them (at most the connected ones) within half the timeout.
        """
        client, handler = self.client(wait_replicas=2, acks=1)
        self.successResultOf(client.replicated(1))
        self.assertEqual(handler.commands, [("WAIT", 1, 1000)])

    def test_tooFewAcknowledge(self) -> None:
        """
        When fewer replicas acknowledge than awaited, the call fails with SERVICE_UNAVAILABLE.
        """
        client, handler = self.client(wait_replicas=2, acks=1)
        failure = self.failureResultOf(client.replicated(2))
        self.assertEqual(failure.trap(ConsoleError), ConsoleError)
        self.assertEqual(failure.value.code, ErrorCode.SERVICE_UNAVAILABLE)

    def test_nothingToWaitFor(self) -> None:
        """
        When no replica is connected, or none is awaited, nothing is sent.
        """
        client, handler = self.client(wait_replicas=1, acks=0)
        self.successResultOf(client.replicated(0))
        client, handler = self.client(wait_replicas=0, acks=0)
        self.successResultOf(client.replicated(3))
        self.assertEqual(handler.commands, [])

    def test_directNeverWaits(self) -> None:
        """
        When the client is given a redis_url, it never sends WAIT.
        """
        client = RedisClient("redis://127.0.0.1:6390/0", MemoryReactorClock(), 2.0)
        client._connecting = True
        client._handler = handler = FakeHandler(0)
        self.successResultOf(client.replicated(2))
        self.assertEqual(handler.commands, [])
