"""
The audit trail: who opened which console, when, and what happened.

Every event is one JSON object on one line of C{audit.file} (appended and
flushed per event by the L{vaporproxy.filewriter.DiskWriter}'s thread, so
the reactor never waits on the disk) and one log event in the namespace
C{vaporproxy.audit} (with the object under the key C{audit}).

Each event has a method with the fields it may carry, so no caller can hand
a token, share secret or password to the trail: the values are the user,
the VM (uuid and name), the client address, the console's type and mode,
counts, durations and ids.  Strings from clients are JSON-escaped, so none
can start a new line of the file.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, Optional

from vaporproxy.logs import QuickLogger
from vaporproxy.timestamps import iso_utc

__all__ = ["AUDIT_EVENTS", "AuditTrail"]

#: Module level: a Logger on a class takes the class's name as namespace.
log = QuickLogger(namespace="vaporproxy.audit")

#: One compact ASCII encoder for every line (C{json.dumps} with separators
#: builds an encoder per call: a third of each line's encoding time).
_LINE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)

#: Every event the trail writes (SPEC.md "Audit trail").
AUDIT_EVENTS = (
    "token_issued",
    "console_opened",
    "console_closed",
    "share_created",
    "share_revoked",
    "sessions_terminated",
)


def _utc_ms(posix: float) -> str:
    """
    C{2026-12-04T17:30:00.123Z}: audit lines are ordered to the millisecond
    (the seconds come from the project's cached formatter).
    """
    millis = int(posix * 1000) % 1000
    return f"{iso_utc(posix)[:-1]}.{millis:03d}Z"


def _console(
    console_id: str,
    user: Optional[str],
    vm_uuid: Optional[str],
    vm_name: Optional[str],
    client: str,
    console_type: Optional[str],
    mode: str,
) -> Dict[str, Any]:
    """The fields that name a console in its opened and closed events."""
    return {
        "console_id": console_id,
        "user": user,
        "vm_uuid": vm_uuid,
        "vm_name": vm_name,
        "client": client,
        "type": console_type,
        "mode": mode,
    }


class AuditTrail:
    """
    Writes audit events to a file handle (or none) and to the log.

    @param clock: the time source of each event's C{time}.
    @param handle: an L{vaporproxy.filewriter.AppendHandle} opened with
        C{flush_each}, or C{None} when C{audit.file} is not set (the log
        still gets every event).
    @param counted: called with each event's name (metrics).
    """

    def __init__(self, clock: Any, handle: Any = None, counted: Optional[Callable[[str], None]] = None):
        self._clock = clock
        self._handle = handle
        self._counted = counted

    def _emit(self, event: str, fields: Dict[str, Any]) -> None:
        record = {"time": _utc_ms(self._clock.seconds()), "event": event}
        record.update(fields)
        if self._handle is not None:
            line = _LINE.encode(record) + "\n"
            self._handle.write(line.encode("ascii"))
        log.info("audit {event}", event=event, audit=record)
        if self._counted is not None:
            self._counted(event)

    def token_issued(
        self,
        *,
        user: str,
        vm_uuid: str,
        vm_name: Optional[str],
        client: str,
        console_type: str,
        mode: str,
        expires_at: str,
        via: str,
    ) -> None:
        """
        A console token was minted (C{via}: C{key}, C{jwt} or C{share}).
        """
        self._emit(
            "token_issued",
            {
                "user": user,
                "vm_uuid": vm_uuid,
                "vm_name": vm_name,
                "client": client,
                "type": console_type,
                "mode": mode,
                "expires_at": expires_at,
                "via": via,
            },
        )

    def console_opened(
        self,
        *,
        console_id: str,
        user: Optional[str],
        vm_uuid: Optional[str],
        vm_name: Optional[str],
        client: str,
        console_type: Optional[str],
        mode: str,
    ) -> None:
        """A console started relaying."""
        self._emit("console_opened", _console(console_id, user, vm_uuid, vm_name, client, console_type, mode))

    def console_closed(
        self,
        *,
        console_id: str,
        user: Optional[str],
        vm_uuid: Optional[str],
        vm_name: Optional[str],
        client: str,
        console_type: Optional[str],
        mode: str,
        bytes_to_client: int,
        bytes_from_client: int,
        duration_s: float,
        outcome: Optional[str],
        reason: str,
        recording_id: Optional[str] = None,
    ) -> None:
        """
        A console ended (C{outcome}: the error code, or C{None} for a
        normal close).
        """
        fields = _console(console_id, user, vm_uuid, vm_name, client, console_type, mode)
        fields.update(
            {
                "bytes_to_client": bytes_to_client,
                "bytes_from_client": bytes_from_client,
                "duration_s": round(duration_s, 3),
                "outcome": outcome,
                "reason": reason,
                "recording_id": recording_id,
            }
        )
        self._emit("console_closed", fields)

    def share_created(
        self,
        *,
        share_id: str,
        by: str,
        vm_uuid: str,
        vm_name: Optional[str],
        mode: str,
        max_uses: int,
        expires_at: str,
    ) -> None:
        """A share link was made (its id, never its secret)."""
        self._emit(
            "share_created",
            {
                "share_id": share_id,
                "by": by,
                "vm_uuid": vm_uuid,
                "vm_name": vm_name,
                "mode": mode,
                "max_uses": max_uses,
                "expires_at": expires_at,
            },
        )

    def share_revoked(self, *, share_id: str, by: str, vm_uuid: str, consoles_closed: int) -> None:
        """A share link was revoked, closing the consoles opened through it."""
        self._emit(
            "share_revoked",
            {"share_id": share_id, "by": by, "vm_uuid": vm_uuid, "consoles_closed": consoles_closed},
        )

    def sessions_terminated(self, *, by: str, vm_uuid: str, vm_name: Optional[str], count: int) -> None:
        """An admin closed every live console of a VM."""
        self._emit(
            "sessions_terminated",
            {"by": by, "vm_uuid": vm_uuid, "vm_name": vm_name, "count": count},
        )
