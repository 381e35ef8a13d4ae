"""
Redis behind Sentinel (C{tokens.redis_sentinel}): the master is whichever
server the sentinels name, asked again before every (re)connection, so that
after a failover the clients find the promoted replica by themselves.

It uses txredisapi's Sentinel support: L{txredisapi.Sentinel} asks every
sentinel (C{SENTINEL MASTERS}) and takes the first answer that names a
master neither down nor being failed over; the command connection speaks
txredisapi's C{SentinelRedisProtocol}, which checks C{ROLE} on connecting
and hangs up on a server that is not (or no longer) the master.

Replication is asynchronous: the writes that matter (a mint, a redemption)
are followed by C{WAIT wait_replicas}, and answer SERVICE_UNAVAILABLE when
the replicas do not acknowledge, so a redemption a client was told about
survives the master's death on a replica.  (See docs/scale-out.md for what
this does not cover.)
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import txredisapi
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from vaporproxy.config import RedisSentinelConfig
from vaporproxy.stores.redis_client import command_options

__all__ = ["SentinelTarget"]

log = Logger(namespace="vaporproxy.redis_tokens")


class _MasterFactory(txredisapi.SentinelConnectionFactory):
    """
    txredisapi's Sentinel connection factory (role check on connect) with a
    back-off capped like the direct one's.
    """

    maxDelay = 3.0


@implementer(IStreamClientEndpoint)
class _MasterEndpoint:
    """
    Asks the sentinels where the master is, then dials it on the injected
    reactor.
    """

    def __init__(self, target: "SentinelTarget", reactor: Any, timeout: float):
        self._target = target
        self._reactor = reactor
        self._timeout = max(1, int(timeout + 0.999))

    def connect(self, protocolFactory: Any) -> Deferred:
        d = self._target.discover()

        def dial(address: Tuple[str, int]) -> Deferred:
            host, port = address
            return HostnameEndpoint(self._reactor, host, port, timeout=self._timeout).connect(protocolFactory)

        return d.addCallback(dial)


class SentinelTarget:
    """
    The master of C{config.master}, as the sentinels of C{config} name it.

    @ivar wait_replicas: replicas that must acknowledge a mint or a
        redemption (C{WAIT}) before it is answered.
    @ivar master_address: where the last discovery found the master.
    """

    def __init__(self, config: RedisSentinelConfig, timeout: float):
        self.config = config
        self.wait_replicas = config.wait_replicas
        self.db = config.db
        self.username = config.username
        self.password = config.password
        self._timeout = float(timeout)
        self._sentinel: Optional[txredisapi.Sentinel] = None
        self._closed = False
        self.master_address: Optional[Tuple[str, int]] = None

    def _manager(self) -> txredisapi.Sentinel:
        """
        The connections to the sentinels, made on first use (not before the
        process runs: twistd may fork in between).
        """
        if self._sentinel is None:
            self._sentinel = txredisapi.Sentinel(
                [tuple(address) for address in self.config.sentinels],
                password=self.config.sentinel_password,
                replyTimeout=self._timeout,
            )
            # A discovery that finds no healthy master (the old one is down,
            # no replica promoted yet) fails after this; the connection then
            # retries with a fresh one.
            self._sentinel.discovery_timeout = self._timeout
        return self._sentinel

    def discover(self) -> Deferred:
        """
        The master's C{(host, port)}, as the first sentinel with a healthy
        one answers; fails with L{txredisapi.MasterNotFoundError}.
        """
        if self._closed:
            return fail(txredisapi.MasterNotFoundError("closed"))
        d = self._manager().discover_master(self.config.master)

        def found(address: Tuple[str, int]) -> Tuple[str, int]:
            address = (str(address[0]), int(address[1]))
            if address != self.master_address:
                log.info(
                    "Redis master {master} is at {host}:{port} (said the sentinels)",
                    master=self.config.master,
                    host=address[0],
                    port=address[1],
                )
                self.master_address = address
            return address

        def not_found(f: Failure) -> Failure:
            log.warn(
                "no sentinel names a healthy master {master} (failover under way?): {error}",
                master=self.config.master,
                error=f.getErrorMessage() or f.type.__name__,
            )
            return f

        return d.addCallbacks(found, not_found)

    def endpoint(self, reactor: Any, timeout: float) -> _MasterEndpoint:
        return _MasterEndpoint(self, reactor, timeout)

    def command_factory(self, timeout: float) -> txredisapi.RedisFactory:
        return _MasterFactory(
            sentinel_manager=None,  # discovery is the endpoint's job here
            service_name=self.config.master,
            is_master=True,
            uuid=None,
            dbid=self.db,
            poolsize=1,
            **command_options(self, timeout),
        )

    def describe(self) -> str:
        sentinels = ",".join(f"{host}:{port}" for host, port in self.config.sentinels)
        return f"master {self.config.master} of sentinels {sentinels}, db {self.db}"

    def close(self) -> Deferred:
        """
        Close the connections to the sentinels.
        """
        self._closed = True
        sentinel, self._sentinel = self._sentinel, None
        if sentinel is None:
            return succeed(None)
        return sentinel.disconnect()
