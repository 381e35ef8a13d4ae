"""
The connection to Redis: URL parsing, a lazy reconnecting client with a
timeout on every call, and the pub/sub connection.

Every call has a timeout (C{tokens.redis_timeout}): txredisapi's lazy
connection would otherwise wait forever while Redis is down.  Every failure
is C{ConsoleError(SERVICE_UNAVAILABLE)}: fail closed.  txredisapi uses the
global reactor internally; it stays inside the C{redis_*} modules.
Endpoints and every timer of ours use the injected reactor.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Sequence, Union
from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure

from vaporproxy.errors import ConsoleError, ErrorCode

__all__ = ["DEFAULT_PREFIX", "LUA_NOW_MS", "LUA_REPLICAS", "DirectTarget", "RedisClient", "parse_redis_url"]

log = Logger(namespace="vaporproxy.redis_tokens")

#: Every key vaporproxy keeps in Redis starts with this.
DEFAULT_PREFIX = "vaporproxy:"

#: Lua prologue: C{now}, Redis's own clock in milliseconds (so that node
#: clock skew cannot stretch or shrink what is scored with it).
LUA_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

#: Lua expression: how many replicas are connected to this master (the
#: most a C{WAIT} after the script can hope for).
LUA_REPLICAS = "tonumber(string.match(redis.call('INFO', 'replication'), 'connected_slaves:(%d+)') or '0')"


def parse_redis_url(url: str) -> Dict[str, Any]:
    """
    Split C{redis://[[user]:password@]host[:port][/db]} (or C{rediss://} for
    TLS) into C{host}, C{port}, C{db}, C{username}, C{password}, C{tls}.

    @raise ValueError: for another scheme or a bad database number.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"redis_url: unsupported scheme {parts.scheme!r} (expected redis:// or rediss://)")
    path = parts.path.strip("/")
    try:
        db = int(path) if path else 0
    except ValueError:
        raise ValueError(f"redis_url: database {path!r} is not a number") from None
    return {
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or 6379,
        "db": db,
        "username": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password is not None else None,
        "tls": parts.scheme == "rediss",
    }


class _Factory(txredisapi.RedisFactory):
    """
    txredisapi's factory with a shorter reconnection back-off: a console
    gateway should be usable again soon after Redis comes back.
    """

    initialDelay = 0.25
    maxDelay = 3.0


class _TerminateSubscriber(txredisapi.SubscriberProtocol):
    """
    The pub/sub connection: (re)subscribes on every connection and hands
    messages to its factory.
    """

    def messageReceived(self, pattern: Any, channel: str, message: str) -> None:
        self.factory.received(channel, message)


class _SubscriberFactory(_Factory):
    protocol = _TerminateSubscriber

    def __init__(self, channel: str, received: Callable[[str, str], None], **kw: Any):
        super().__init__(None, kw.pop("dbid"), 1, isLazy=True, convertNumbers=False, **kw)
        self.channel = channel
        self.received = received

    def buildProtocol(self, addr: Any) -> Any:
        p = super().buildProtocol(addr)

        def subscribe(proto: Any) -> None:
            proto.subscribe(self.channel).addErrback(
                lambda f: log.failure("could not subscribe to {channel}", f, channel=self.channel)
            )

        p.whenConnected().addCallback(subscribe)
        return p


def command_options(target: Any, timeout: float) -> Dict[str, Any]:
    """
    What every command connection to C{target} (L{DirectTarget} or a
    Sentinel's master) is built with: lazy, its credentials, replies within
    C{timeout}, numbers left as strings.
    """
    return dict(isLazy=True, password=target.password, username=target.username, replyTimeout=timeout,
                convertNumbers=False)  # fmt: skip


def _endpoint(reactor: Any, url: Dict[str, Any], timeout: float) -> Any:
    endpoint = HostnameEndpoint(reactor, url["host"], url["port"], timeout=max(1, int(timeout + 0.999)))
    if url["tls"]:
        endpoint = wrapClientTLS(optionsForClientTLS(url["host"]), endpoint)
    return endpoint


class DirectTarget:
    """
    The one Redis server of C{tokens.redis_url}.  (The other target, a
    master found through Sentinel, is
    L{vaporproxy.stores.redis_sentinel.SentinelTarget}.)

    @ivar wait_replicas: replicas that must acknowledge a write (none here).
    """

    wait_replicas = 0

    def __init__(self, redis_url: str):
        self.url = parse_redis_url(redis_url)
        self.db = self.url["db"]
        self.username = self.url["username"]
        self.password = self.url["password"]

    def endpoint(self, reactor: Any, timeout: float) -> Any:
        return _endpoint(reactor, self.url, timeout)

    def command_factory(self, timeout: float) -> txredisapi.RedisFactory:
        return _Factory(f"{self.url['host']}:{self.url['port']}", self.db, 1, **command_options(self, timeout))

    def describe(self) -> str:
        return f"{self.url['host']}:{self.url['port']}/{self.db}"

    def close(self) -> Deferred:
        return succeed(None)


class RedisClient:
    """
    One lazy, reconnecting Redis connection with a timeout on every call.

    @ivar timeout: seconds any call may take; after that, and on any other
        failure, the call fails with C{ConsoleError(SERVICE_UNAVAILABLE)}.
    """

    def __init__(self, redis_url: Union[str, Any], reactor: Any, timeout: float):
        """
        @param redis_url: a C{redis://} URL, or a target such as
            L{DirectTarget} or C{SentinelTarget} (where to connect, with
            which password and database).
        """
        self._reactor = reactor
        self.timeout = float(timeout)
        self._target = DirectTarget(redis_url) if isinstance(redis_url, str) else redis_url
        self._factory = self._target.command_factory(self.timeout)
        self._handler = self._factory.handler
        self._connecting = False

    def describe(self) -> str:
        """
        Where this client connects, for a log line (never a password).
        """
        return str(self._target.describe())

    def connect(self) -> None:
        """
        Start connecting (and reconnecting) to Redis.  Idempotent; the first
        call does it too, so that nothing dials Redis before it is needed
        (under twistd: before the process daemonizes).
        """
        if not self._connecting:
            self._connecting = True
            self._factory.startConnecting(self._target.endpoint(self._reactor, self.timeout))

    def _guard(self, what: str, call: Callable[[], Deferred]) -> Deferred:
        try:
            self.connect()
            d = call()
        except Exception:
            d = Deferred()
            d.errback(Failure())
        d.addTimeout(self.timeout, self._reactor)

        def unavailable(f: Failure) -> Failure:
            if f.check(ConsoleError):
                return f
            if "READONLY" in f.getErrorMessage():
                self._drop()
            log.warn(
                "Redis {what} failed: {error}",
                what=what,
                error=f.getErrorMessage() or f.type.__name__,
            )
            raise ConsoleError(ErrorCode.SERVICE_UNAVAILABLE)

        return d.addErrback(unavailable)

    def _drop(self) -> None:
        """
        Close the connection to a server that became a replica (a failover
        happened while it stayed up); the reconnection asks again where the
        master is.
        """
        for conn in list(self._factory.pool):
            conn.transport.loseConnection()

    def replicated(self, connected: int) -> Deferred:
        """
        Fire once the target's C{wait_replicas} replicas (at most the
        C{connected} ones, as a script's L{LUA_REPLICAS} found them) have
        every write made on this connection so far (Redis C{WAIT}); fail
        with SERVICE_UNAVAILABLE when they do not acknowledge within half
        the timeout.  Fires at once when no replica is awaited.
        """
        wanted = min(int(self._target.wait_replicas), int(connected))
        if wanted <= 0:
            return succeed(None)

        def check(acknowledged: Any) -> None:
            if int(acknowledged) < wanted:
                log.warn(
                    "Redis write acknowledged by {n} of {wanted} replicas: refused",
                    n=int(acknowledged),
                    wanted=wanted,
                )
                raise ConsoleError(ErrorCode.SERVICE_UNAVAILABLE)

        return self.execute("WAIT", wanted, max(1, int(self.timeout * 500))).addCallback(check)

    def execute(self, *args: Any) -> Deferred:
        """
        Run one Redis command.
        """
        return self._guard(str(args[0]), lambda: self._handler.execute_command(*args))

    def eval(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Deferred:
        """
        Run a Lua script (by SHA once Redis knows it).
        """
        return self._guard("script", lambda: self._handler.eval(script, list(keys), [str(a) for a in args]))

    def subscribe(self, channel: str, received: Callable[[str, str], None]) -> "_SubscriberFactory":
        """
        Open a separate, reconnecting pub/sub connection subscribed to
        C{channel}; C{received(channel, message)} is called for each message.
        (It connects at once, whether or not L{connect} was called.)
        """
        factory = _SubscriberFactory(
            channel,
            received,
            dbid=self._target.db,
            password=self._target.password,
            username=self._target.username,
        )
        factory.startConnecting(self._target.endpoint(self._reactor, self.timeout))
        return factory

    def close(self) -> Deferred:
        """
        Stop reconnecting and close the connection (if one was started).
        """
        self._connecting = True  # never (re)connect after this
        closing = [self._factory.disconnect(), self._target.close()]
        return DeferredList(closing, consumeErrors=True).addCallback(lambda _: None)
