"""
The relay pipeline (DESIGN.md rule 4): stages spliced between the browser
and the VM once a console's handshake is over.

A stage (L{vaporproxy.interfaces.IRelayStage}) sees the bytes of each
direction in order, and answers what goes on: the same bytes (pass),
fewer (drop or hold) or a copy to somewhere else (tap).  It never buffers
more than a message header or a bounded held message.  A console with no
stage has no pipeline at all: its bytes go straight, as before.

L{stages_for} picks a console's stages from its grant and the policy:
view-only and clipboard filters (VNC: L{RFBConsoleStage}; SPICE main
channel: L{SpiceMainStage}), the FramebufferUpdateRequest pacer, the
bandwidth throttle and the recorder tap.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple

from zope.interface import implementer

from vaporproxy.interfaces import IRelayStage
from vaporproxy.relay.policy import InputPolicy
from vaporproxy.relay.rfbclient import RFBClientFilter
from vaporproxy.relay.rfbserver import OutputPolicy, RFBServerFilter, restrict_encodings
from vaporproxy.relay.spiceclient import SpiceMainFilter

__all__ = ["Pipeline", "RFBConsoleStage", "RecorderStage", "SpiceMainStage", "ThrottleStage", "build", "stages_for"]


class Pipeline:
    """
    Stages in order from the browser to the VM: bytes to the VM pass them
    first to last, bytes to the browser last to first.  A stage that
    answers nothing ends that chunk's way.
    """

    def __init__(self, stages: Sequence[Any]):
        self.stages = list(stages)
        self._back = list(reversed(self.stages))

    def to_vm(self, data: bytes) -> bytes:
        for stage in self.stages:
            data = stage.to_vm(data)
            if not data:
                return b""
        return data

    def to_browser(self, data: bytes) -> bytes:
        for stage in self._back:
            data = stage.to_browser(data)
            if not data:
                return b""
        return data

    def close(self) -> None:
        for stage in self.stages:
            stage.close()


@implementer(IRelayStage)
class RFBConsoleStage:
    """
    A VNC console's policy: the browser's messages through
    L{RFBClientFilter} (view-only, clipboard to the VM, update pacing) and,
    when the clipboard from the VM is limited, the VM's through
    L{RFBServerFilter}, whose framing needs the encodings restricted to
    what it can frame and the pixel format the browser set.

    The first bytes from the VM after the handshake are its ServerInit
    (the proxy forwarded the browser's ClientInit last): the stage reads
    the pixel format there, then frames the rest.

    @param dropped: called with C{(kind, direction)} for each dropped
        message (metrics).
    """

    def __init__(
        self,
        inputs: InputPolicy,
        outputs: Optional[OutputPolicy],
        dropped: Callable[[str, str], None],
        pacer: Any = None,
    ):
        self._server: Optional[RFBServerFilter] = None
        self._outputs = outputs
        self._server_init = b"" if outputs is not None and outputs.filters else None
        self._dropped = dropped
        self._client = RFBClientFilter(
            inputs,
            lambda kind: dropped(kind, "to_vm"),
            pacer,
            encodings=restrict_encodings if self._server_init is not None else None,
            pixel_format=self._pixel_format,
        )

    def _pixel_format(self, pixel_format: bytes) -> None:
        if self._server is not None:
            self._server.set_pixel_format(pixel_format)

    def to_vm(self, data: bytes) -> bytes:
        return self._client.feed(data)

    def to_browser(self, data: bytes) -> bytes:
        if self._server is not None:
            return self._server.feed(data)
        if self._server_init is None:
            return data
        # ServerInit: width, height (4), pixel format (16), name length (4), name.
        held = self._server_init + data
        if len(held) < 24 or len(held) < 24 + int.from_bytes(held[20:24], "big"):
            self._server_init = held
            return b""
        end = 24 + int.from_bytes(held[20:24], "big")
        self._server_init = None
        self._server = RFBServerFilter(self._outputs, held[4:20], lambda kind: self._dropped(kind, "from_vm"))
        return held[:end] + self._server.feed(held[end:])

    def close(self) -> None:
        self._client.close()


@implementer(IRelayStage)
class SpiceMainStage:
    """A SPICE main channel's policy: the browser's agent messages filtered."""

    def __init__(self, inputs: InputPolicy, mini_header: bool, dropped: Callable[[str, str], None]):
        self._filter = SpiceMainFilter(inputs, mini_header, lambda kind: dropped(kind, "to_vm"))

    def to_vm(self, data: bytes) -> bytes:
        return self._filter.feed(data)

    def to_browser(self, data: bytes) -> bytes:
        return data

    def close(self) -> None:
        pass


@implementer(IRelayStage)
class ThrottleStage:
    """
    Bandwidth from the VM (SPEC.md "Bandwidth"): every chunk passes, then
    reads from the VM pause for as long as the buckets (the console's, the
    VM's) say.  Never buffers.

    @param pause: C{pause(seconds)}: stop reading from the VM that long.
    """

    def __init__(self, buckets: Sequence[Any], pause: Callable[[float], None], throttled: Callable[[float], None]):
        self._buckets = list(buckets)
        self._pause = pause
        self._throttled = throttled

    def to_vm(self, data: bytes) -> bytes:
        return data

    def to_browser(self, data: bytes) -> bytes:
        size = len(data)
        delay = max(bucket.consume(size) for bucket in self._buckets)
        if delay > 0:
            self._throttled(delay)
            self._pause(delay)
        return data

    def close(self) -> None:
        pass


@implementer(IRelayStage)
class RecorderStage:
    """
    The recorder tap: a copy of what the browser receives (and, with
    C{include_input}, of what it sends) to a console's recording.

    @param hold_vm: C{hold_vm(True)} stops this channel's reads from the
        VM, C{hold_vm(False)} lets them go: attached to the recorder, which
        holds them while its disk is behind (backpressure, never a lost
        record).  Without it nothing holds the console: a disk that falls
        behind costs the recording (at twice the writer's high-water mark).
    """

    def __init__(self, recorder: Any, channel: int, hold_vm: Optional[Callable[[bool], None]] = None):
        self._recorder = recorder
        self._channel = channel
        self._hold_vm = hold_vm
        if hold_vm is not None:
            recorder.attach(hold_vm)

    def to_vm(self, data: bytes) -> bytes:
        self._recorder.from_browser(self._channel, data)
        return data

    def to_browser(self, data: bytes) -> bytes:
        self._recorder.to_browser(self._channel, data)
        return data

    def close(self) -> None:
        if self._hold_vm is not None:
            self._recorder.detach(self._hold_vm)
        self._recorder.close_channel(self._channel)


def build(stages: Sequence[Any]) -> Optional[Pipeline]:
    """A pipeline of C{stages}, or C{None} when there are none (bytes go straight)."""
    return Pipeline(stages) if stages else None


def stages_for(grant: Any, policy: Any) -> Tuple[Any, ...]:
    """
    The factory's fixed stages of every console (none by default; tests and
    deployments may set C{factory.stages_for}); the policy's own stages
    come from L{vaporproxy.relay.planner.StagePlanner}.
    """
    return ()
