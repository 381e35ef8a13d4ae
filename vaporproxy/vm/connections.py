"""
The libvirt connections of the locator: one cached read-write connection
per hypervisor URI, opened lazily, reopened once when a call fails with a
connection-level error, and not retried for a while after a failed open.
Everything here blocks: it runs on the locator's thread pool.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

from vaporproxy.config import HypervisorConfig

_T = TypeVar("_T")

#: libvirt error codes and domains that mean "the connection is broken".
_CONNECTION_ERROR_CODES = frozenset(
    {
        5,  # VIR_ERR_NO_CONNECT
        6,  # VIR_ERR_INVALID_CONN
        38,  # VIR_ERR_SYSTEM_ERROR
        39,  # VIR_ERR_RPC
        86,  # VIR_ERR_AUTH_CANCELLED
    }
)
_CONNECTION_ERROR_DOMAINS = frozenset(
    {
        7,  # VIR_FROM_RPC
        13,  # VIR_FROM_REMOTE
    }
)


def error_code(error: Exception) -> Tuple[Optional[int], Optional[int]]:
    """The C{(code, domain)} of a libvirt error (C{None}s for other errors)."""
    get_code = getattr(error, "get_error_code", None)
    get_domain = getattr(error, "get_error_domain", None)
    return (get_code() if get_code else None, get_domain() if get_domain else None)


class HypervisorFailed(Exception):
    """
    A hypervisor could not answer (log-only detail in C{args[0]}).
    """

    def __init__(self, detail: str, short: str):
        super().__init__(detail)
        self.detail = detail
        self.short = short


@dataclass
class Slot:
    """
    The cached connection of one hypervisor URI and the lock guarding it.
    """

    config: HypervisorConfig
    lock: threading.Lock
    conn: Any = None
    #: After a failed open, no new attempt before this time (fail fast).
    retry_at: float = 0.0
    last_error: str = ""


class Connections:
    """
    The cached connection of every configured hypervisor, in order.

    @param seconds: the clock (the reactor's C{seconds}).
    @param log_from_pool: C{(level, format, **kw)}: logs on the reactor thread.
    """

    def __init__(
        self,
        hypervisors: Sequence[HypervisorConfig],
        libvirt_module: Any,
        seconds: Callable[[], float],
        reopen_backoff: float,
        log_from_pool: Callable[..., None],
    ):
        self._libvirt = libvirt_module
        self._seconds = seconds
        self._reopen_backoff = reopen_backoff
        self._log_from_pool = log_from_pool
        self.slots: Dict[str, Slot] = {}
        self.order: List[str] = []
        for hv in hypervisors:
            if hv.uri in self.slots:
                continue
            self.slots[hv.uri] = Slot(config=hv, lock=threading.Lock())
            self.order.append(hv.uri)

    def is_connection_error(self, error: Exception) -> bool:
        code, domain = error_code(error)
        return code in _CONNECTION_ERROR_CODES or domain in _CONNECTION_ERROR_DOMAINS

    def connection(self, uri: str) -> Any:
        """
        The cached live connection of C{uri}, opened (read-write) if needed.
        """
        slot = self.slots[uri]
        with slot.lock:
            conn = slot.conn
            if conn is not None:
                try:
                    alive = conn.isAlive()
                except self._libvirt.libvirtError:
                    alive = False
                if alive:
                    return conn
                self._log_from_pool("info", "connection to {uri} is no longer alive; reopening", uri=uri)
                self._close_quietly(conn)
                slot.conn = None
            now = self._seconds()
            if now < slot.retry_at:
                raise HypervisorFailed(
                    f"not retrying for {slot.retry_at - now:.1f}s after: {slot.last_error}",
                    "unreachable",
                )
            error = "cannot open: no connection"
            try:
                conn = self._libvirt.open(uri)
            except self._libvirt.libvirtError as e:
                conn, error = None, f"cannot open: {e}"
            if conn is None:
                slot.last_error = error
                slot.retry_at = self._seconds() + self._reopen_backoff
                raise HypervisorFailed(slot.last_error, "unreachable")
            slot.retry_at, slot.last_error = 0.0, ""
            slot.conn = conn
            self._log_from_pool("info", "connected to hypervisor {uri}", uri=uri)
            return conn

    def _close_quietly(self, conn: Any) -> None:
        try:
            conn.close()
        except Exception:
            pass

    def drop(self, uri: str, conn: Any) -> None:
        """
        Forget (and close) the cached connection of C{uri} if it is C{conn}
        (any connection when C{conn} is C{None}).
        """
        slot = self.slots[uri]
        with slot.lock:
            if slot.conn is not None and (conn is None or slot.conn is conn):
                self._close_quietly(slot.conn)
                slot.conn = None

    def with_connection(self, uri: str, action: Callable[[Any], _T]) -> _T:
        """
        Run C{action(conn)}; on a connection-level error close the
        connection, reopen it once and retry.
        """
        conn = self.connection(uri)
        try:
            return action(conn)
        except self._libvirt.libvirtError as e:
            if not self.is_connection_error(e):
                raise
            self._log_from_pool(
                "warn", "connection to {uri} broke ({error}); reconnecting", uri=uri, error=str(e)
            )
            self.drop(uri, conn)
        conn = self.connection(uri)
        try:
            return action(conn)
        except self._libvirt.libvirtError as e:
            if self.is_connection_error(e):
                self.drop(uri, conn)
                raise HypervisorFailed(f"connection failed after reconnecting: {e}", "unreachable") from None
            raise
