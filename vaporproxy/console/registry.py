"""
The live consoles of this process: what stats, C{DELETE} and shutdown see.

A console is ended through its owner channel's inputs (C{terminate},
C{shutdown}, C{revoke}: its session's inputs), never by reaching into it.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Protocol

from vaporproxy.timestamps import iso_utc

__all__ = ["ConsoleChannel", "ConsoleRecord", "ConsoleRegistry"]


class ConsoleChannel(Protocol):
    """
    What the registry needs of one WebSocket of a console.
    """

    bytes_sent: int
    bytes_received: int
    last_activity: float

    def terminate(self, message: Optional[str] = None) -> None:
        """End with 4010 SESSION_TERMINATED; C{message}: what the browser reads."""

    def shutdown(self) -> None:
        """End with 1001 (the proxy is going away)."""

    def revoke(self, message: Optional[str] = None) -> None:
        """End with 4010 SESSION_TERMINATED (its credential was revoked); C{message}: what the browser reads."""


class ConsoleRecord:
    """
    One live console of this process: its owner WebSocket (the VNC
    WebSocket or the SPICE main channel) and any SPICE channels that joined
    it.  Byte counters live on the channels (hot path); the record sums
    them.
    """

    def __init__(
        self,
        console_id: str,
        vm_id: str,
        console_type: str,
        user: str,
        started_at: float,
        owner: "ConsoleChannel",
    ):
        self.console_id = console_id
        self.vm_id = vm_id
        self.type = console_type
        self.user = user
        self.started_at = started_at
        self.owner = owner
        self.channels: List["ConsoleChannel"] = [owner]
        self.spice_session_id: Optional[int] = None
        #: Shown by stats and the control room (set by the owner at admission).
        self.vm_name: Optional[str] = None
        self.mode = "control"
        self.client: Optional[str] = None
        #: The share link this console was opened through, if any (the
        #: user is then the share's creator; stats and the control room
        #: say "via share").
        self.share_id: Optional[str] = None
        #: The console's recording (L{vaporproxy.recordings.recorder.ConsoleRecorder}), if any.
        self.recorder: Any = None
        #: SPICE channels whose main channel lives in another process: a
        #: part of a console counted there, not a console of this process.
        self.remote = False
        self._ended_sent = 0
        self._ended_received = 0
        self._ended_last = started_at

    @property
    def bytes_sent(self) -> int:
        return self._ended_sent + sum(c.bytes_sent for c in self.channels)

    @property
    def bytes_received(self) -> int:
        return self._ended_received + sum(c.bytes_received for c in self.channels)

    @property
    def last_activity(self) -> float:
        return max([self._ended_last] + [c.last_activity for c in self.channels])

    def join(self, channel: "ConsoleChannel") -> None:
        self.channels.append(channel)

    def leave(self, channel: "ConsoleChannel") -> None:
        """
        C{channel} ended: keep its bytes in the totals.
        """
        if channel in self.channels:
            self.channels.remove(channel)
            self._ended_sent += channel.bytes_sent
            self._ended_received += channel.bytes_received
            self._ended_last = max(self._ended_last, channel.last_activity)

    def as_dict(self, now: float) -> Dict[str, Any]:
        return {
            "console_id": self.console_id,
            "vm_id": self.vm_id,
            "vm_name": self.vm_name,
            "mode": self.mode,
            "client": self.client,
            "type": self.type,
            "user": self.user,
            "share_id": self.share_id,
            "channels": len(self.channels),
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "started_at": iso_utc(self.started_at),
            "duration_s": round(max(0.0, now - self.started_at), 3),
            "last_activity": iso_utc(self.last_activity),
        }


class ConsoleRegistry:
    """
    The live consoles of this process (stats, DELETE, shutdown).
    """

    def __init__(self, clock: Any):
        self._clock = clock
        self._records: Dict[str, ConsoleRecord] = {}

    def add(self, record: ConsoleRecord) -> None:
        self._records[record.console_id] = record

    def remove(self, record: ConsoleRecord) -> None:
        self._records.pop(record.console_id, None)

    def consoles(self) -> List[ConsoleRecord]:
        """
        The consoles of this process (not the SPICE channels of consoles
        whose main channel lives in another process).
        """
        return [r for r in self._records.values() if not r.remote]

    def count_by_vm(self) -> Dict[str, int]:
        counts: Dict[str, int] = {}
        for record in self.consoles():
            counts[record.vm_id] = counts.get(record.vm_id, 0) + 1
        return counts

    def spice_channels(self, vm_id: str, session_id: int) -> int:
        """
        How many WebSockets of this process belong to the SPICE console of
        C{vm_id} with C{session_id} (its main channel if here, the channels
        that joined it, and channels of it whose main channel is in another
        process).
        """
        return sum(
            len(r.channels)
            for r in self._records.values()
            if r.vm_id == vm_id and r.spice_session_id == session_id
        )

    def find_spice(self, vm_id: str, session_id: int) -> Optional[ConsoleRecord]:
        for record in self._records.values():
            if record.vm_id == vm_id and record.spice_session_id == session_id:
                return record
        return None

    def terminate_vm(self, vm_uuid: str, message: Optional[str] = None) -> int:
        """
        Close every channel of every console of C{vm_uuid} with 4010
        SESSION_TERMINATED (channels of remote consoles too), the browser
        reading C{message} (default: an administrator ended it; the
        cluster's terminate channel carries only C{DELETE}s, so a relayed
        terminate says the same); answer how many consoles of this process.
        """
        records = [r for r in self._records.values() if r.vm_id == vm_uuid]
        for record in records:
            record.owner.terminate(message)
        return sum(1 for r in records if not r.remote)

    def close_all(self) -> int:
        """
        Close every console with 1001 (the proxy is shutting down).
        """
        records = list(self._records.values())
        for record in records:
            record.owner.shutdown()
        return len(records)
