"""
Per-credential limits on minting console tokens (issue #11): a token bucket
per credential (C{auth.mint_rate} a second, bursts of C{auth.mint_burst}),
and at most C{auth.max_outstanding_tokens} unused tokens per credential.
Past either, console info answers 429 C{RATE_LIMITED} with C{Retry-After}.

The buckets live in this process (in a cluster each process has its own);
the outstanding count is the token store's: a store with C{issue_within}
(Redis) checks and mints in one step, so the cap holds across nodes; else
(memory, one thread) the count is checked, then the token minted.
"""

from __future__ import annotations

import math
from typing import Any, Awaitable, Dict, Optional

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from vaporproxy.config import AuthConfig
from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.interfaces import Grant, IssuedToken
from vaporproxy.stores.tokens import OutstandingLimit

log = Logger(namespace="vaporproxy.web.ConsoleAPI")

#: Buckets kept before full (idle) ones are forgotten: bounds memory when
#: many JWT users come and go.
MAX_BUCKETS = 4096

_TOO_MANY = "Too many unused tokens (auth.max_outstanding_tokens)"


class RateLimited(ConsoleError):
    """
    RATE_LIMITED, with the whole seconds after which a retry may succeed.
    """

    def __init__(self, retry_after: float, message: Optional[str] = None):
        super().__init__(ErrorCode.RATE_LIMITED, message)
        self.retry_after = max(1, int(math.ceil(retry_after)))


class _Bucket:
    __slots__ = ("level", "at")

    def __init__(self, level: float, at: float):
        self.level = level
        self.at = at


class MintLimits:
    """
    The mint rate and outstanding-token limits of every credential.
    """

    def __init__(self, clock: IReactorTime, auth: AuthConfig):
        self._clock = clock
        self._buckets: Dict[str, _Bucket] = {}
        self.reload(auth)

    def reload(self, auth: AuthConfig) -> None:
        self.rate = float(auth.mint_rate)
        self.burst = max(1, int(auth.mint_burst))
        self.max_outstanding = int(auth.max_outstanding_tokens)

    def take(self, key_id: str) -> None:
        """
        Spend one mint of C{key_id}'s bucket.

        @raise RateLimited: when it is empty.
        """
        if self.rate <= 0:
            return
        now = self._clock.seconds()
        bucket = self._buckets.get(key_id)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._forget_full(now)
            bucket = self._buckets[key_id] = _Bucket(float(self.burst), now)
        else:
            bucket.level = min(float(self.burst), bucket.level + (now - bucket.at) * self.rate)
            bucket.at = now
        if bucket.level < 1.0 - 1e-6:  # (clock arithmetic is not exact)
            raise RateLimited((1.0 - bucket.level) / self.rate, "Token mint rate exceeded (auth.mint_rate)")
        bucket.level -= 1.0

    def _forget_full(self, now: float) -> None:
        full = [k for k, b in self._buckets.items() if b.level + (now - b.at) * self.rate >= self.burst]
        for key_id in full:
            del self._buckets[key_id]

    def issue(self, token_store: Any, grant: Grant) -> Awaitable[IssuedToken]:
        """
        A token for C{grant} within C{max_outstanding} of its credential:
        without a cap, the store's own answer (no coroutine around it: every
        console asks for one).

        @raise RateLimited: at the cap (the retry waits for the oldest to
            expire).
        """
        if self.max_outstanding <= 0:
            return token_store.issue(grant)
        return self._issue_capped(token_store, grant)

    async def _issue_capped(self, token_store: Any, grant: Grant) -> IssuedToken:
        issue_within = getattr(token_store, "issue_within", None)
        if issue_within is None:
            await self.check_outstanding(token_store, grant.key_id or "")
            return await token_store.issue(grant)
        try:
            return await issue_within(grant, self.max_outstanding)
        except OutstandingLimit as e:
            log.debug("credential {key_id} holds {count} unused tokens; refused", key_id=grant.key_id, count=e.count)
            raise RateLimited(e.wait, _TOO_MANY) from None

    async def check_outstanding(self, token_store: Any, key_id: str) -> None:
        """
        @raise RateLimited: when C{key_id} has C{max_outstanding} unused
            tokens (the retry waits for the oldest to expire).
        """
        count_of = getattr(token_store, "outstanding", None)
        if self.max_outstanding <= 0 or count_of is None:
            return
        count, wait = await count_of(key_id)
        if count >= self.max_outstanding:
            log.debug("credential {key_id} holds {count} unused tokens; refused", key_id=key_id, count=count)
            raise RateLimited(wait, _TOO_MANY)
