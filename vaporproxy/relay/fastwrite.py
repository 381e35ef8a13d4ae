"""
Transport internals the relay relies on, in one room (DESIGN.md rule 6):
the write-buffer high-water mark of the file descriptor under a transport,
how much it holds, the low-water hook, and writing straight to a plain TCP
socket when nothing is buffered (L{send_now}: one send instead of a
write-readiness round trip per chunk, issue #3's relay hot path).
"""

from typing import Any, Sequence, Set

from twisted.internet.abstract import FileDescriptor

__all__ = ["direct_writer", "high_water", "low_water", "low_water_off", "send_now", "write_buffered"]


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


#: Transport classes whose instances L{send_now} may write to (found from
#: a first live instance; a class not found so is checked every time).
_DIRECT_CLASSES: Set[type] = set()


def direct_writer(transport: Any) -> Any:
    """
    C{transport} when L{send_now} may write to its socket directly (a plain
    TCP connection of Twisted's, not TLS), else C{None}.
    """
    if getattr(transport, "TLS", False):
        # startTLS was called on it (VeNCrypt towards the VM): its bytes
        # must go through the TLS layer, never straight to the socket.
        return None
    cls = type(transport)
    if cls in _DIRECT_CLASSES:
        return transport
    from twisted.internet.tcp import Connection

    if isinstance(transport, Connection) and all(
        hasattr(transport, name) for name in ("socket", "dataBuffer", "offset", "_tempDataLen", "disconnecting")
    ):
        _DIRECT_CLASSES.add(cls)
        return transport
    return None


def send_now(transport: Any, chunks: Sequence[bytes]) -> None:
    """
    Write C{chunks} to the TCP C{transport} (from L{direct_writer}): straight
    to the socket when nothing is buffered before them, the rest (or, on
    any error, everything) through C{transport.write}, which keeps order,
    the high-water mark and the producer pausing that goes with it.
    """
    if (
        transport._tempDataLen
        or len(transport.dataBuffer) != transport.offset
        or transport.disconnecting
        or not transport.connected
    ):
        transport.writeSequence(chunks)
        return
    try:
        if len(chunks) == 1:
            sent = transport.socket.send(chunks[0])
        else:
            sent = transport.socket.sendmsg(chunks)
    except OSError:
        # EAGAIN, or an error that Twisted's own write path will find and
        # report as connection loss.
        transport.writeSequence(chunks)
        return
    for i, chunk in enumerate(chunks):
        n = len(chunk)
        if sent < n:
            rest = [chunk[sent:] if sent else chunk]
            rest.extend(chunks[i + 1 :])
            transport.writeSequence(rest)
            return
        sent -= n
