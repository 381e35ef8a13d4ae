"""
One-time console tokens: the in-memory L{ITokenStore}.

A token is 256 bits from L{secrets}, written as 64 lower-case hex
characters.  The store keeps only its SHA-256: the raw token exists only in
the L{IssuedToken} handed to the caller of L{MemoryTokenStore.issue}.

Redemption rules (shared with L{vaporproxy.stores.redis_tokens.RedisTokenStore}):

 1. malformed, never issued, issued for another VM, or bound to another
    client address: C{INVALID_TOKEN};
 2. consumed, with a SPICE session attached: C{Redemption(first=False,
    spice_session_id=...)} (a later channel of the same SPICE console);
 3. past its expiry: C{TOKEN_EXPIRED};
 4. consumed: C{TOKEN_ALREADY_USED};
 5. otherwise the token is consumed: C{Redemption(first=True)}.

A used token is remembered until its expiry (then removed by L{purge});
an entry with a SPICE session attached survives L{purge} until the session
is detached.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.interfaces import Grant, IssuedToken, ITokenStore, Redemption
from vaporproxy.logs import debug_enabled

__all__ = [
    "MemoryTokenStore",
    "OutstandingLimit",
    "TOKEN_BYTES",
    "is_well_formed",
    "new_token",
    "token_hash",
    "token_log_id",
]

log = Logger(namespace="vaporproxy.tokens")

#: Bytes of randomness in a token (256 bits).
TOKEN_BYTES = 32

_TOKEN_RE = re.compile(r"[0-9a-f]{64}")


def new_token() -> str:
    """
    A fresh token: 64 lower-case hex characters from L{secrets}.
    """
    return secrets.token_hex(TOKEN_BYTES)


def is_well_formed(token: object) -> bool:
    """
    Whether C{token} is a string of exactly 64 lower-case hex characters.
    """
    return isinstance(token, str) and _TOKEN_RE.fullmatch(token) is not None


def token_hash(token: str) -> str:
    """
    The lower-case hex SHA-256 of C{token}: the only form a store keeps.
    """
    return hashlib.sha256(token.encode("ascii", "replace")).hexdigest()


def token_log_id(token: str) -> str:
    """
    A short, log-safe identifier for C{token}: the first 12 hex characters
    of its SHA-256.
    """
    return token_hash(token)[:12]


class OutstandingLimit(ConsoleError):
    """
    A credential holds its most unused tokens (C{auth.max_outstanding_tokens}):
    no token is minted.

    @ivar count: its unused, unexpired tokens.
    @ivar wait: seconds until the oldest of them expires.
    """

    def __init__(self, count: int, wait: float):
        super().__init__(ErrorCode.RATE_LIMITED, "Too many unused tokens")
        self.count = count
        self.wait = wait


def bound_ip_matches(grant: Grant, client_ip: Optional[str]) -> bool:
    """
    Whether C{client_ip} may present a token issued for C{grant}: always
    when the grant is not bound to an address, else only from that address.
    """
    if grant.client_ip is None:
        return True
    return client_ip is not None and client_ip == grant.client_ip


def stamp(grant: Grant, now: float, ttl: float) -> Grant:
    """
    C{grant} with C{issued_at} and C{expires_at} filled in from C{now}.
    """
    # dataclasses.replace, without its walk over the fields' definitions
    # and the frozen __init__'s object.__setattr__ per field (every field of
    # a Grant is an init field and lives in __dict__; it has no
    # __post_init__): a copy of the instance dictionary.
    stamped = object.__new__(grant.__class__)
    fields = stamped.__dict__
    fields.update(grant.__dict__)
    fields["issued_at"] = now
    fields["expires_at"] = now + ttl
    return stamped


@dataclass
class _Entry:
    """
    What the memory store knows of one token (keyed by its SHA-256).

    @ivar used: the token was consumed.
    @ivar spice_session_id: the SPICE session attached by the console that
        consumed it, or C{None}.
    """

    grant: Grant
    used: bool = False
    spice_session_id: Optional[int] = None


@implementer(ITokenStore)
class MemoryTokenStore:
    """
    An L{ITokenStore} in this process's memory (a single node).

    Every call completes synchronously (the returned L{Deferred} has already
    fired), so redemptions are trivially atomic under the reactor's single
    thread.

    @ivar ttl: seconds a token is valid after issue.
    """

    def __init__(self, clock: IReactorTime, ttl: float):
        self._clock = clock
        self.ttl = float(ttl)
        self._entries: Dict[str, _Entry] = {}
        #: Unused tokens in order of issue (about the order of expiry), and
        #: the same by credential: counts without scanning every token.
        self._unused: "OrderedDict[str, Tuple[str, float]]" = OrderedDict()
        self._by_key: Dict[str, "OrderedDict[str, float]"] = {}

    def issue(self, grant: Grant) -> Deferred:
        token = new_token()
        digest = token_hash(token)
        stamped = stamp(grant, self._clock.seconds(), self.ttl)
        # Logged once, by the API that issues it (web.py), with its context.
        self._entries[digest] = _Entry(stamped)
        self._unspent(digest, stamped)
        return succeed(IssuedToken(token=token, grant=stamped))

    def _unspent(self, digest: str, grant: Grant) -> None:
        """
        Token C{digest} counts as outstanding (issued, or given back).
        """
        key_id = grant.key_id or ""
        self._unused[digest] = (key_id, grant.expires_at)
        self._by_key.setdefault(key_id, OrderedDict())[digest] = grant.expires_at

    def _spent(self, digest: str) -> None:
        """
        Token C{digest} no longer counts as outstanding (used or expired).
        """
        found = self._unused.pop(digest, None)
        if found is None:
            return
        mine = self._by_key.get(found[0])
        if mine is not None:
            mine.pop(digest, None)
            if not mine:
                del self._by_key[found[0]]

    def _prune(self) -> None:
        """
        Forget expired tokens at the front of the issue order (amortised
        O(1) a call: each token is pruned once).
        """
        now = self._clock.seconds()
        unused = self._unused
        while unused:
            digest, (_, expires_at) = next(iter(unused.items()))
            if expires_at > now:
                break
            self._spent(digest)

    def outstanding(self, key_id: Optional[str]) -> Deferred:
        """
        C{(count, wait)}: the unused, unexpired tokens of credential
        C{key_id}, and the seconds until the oldest of them expires.
        """
        self._prune()
        mine = self._by_key.get(key_id or "")
        if not mine:
            return succeed((0, 0.0))
        first = next(iter(mine.values()))
        return succeed((len(mine), max(0.0, first - self._clock.seconds())))

    def redeem(self, token: str, vm_ref: str, client_ip: Optional[str]) -> Deferred:
        if not is_well_formed(token):
            return fail(ConsoleError(ErrorCode.INVALID_TOKEN))
        digest = token_hash(token)
        entry = self._entries.get(digest)
        if (
            entry is None
            or not entry.grant.matches_vm(vm_ref)
            or not bound_ip_matches(entry.grant, client_ip)
        ):
            log.debug("token {token_id} refused: invalid", token_id=digest[:12])
            return fail(ConsoleError(ErrorCode.INVALID_TOKEN))
        if entry.used and entry.spice_session_id is not None:
            return succeed(
                Redemption(
                    grant=entry.grant,
                    first=False,
                    spice_session_id=entry.spice_session_id,
                )
            )
        if self._clock.seconds() >= entry.grant.expires_at:
            return fail(ConsoleError(ErrorCode.TOKEN_EXPIRED))
        if entry.used:
            log.info("token {token_id} replayed", token_id=digest[:12])
            return fail(ConsoleError(ErrorCode.TOKEN_ALREADY_USED))
        entry.used = True
        self._spent(digest)
        if debug_enabled():
            log.debug("token {token_id} redeemed", token_id=digest[:12])
        return succeed(Redemption(grant=entry.grant, first=True))

    def unredeem(self, token: str) -> Deferred:
        """
        Give back the redemption of C{token}: the console it opened was
        refused for lack of a slot (4007) before it used the VM, and a
        refused console does not spend its token (SPEC.md "Hostile
        clients").  Nothing happens to a token with a SPICE session.
        """
        entry = self._entries.get(token_hash(token)) if is_well_formed(token) else None
        if entry is not None and entry.used and entry.spice_session_id is None:
            entry.used = False
            # Counted again (behind later tokens: pruned a little late).
            self._unspent(token_hash(token), entry.grant)
        return succeed(None)

    def attach_spice_session(self, token: str, session_id: int) -> Deferred:
        entry = self._entries.get(token_hash(token)) if is_well_formed(token) else None
        if entry is None or not entry.used:
            log.warn(
                "SPICE session for unknown or unused token {token_id} not attached",
                token_id=token_log_id(token) if isinstance(token, str) else "?",
            )
            return succeed(None)
        entry.spice_session_id = int(session_id)
        return succeed(None)

    def detach_spice_session(self, token: str) -> Deferred:
        entry = self._entries.get(token_hash(token)) if is_well_formed(token) else None
        if entry is not None:
            entry.spice_session_id = None
        return succeed(None)

    def count(self) -> Deferred:
        """
        The unused, unexpired tokens, without scanning them (for /metrics).
        """
        self._prune()
        return succeed(len(self._unused))

    def purge(self) -> Deferred:
        """
        Remove expired tokens, oldest first, up to the first one still valid
        (tokens are issued in about the order they expire); an entry with a
        SPICE session attached stays (and is skipped) until it is detached.
        """
        now = self._clock.seconds()
        doomed = []
        for digest, entry in self._entries.items():
            if now < entry.grant.expires_at:
                break
            if entry.spice_session_id is None:
                doomed.append(digest)
        for digest in doomed:
            del self._entries[digest]
            self._spent(digest)
        if doomed:
            log.debug("purged {n} expired tokens", n=len(doomed))
        return succeed(len(doomed))

    def check(self) -> Deferred:
        return succeed(None)
