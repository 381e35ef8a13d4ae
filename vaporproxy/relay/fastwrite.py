"""
Transport internals the relay relies on, in one room (DESIGN.md rule 6):
the write-buffer high-water mark of the file descriptor under a transport,
and how much it holds.
"""

from typing import Any

from twisted.internet.abstract import FileDescriptor

__all__ = ["high_water", "low_water", "low_water_off", "write_buffered"]


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


def _descriptor(transport: Any) -> Any:
    seen = 0
    while transport is not None and seen < 8:
        if isinstance(transport, FileDescriptor):
            return transport
        transport = getattr(transport, "transport", None)
        seen += 1
    return None


def low_water(transport: Any, low: int) -> Any:
    """
    Resume the producer of the file descriptor under C{transport} as soon
    as its write buffer is down to C{low} bytes, instead of Twisted's
    "once empty" (which leaves the pipe idle for a read round trip after
    every pause: the bimodal upstream figure of issue #8).  Twisted has no
    public hook for it: C{doWrite} is wrapped on the instance.  Answer the
    descriptor, for L{low_water_off} (which breaks the reference cycle the
    wrapper makes), or C{None} when there is no descriptor under it.
    """
    fd = _descriptor(transport)
    if fd is None:
        return None
    original = type(fd).doWrite

    def doWrite() -> Any:
        result = original(fd)
        if (
            fd.producerPaused
            and fd.producer is not None
            and len(fd.dataBuffer) - fd.offset + fd._tempDataLen <= low
        ):
            fd.producerPaused = False
            fd.producer.resumeProducing()
        return result

    fd.doWrite = doWrite
    return fd


def low_water_off(fd: Any) -> None:
    """
    Undo L{low_water} on C{fd} (the descriptor it answered).
    """
    if fd is not None:
        fd.__dict__.pop("doWrite", None)
