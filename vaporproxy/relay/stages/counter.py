"""
A stage that counts the bytes of each direction and passes them unchanged:
the smallest stage, and the per-console figures metrics and stats read.
"""

from __future__ import annotations

from zope.interface import implementer

from vaporproxy.interfaces import IRelayStage

__all__ = ["ByteCounter"]


@implementer(IRelayStage)
class ByteCounter:
    """
    Bytes towards the VM (C{to_vm_bytes}) and towards the browser
    (C{to_browser_bytes}), and how many chunks of each.
    """

    __slots__ = ("to_vm_bytes", "to_browser_bytes", "to_vm_chunks", "to_browser_chunks", "closed")

    def __init__(self) -> None:
        self.to_vm_bytes = self.to_browser_bytes = 0
        self.to_vm_chunks = self.to_browser_chunks = 0
        self.closed = False

    def to_vm(self, data: bytes) -> bytes:
        self.to_vm_bytes += len(data)
        self.to_vm_chunks += 1
        return data

    def to_browser(self, data: bytes) -> bytes:
        self.to_browser_bytes += len(data)
        self.to_browser_chunks += 1
        return data

    def close(self) -> None:
        self.closed = True
