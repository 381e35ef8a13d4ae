"""
Which stages a console gets (DESIGN.md rule 4: C{stages_for(grant,
policy)}), from its grant (mode, credential, VM) and the configuration
(C{console.clipboard}, bandwidth, update pacing, per-key overrides,
recording).  A console that needs none gets no pipeline: its bytes go
straight, at no cost per byte.

Filters are spliced only where a rule needs the stream parsed: a
view-only console, a clipboard direction turned off, a clipboard size cap
set, update pacing.  The VM's VNC stream is parsed only for the clipboard
from the VM (C{from_vm: false} or a size cap).
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any, Callable, Dict, List, Optional

from vaporproxy.config import ClipboardConfig, Config, api_key_id
from vaporproxy.relay.pacing import TokenBucket, UpdatePacer
from vaporproxy.relay.pipeline import (
    Pipeline,
    RecorderStage,
    RFBConsoleStage,
    SpiceMainStage,
    ThrottleStage,
    build,
)
from vaporproxy.relay.policy import InputPolicy
from vaporproxy.relay.rfbserver import OutputPolicy

__all__ = ["StagePlanner"]

#: A clipboard size cap that is no cap.
_NO_CAP = 2**31


class StagePlanner:
    """
    @param metrics: told about dropped messages and throttled time.
    @param recordings: the L{vaporproxy.recordings.store.RecordingStore},
        or C{None} (recording off).
    """

    def __init__(self, config: Config, clock: Any, metrics: Any, recordings: Any = None):
        self._clock = clock
        self._metrics = metrics
        self.recordings = recordings
        self._vm_buckets: Dict[str, TokenBucket] = {}
        self.reload(config)

    def reload(self, config: Config) -> None:
        """New policy for consoles opened from now on."""
        self._console = config.console
        self._recording = config.recording
        self._keys = {api_key_id(key): key for key in config.auth.api_keys}
        self._vm_buckets.clear()

    def _clipboard(self, key: Any) -> ClipboardConfig:
        if key is not None and key.clipboard is not None:
            return key.clipboard
        return self._console.clipboard

    def _bandwidth(self, key: Any) -> int:
        if key is not None and key.max_bandwidth is not None:
            return key.max_bandwidth
        return self._console.max_bandwidth

    def _dropped(self, kind: str, direction: str) -> None:
        self._metrics.policy_dropped(kind, direction)

    def holds_spice_input(self, grant: Any) -> bool:
        """
        Whether a SPICE channel of this grant needs its guard to hold the
        browser's bytes until the handshake is over (its stages filter them).
        """
        clipboard = self._clipboard(self._keys.get(grant.key_id or ""))
        return grant.mode == "view" or not clipboard.to_vm or clipboard.max_size is not None

    def records(self, vm_uuid: str, vm_name: Optional[str]) -> bool:
        """Whether consoles of this VM are recorded."""
        if self.recordings is None or not self._recording.enabled:
            return False
        return any(fnmatchcase(name, p) for p in self._recording.vms for name in (vm_uuid, vm_name) if name)

    def plan(
        self,
        grant: Any,
        console_type: str,
        *,
        pause_vm: Callable[[float], None],
        send_to_vm: Callable[[bytes], None],
        spice_main: bool = False,
        mini_header: bool = True,
        recorder: Any = None,
        channel: int = 0,
        hold_vm: Optional[Callable[[bool], None]] = None,
    ) -> Optional[Pipeline]:
        """
        The pipeline of one console channel, or C{None} when it needs none.

        @param pause_vm: stop reading from the VM for some seconds (throttle).
        @param send_to_vm: write to the VM later (paced update requests).
        @param recorder: the console's L{ConsoleRecorder}, or C{None}.
        @param hold_vm: hold (C{True}) or let go the reads from the VM
            (the recording's backpressure).
        """
        key = self._keys.get(grant.key_id or "")
        clipboard = self._clipboard(key)
        cap = clipboard.max_size if clipboard.max_size is not None else _NO_CAP
        inputs = InputPolicy(
            view_only=grant.mode == "view", clipboard_to_vm=clipboard.to_vm, clipboard_max=cap
        )
        stages: List[Any] = []
        if console_type == "vnc":
            outputs = OutputPolicy(clipboard_from_vm=clipboard.from_vm, clipboard_max=cap)
            interval = self._console.min_update_interval
            if inputs.view_only or not clipboard.to_vm or outputs.filters or interval > 0:
                pacer = UpdatePacer(interval, self._clock, send_to_vm) if interval > 0 else None
                stages.append(RFBConsoleStage(inputs, outputs if outputs.filters else None, self._dropped, pacer))
        elif spice_main and (inputs.view_only or not clipboard.to_vm or cap < _NO_CAP):
            stages.append(SpiceMainStage(inputs, mini_header, self._dropped))
        buckets = self._buckets(grant, key)
        if buckets:
            stages.append(ThrottleStage(buckets, pause_vm, self._metrics.throttled))
        if recorder is not None:
            stages.append(RecorderStage(recorder, channel, hold_vm))
        return build(stages)

    def _buckets(self, grant: Any, key: Any) -> List[TokenBucket]:
        buckets = []
        rate = self._bandwidth(key)
        if rate > 0:
            buckets.append(TokenBucket(rate, max(rate / 10, 64 * 1024), self._clock))
        per_vm = self._console.max_bandwidth_per_vm
        if per_vm > 0:
            bucket = self._vm_buckets.get(grant.vm_uuid)
            if bucket is None:
                bucket = self._vm_buckets[grant.vm_uuid] = TokenBucket(per_vm, max(per_vm / 10, 64 * 1024), self._clock)
            buckets.append(bucket)
        return buckets
