"""
The relay pipeline of one console (DESIGN.md; issue #8): the stages its
bytes go through once the guard's handshake is over.

While handshaking the guard is the only stage (the channel feeds it).  On
C{established} the channel splices in C{stages_for(grant, policy)}: with
none, L{build} answers C{None} and the bytes go straight, exactly as before
(no per-byte cost); otherwise a L{Pipeline} runs each direction's bytes
through the stages in order.  Later features (view-only, clipboard policy,
throttling, recording) are stages: files under C{relay/stages/} and a line
in L{stages_for}.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

from vaporproxy.interfaces import IRelayStage

__all__ = ["Pipeline", "build", "stages_for"]


def stages_for(grant: Any, policy: Any) -> Tuple[IRelayStage, ...]:
    """
    The stages of a console with C{grant} under C{policy} (the console
    configuration): none today, so every console relays straight.
    """
    return ()


class Pipeline:
    """
    Stages in order; each direction's bytes go through all of them, and
    stop at the first that answers nothing.
    """

    __slots__ = ("stages",)

    def __init__(self, stages: Sequence[IRelayStage]):
        self.stages = tuple(stages)

    def to_vm(self, data: bytes) -> bytes:
        for stage in self.stages:
            data = stage.to_vm(data)
            if not data:
                return b""
        return data

    def to_browser(self, data: bytes) -> bytes:
        for stage in self.stages:
            data = stage.to_browser(data)
            if not data:
                return b""
        return data

    def close(self) -> None:
        for stage in self.stages:
            stage.close()


def build(stages: Sequence[IRelayStage]) -> Optional[Pipeline]:
    """
    The pipeline of C{stages}, or C{None} when there is none (straight).
    """
    return Pipeline(stages) if stages else None
