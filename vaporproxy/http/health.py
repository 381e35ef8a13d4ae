"""
Readiness (C{GET /readyz}): is the token store reachable, and every
hypervisor?  The answer is open to anyone, so it names no internal host,
socket path or key file.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple
from urllib.parse import urlsplit

from twisted.internet.defer import TimeoutError as DeferTimeoutError
from twisted.logger import Logger
from twisted.python.failure import Failure

from vaporproxy.errors import ConsoleError

READY_CHECK_TIMEOUT = 5.0
CHECK_DETAIL_MAX = 120

log = Logger(namespace="vaporproxy.web.ConsoleAPI")


async def run_check(call: Callable[[], Any], reactor: Any) -> Tuple[Optional[str], Any]:
    """
    Run one readiness check with a timeout; answer C{(error, result)}
    where C{error} is a short, client-safe string or C{None}.
    """
    try:
        d = call()
        d.addTimeout(READY_CHECK_TIMEOUT, reactor)
        return None, await d
    except ConsoleError as e:
        return e.message, None
    except DeferTimeoutError:
        log.warn("readiness check timed out after {timeout}s", timeout=READY_CHECK_TIMEOUT)
        return "timeout", None
    except Exception as e:  # noqa: BLE001 (reported, never raised)
        log.failure("readiness check failed", Failure(e))
        return "unavailable", None


async def readiness(token_store: Any, locator: Any, hypervisor_uris: Sequence[str], reactor: Any) -> Tuple[Dict[str, Any], int]:
    """
    The body and status of C{/readyz}: 200 when the token store and every
    hypervisor answer, else 503.
    """
    store_error, _ = await run_check(token_store.check, reactor)
    locator_error, hypervisors = await run_check(locator.check, reactor)
    if locator_error is not None:
        hypervisors = {uri: locator_error for uri in hypervisor_uris} or {"*": locator_error}
    hv_detail: Dict[str, str] = {}
    for uri, state in dict(hypervisors).items():
        label = public_uri(str(uri))
        if label in hv_detail:
            label = f"{label} #{len(hv_detail) + 1}"
        hv_detail[label] = str(state)[:CHECK_DETAIL_MAX]
    ready = store_error is None and all(state == "ok" for state in hv_detail.values())
    body = {"ready": ready, "checks": {"token_store": store_error or "ok", "hypervisors": hv_detail}}
    return body, 200 if ready else 503


def public_uri(uri: str) -> str:
    """
    A hypervisor URI as /readyz (open to anyone) may show it: the scheme
    only; the host, the path (a node file, C{/system} or C{/session}) and the
    query (socket paths, key files) are hidden, so nothing internal reaches
    a client.  (Two hypervisors of one scheme are told apart by number.)
    """
    parts = urlsplit(uri)
    netloc = "\N{HORIZONTAL ELLIPSIS}" if parts.netloc else ""
    path = "/\N{HORIZONTAL ELLIPSIS}" if (parts.path.strip("/") or parts.query) else parts.path
    return f"{parts.scheme}://{netloc}{path}"
