"""
Transport internals the relay relies on, in one room (DESIGN.md rule 6):
the write-buffer high-water mark of the file descriptor under a transport,
and how much it holds.
"""

from typing import Any

from twisted.internet.abstract import FileDescriptor

__all__ = ["high_water", "write_buffered"]


def high_water(transport: Any, size: int) -> None:
    """
    Set the write-buffer high-water mark of the file descriptor under
    C{transport} (through TLS and other protocol wrappers).
    """
    seen = 0
    while transport is not None and seen < 8:
        if isinstance(transport, FileDescriptor):
            transport.bufferSize = size
            return
        transport = getattr(transport, "transport", None)
        seen += 1


def write_buffered(transport: Any) -> int:
    """
    Bytes waiting in the write buffer of the file descriptor under
    C{transport} (0 when unknown); for tests and diagnostics.
    """
    seen = 0
    while transport is not None and seen < 8:
        if isinstance(transport, FileDescriptor):
            return len(transport.dataBuffer) - transport.offset + transport._tempDataLen
        transport = getattr(transport, "transport", None)
        seen += 1
    return 0
