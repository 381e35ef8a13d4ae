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

from typing import Any, Callable, Dict, Sequence
from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure

from vaporproxy.errors import ConsoleError, ErrorCode

__all__ = ["DEFAULT_PREFIX", "LUA_NOW_MS", "RedisClient", "parse_redis_url"]

log = Logger(namespace="vaporproxy.redis_tokens")

#: Every key vaporproxy keeps in Redis starts with this.
DEFAULT_PREFIX = "vaporproxy:"

#: Lua prologue: C{now}, Redis's own clock in milliseconds (so that node
#: clock skew cannot stretch or shrink what is scored with it).
LUA_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""


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


def _endpoint(reactor: Any, url: Dict[str, Any], timeout: float) -> Any:
    endpoint = HostnameEndpoint(reactor, url["host"], url["port"], timeout=max(1, int(timeout + 0.999)))
    if url["tls"]:
        endpoint = wrapClientTLS(optionsForClientTLS(url["host"]), endpoint)
    return endpoint


class RedisClient:
    """
    One lazy, reconnecting Redis connection with a timeout on every call.

    @ivar timeout: seconds any call may take; after that, and on any other
        failure, the call fails with C{ConsoleError(SERVICE_UNAVAILABLE)}.
    """

    def __init__(self, redis_url: str, reactor: Any, timeout: float):
        self._reactor = reactor
        self.timeout = float(timeout)
        self._url = parse_redis_url(redis_url)
        self._factory = _Factory(
            f"{self._url['host']}:{self._url['port']}",
            self._url["db"],
            1,
            isLazy=True,
            password=self._url["password"],
            username=self._url["username"],
            replyTimeout=self.timeout,
            convertNumbers=False,
        )
        self._handler = self._factory.handler
        self._connecting = False

    def connect(self) -> None:
        """
        Start connecting (and reconnecting) to Redis.  Idempotent; the first
        call does it too, so that nothing dials Redis before it is needed
        (under twistd: before the process daemonizes).
        """
        if not self._connecting:
            self._connecting = True
            self._factory.startConnecting(_endpoint(self._reactor, self._url, self.timeout))

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
            log.warn(
                "Redis {what} failed: {error}",
                what=what,
                error=f.getErrorMessage() or f.type.__name__,
            )
            raise ConsoleError(ErrorCode.SERVICE_UNAVAILABLE)

        return d.addErrback(unavailable)

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
            dbid=self._url["db"],
            password=self._url["password"],
            username=self._url["username"],
        )
        factory.startConnecting(_endpoint(self._reactor, self._url, self.timeout))
        return factory

    def close(self) -> Deferred:
        """
        Stop reconnecting and close the connection (if one was started).
        """
        self._connecting = True  # never (re)connect after this
        return self._factory.disconnect()
