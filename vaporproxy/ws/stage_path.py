"""
A console's policy stages and what they need from the channel (issues 9,
10): the planner's stages (view-only and clipboard filters, update pacing,
bandwidth, the recorder tap), the VM reads a throttle pauses, the update
requests a pacer sends later, the recording's start with the handshake the
browser saw and its end, and the audit trail's console events.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from twisted.logger import Logger

from vaporproxy.console.events import PolicyViolated
from vaporproxy.errors import ConsoleError

__all__ = ["StagePath"]

log = Logger(namespace="vaporproxy.bridge")


class StagePath:
    """
    The policy side of L{vaporproxy.ws.channel.ConsoleWebSocketProtocol} (a
    part of that class: it uses the console's attributes).
    """

    #: What the guard sent the browser, kept for a recording (which starts
    #: at the splice) while recording is on; C{None} otherwise.
    _handshake_copy: Optional[List[bytes]] = None
    _throttle_timer: Any = None
    #: The SPICE channel this WebSocket is, read from its guard.
    _spice_channel: Optional[Dict[str, Any]] = None
    #: The audit trail was told this console opened (so it is told it closed).
    _audited = False

    def _keep_handshake(self) -> None:
        """At connectionMade: keep the guard's bytes when consoles may be recorded."""
        planner = self.factory.planner
        if planner is not None and planner.recordings is not None:
            self._handshake_copy = []

    def _note_spice_channel(self, guard: Any) -> None:
        if getattr(guard, "channel_type", None) is not None:
            self._spice_channel = {
                "channel_type": guard.channel_type,
                "channel_id": guard.channel_id,
                "mini_header": guard.mini_header,
            }

    def _policy_stages(self, grant: Any) -> List[Any]:
        """The planner's stages of this channel (none without a planner or a grant)."""
        planner = self.factory.planner
        handshake, self._handshake_copy = self._handshake_copy, None
        if planner is None or grant is None:
            return []
        recorder = self._recorder(planner, grant)
        if grant.mode == "view" and self._record is not None and self._record.owner is self:
            self.factory.observer.view_only_opened()  # once per console: its first channel
        info = self._spice_channel or {}
        channel = recorder.open_channel(info) if recorder is not None else 0
        if recorder is not None and handshake:
            # The browser's side of the handshake (no secret: the proxy
            # offered it security None), so that a player can replay it.
            recorder.to_browser(channel, b"".join(handshake))
        pipeline = planner.plan(
            grant,
            grant.console_type,
            pause_vm=self._pause_vm,
            send_to_vm=self._send_to_vm_later,
            spice_main=info.get("channel_type") == 1,
            mini_header=bool(info.get("mini_header", True)),
            recorder=recorder,
            channel=channel,
            hold_vm=self._hold_vm,
        )
        return list(pipeline.stages) if pipeline is not None else []

    def _recorder(self, planner: Any, grant: Any) -> Any:
        record = self._record
        if record is None:
            return None
        recorder = getattr(record, "recorder", None)
        if recorder is None and record.owner is self and planner.records(grant.vm_uuid, grant.vm_name):
            recorder = record.recorder = planner.recordings.start(
                vm_id=grant.vm_uuid, vm_name=grant.vm_name, console_type=grant.console_type, user=grant.user
            )
            self.factory.observer.recording_started()
        return recorder

    def _policy_violation(self, error: Exception, side: str) -> None:
        """A stage could not frame what C{side} sent: the session closes with 4012."""
        self._input(PolicyViolated(side, str(error)))

    def _send_to_vm_later(self, data: bytes) -> None:
        """A held message's time has come (paced update requests)."""
        backend = self._backend
        if backend is not None:  # (none once the console ended)
            backend.transport.write(data)

    def _pause_vm(self, seconds: float) -> None:
        """Bandwidth: no reads from the VM for C{seconds} (never buffering)."""
        if self._backend is None or self._flow is None or self._throttle_timer is not None:
            return
        # A hold beside the valves' and the recording's: whichever lets go
        # last resumes the reads.
        self._flow.hold_vm("throttle", True)

        def resume() -> None:
            self._throttle_timer = None
            if self._backend is not None and self._flow is not None:
                self._flow.hold_vm("throttle", False)

        self._throttle_timer = self._reactor.callLater(seconds, resume)

    def _hold_vm(self, on: bool) -> None:
        """A recording's disk is behind (C{on}) or caught up: hold or let go the reads from the VM."""
        if self._backend is not None and self._flow is not None:  # (no backend once the console ended)
            self._flow.hold_vm("recording", on)

    def _stop_stages(self) -> None:
        """The console ends: no throttle timer outlives it."""
        timer, self._throttle_timer = self._throttle_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _finish_recording(self, record: Any, error: Optional[ConsoleError], sent: int) -> None:
        recorder = getattr(record, "recorder", None) if record is not None else None
        if recorder is None:
            return
        record.recorder = None
        try:
            self.factory.planner.recordings.finish(recorder, bytes_sent=sent, outcome=error.code.name if error else None)
            self.factory.observer.recording_finished(recorder.size)
        except Exception:
            log.failure("console {console_id}: finishing its recording failed", console_id=self.console_id)

    def _audit_opened(self) -> None:
        """The audit trail's console_opened (when the factory has a trail)."""
        audit = self.factory.audit
        if audit is None or self._redemption is None:
            return
        grant = self._redemption.grant
        self._audited = True
        audit.console_opened(
            console_id=self.console_id, user=grant.user, vm_uuid=grant.vm_uuid, vm_name=grant.vm_name,
            client=self._client_ip or "", console_type=grant.console_type, mode=grant.mode,
        )  # fmt: skip

    def _audit_closed(self, outcome: Any, sent: int, received: int) -> None:
        if not self._audited or self._redemption is None:
            return
        grant = self._redemption.grant
        recorder = getattr(self._record, "recorder", None)
        self.factory.audit.console_closed(
            console_id=self.console_id, user=grant.user, vm_uuid=grant.vm_uuid, vm_name=grant.vm_name,
            client=self._client_ip or "", console_type=grant.console_type, mode=grant.mode,
            bytes_to_client=sent, bytes_from_client=received, duration_s=outcome.duration_s,
            outcome=outcome.error, reason=outcome.reason, recording_id=recorder.id if recorder is not None else None,
        )  # fmt: skip
