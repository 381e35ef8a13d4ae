"""
The background loops of the Redis stores (lease, SPICE session and process
figure renewals): on the injected clock, never dying of a failure.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, List

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["periodic"]

log = Logger(namespace="vaporproxy.redis_tokens")


def periodic(
    clock: IReactorTime, interval: float, what: str, job: Callable[[], Awaitable[Any]], now: bool = False
) -> LoopingCall:
    """
    A started L{LoopingCall} running C{job} every C{interval} seconds on
    C{clock} (and at once when C{now}), whose body never raises (a failure
    is logged; the loop goes on), and which skips a beat while the previous
    run is still waiting.
    """
    busy: List[bool] = [False]

    def beat() -> None:
        if busy[0]:
            return
        busy[0] = True

        def done(result: Any) -> None:
            busy[0] = False
            if isinstance(result, Failure):
                log.failure("periodic {what} failed", result, what=what)

        Deferred.fromCoroutine(_awaiting(job)).addBoth(done)

    loop = LoopingCall(beat)
    loop.clock = clock
    loop.start(interval, now=now)
    return loop


async def _awaiting(job: Callable[[], Awaitable[Any]]) -> Any:
    return await job()
