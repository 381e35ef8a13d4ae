"""
The one record of how a console ended: built, logged (the "console ...
closed" line) and given to the outcome observer, once per console.
"""

from __future__ import annotations

from typing import Any, Optional

from vaporproxy.errors import ConsoleError
from vaporproxy.interfaces import Grant, Outcome
from vaporproxy.logs import QuickLogger
from vaporproxy.stores.tokens import token_log_id

__all__ = ["build_outcome", "record_outcome"]

# The bridge's namespace, kept: log filters and dashboards select on it
# (a QuickLogger: the closed line is logged for every console).
log = QuickLogger(namespace="vaporproxy.bridge")


def build_outcome(
    console_id: str,
    grant: Optional[Grant],
    error: Optional[ConsoleError],
    reason: str,
    sent: int,
    received: int,
    started_at: float,
    now: float,
) -> Outcome:
    return Outcome(
        console_id=console_id,
        vm_uuid=grant.vm_uuid if grant else None,
        console_type=grant.console_type if grant else None,
        user=grant.user if grant else None,
        bytes_sent=sent,
        bytes_received=received,
        started_at=started_at,
        duration_s=max(0.0, now - started_at),
        error=error.code.name if error is not None else None,
        reason=reason,
    )


def record_outcome(
    outcome: Outcome,
    observer: Any,
    *,
    vm_ref: Optional[str],
    token: Optional[str],
    client_ip: Optional[str],
    counted_here: bool,
) -> None:
    """
    Log C{outcome} (never the token itself, only its log id) and, for a
    console counted by this process, tell C{observer}.
    """
    log.info(
        "console {console_id} closed: vm={vm_uuid} type={console_type} user={user}"
        " token={token_id} client={client_ip} error={error} reason={reason}"
        " sent={bytes_sent} received={bytes_received} duration={duration_s:.3f}s",
        console_id=outcome.console_id,
        vm_uuid=outcome.vm_uuid or vm_ref,
        console_type=outcome.console_type,
        user=outcome.user,
        token_id=token_log_id(token) if token else None,
        client_ip=client_ip,
        error=outcome.error,
        reason=outcome.reason,
        bytes_sent=outcome.bytes_sent,
        bytes_received=outcome.bytes_received,
        duration_s=outcome.duration_s,
    )
    if not counted_here:
        return  # a channel of a console counted by another process
    try:
        observer.console_closed(outcome)
    except Exception:
        log.failure("observer.console_closed failed")
