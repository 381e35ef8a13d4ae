"""
Appending to files without making the reactor wait on the disk
(DESIGN.md rule 1): the audit trail and console recordings hand their bytes
to one L{DiskWriter}, whose single thread writes them.

What the reactor does per write is a queue put and a counter update.  The
thread writes with C{writev} on the file's descriptor (no user-space
buffer: a written byte is in the kernel's page cache, so a crash of the
proxy loses nothing written), and when it is behind it joins a file's
queued writes into one call.

What waits for the thread is bounded, in one of two ways per file:

  - Backpressure (C{on_backlog}, recordings): past C{high_water} bytes
    waiting for one file, its owner is told C{on_backlog(True)} and stops
    producing (a recorded console stops reading from its VM); once the
    thread has brought the file down to C{low_water}, C{on_backlog(False)}.
    Nothing is lost while the disk makes progress.  A file paused for
    C{stall_timeout} seconds without a byte of it written is given up, and
    so is one whose owner went on producing to twice C{high_water}.
  - Otherwise (the audit trail): past C{max_pending} bytes waiting, all
    such files together, a write is refused and its file given up.

A failed write (C{ENOSPC}, C{EFBIG} under a file-size limit, C{EIO}, ...)
gives up that file too.  Giving up is reported on the reactor through the
handle's C{on_error}, after a paused file is unpaused: a slow or broken
disk costs a file, never a console or the reactor's memory.
"""

from __future__ import annotations

import errno
import os
import queue
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from twisted.application.service import Service
from twisted.logger import Logger

__all__ = ["AppendHandle", "DiskWriter"]

log = Logger(namespace="vaporproxy.filewriter")

#: What the thread is told to do.
_OPEN, _WRITE, _CLOSE, _REPLACE, _STOP = range(5)

#: The most buffers joined into one C{writev} (IOV_MAX is 1024 on Linux).
_MAX_PARTS = 512
#: The most queued operations the thread takes in one round.
_MAX_ITEMS = 4096
#: The thread's pause after a round that found more than one operation,
#: unless C{_ROUND_BYTES} already wait (then it writes on at once: a paused
#: recording waits for it, and the reactor has nothing to do meanwhile).
_BATCH_WAIT = 0.002
_ROUND_BYTES = 256 * 1024


class AppendHandle:
    """
    One file being appended to through a L{DiskWriter}.

    @ivar failed: the file was given up; later writes are ignored.
    @ivar written: bytes the thread has written to it so far.
    @ivar pending: bytes queued for it and not yet written.
    @ivar paused: its owner was told to stop producing (backpressure).
    """

    __slots__ = (
        "path", "on_error", "on_backlog", "failed", "written", "pending", "paused",
        "_writer", "_closed", "_waking", "_watch", "_seen", "_progress_at",
    )  # fmt: skip

    def __init__(
        self,
        writer: "DiskWriter",
        path: str,
        on_error: Optional[Callable[[str], None]],
        on_backlog: Optional[Callable[[bool], None]],
    ):
        self._writer = writer
        self.path = path
        self.on_error = on_error
        self.on_backlog = on_backlog
        self.failed = False
        self.written = 0
        self.pending = 0
        self.paused = False
        self._closed = False
        self._waking = False  # the thread asked the reactor to unpause it
        self._watch: Any = None  # the stall check's timer while paused
        self._seen = 0  # written at the last stall check
        self._progress_at = 0.0

    def write(self, data: bytes) -> bool:
        """
        Queue C{data}; C{False} when it was not queued (the file was given
        up before, or is given up now because too much is waiting).
        """
        return self.writev((data,))

    def writev(self, parts: Sequence[bytes]) -> bool:
        """Queue C{parts} (a record's header and its data, uncopied) as one write."""
        if self.failed or self._closed:
            return False
        return self._writer._put_write(self, parts)

    def close(self) -> None:
        """
        Close the file once everything queued before is written.
        """
        if not self._closed:
            self._closed = True
            self._writer._put(_CLOSE, self, None)


class _ThreadSide:
    """
    The writer thread's half of L{DiskWriter}: it takes what the reactor
    queued and writes it; it touches the reactor's state only through
    C{_on_reactor}.
    """

    def _run(self) -> None:
        """
        Take what is queued, all of it, and write each file's part of it
        with one C{writev} (in order per file; an open, a close or a
        replace after the writes queued before it).  After a busy round,
        wait C{_BATCH_WAIT} before the next: the reactor's puts then wake
        nobody, and the next round writes more per call (a thread woken
        per 64 KiB record cost more CPU than the writing).
        """
        while True:
            items = [self._queue.get()]
            while len(items) < _MAX_ITEMS:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if not self._round(items):
                return
            if len(items) > 1 and self._pending < _ROUND_BYTES:
                time.sleep(_BATCH_WAIT)

    def _round(self, items: List[Any]) -> bool:
        """Do C{items}; C{False} once told to stop."""
        writes: Dict[AppendHandle, List[bytes]] = {}
        for op, handle, data in items:
            if op == _WRITE:
                parts = writes.setdefault(handle, [])
                parts.extend(data)
                if len(parts) >= _MAX_PARTS:
                    self._write(handle, writes.pop(handle))
                continue
            if op == _REPLACE or op == _STOP:
                for pending, parts in writes.items():
                    self._write(pending, parts)
                writes.clear()
            elif handle in writes:
                self._write(handle, writes.pop(handle))
            if op == _STOP:
                for open_handle in list(self._files):
                    self._do(_CLOSE, open_handle, None)
                return False
            self._do(op, handle, data)
        for handle, parts in writes.items():
            self._write(handle, parts)
        return True

    def _do(self, op: int, handle: AppendHandle, data: Any) -> None:
        if op == _WRITE:
            self._write(handle, data)
        elif op == _REPLACE:
            self._replace(*data)
        elif op == _OPEN:
            try:
                self._files[handle] = os.open(handle.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            except OSError as e:
                self._fail(handle, e)
        elif op == _CLOSE:
            fd = self._files.pop(handle, None)
            if fd is not None:
                try:
                    os.close(fd)
                except OSError as e:
                    log.error("could not close {path}: {error}", path=handle.path, error=e.strerror or str(e))

    def _write(self, handle: AppendHandle, parts: List[bytes]) -> None:
        size = sum(map(len, parts))
        fd = self._files.get(handle)
        if fd is not None and not handle.failed:
            try:
                _writev_all(fd, parts, size)
                handle.written += size
            except OSError as e:
                self._fail(handle, e)
        with self._lock:
            self._pending -= size
            handle.pending -= size
            if handle.on_backlog is None:
                self._unpressured -= size
                return
            wake = handle.paused and not handle._waking and handle.pending <= self.low_water
            if wake:
                handle._waking = True
        if wake:
            self._on_reactor(self._drained, handle)

    def _replace(self, path: str, data: Union[bytes, Callable[[], bytes]]) -> None:
        temporary = path + ".tmp"
        try:
            if callable(data):
                data = data()
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(temporary, path)
        except OSError as e:
            log.error("could not write {path}: {error}", path=path, error=e.strerror or str(e))

    def _fail(self, handle: AppendHandle, error: OSError) -> None:
        """
        A write or open of C{handle}'s file failed: close what is open and
        give it up.
        """
        fd = self._files.pop(handle, None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
        self._give_up(handle, f"{error.strerror or error} ({handle.path})")


class DiskWriter(_ThreadSide, Service):
    """
    One thread appending to many files for the reactor.

    @param reactor: where errors and unpausing are reported
        (C{callFromThread}), and the stall checks' clock (C{callLater}).
    @param max_pending: the most bytes waiting for the thread, files
        without backpressure together.
    @param high_water: bytes waiting for one file with backpressure that
        pause its owner; C{low_water}: that unpause it.
    @param stall_timeout: seconds a paused file may wait without a byte
        written before it is given up.
    @param threaded: C{False} runs every operation at once in the caller
        (unit tests), or, once L{hold} was called, when L{step} says (a
        disk as slow as the test wants).
    """

    def __init__(
        self,
        reactor: Any,
        *,
        max_pending: int = 8 * 1024 * 1024,
        high_water: int = 4 * 1024 * 1024,
        low_water: int = 1024 * 1024,
        stall_timeout: float = 5.0,
        threaded: bool = True,
    ):
        self._reactor = reactor
        self.max_pending = max_pending
        self.high_water = high_water
        self.low_water = low_water
        self.stall_timeout = stall_timeout
        self._threaded = threaded
        self._queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0  # bytes waiting, all files
        self._unpressured = 0  # bytes waiting, files without backpressure
        self._thread: Optional[threading.Thread] = None
        self._files: Dict[AppendHandle, int] = {}
        self._held: Optional[List[Any]] = None

    @property
    def pending(self) -> int:
        """Bytes queued and not yet written."""
        return self._pending

    def open(
        self,
        path: str,
        *,
        flush_each: bool = False,
        on_error: Optional[Callable[[str], None]] = None,
        on_backlog: Optional[Callable[[bool], None]] = None,
    ) -> AppendHandle:
        """
        A handle appending to C{path} (created if missing, mode 0600); with
        C{on_backlog}, one with backpressure.  (C{flush_each} is what every
        handle does now: each write reaches the kernel as it is written.)
        """
        handle = AppendHandle(self, path, on_error, on_backlog)
        self._put(_OPEN, handle, None)
        return handle

    def replace(self, path: str, data: Union[bytes, Callable[[], bytes]]) -> None:
        """
        Write a small file whole, replacing C{path} atomically (a temporary
        file renamed over it), after everything queued before.  C{data} may
        be a function, called on the thread then (a recording's metadata,
        once its last record is written or given up).  A failure is logged.
        """
        self._put(_REPLACE, None, (path, data))  # type: ignore[arg-type]

    # -- tests: a disk that writes when told ---------------------------------

    def hold(self) -> None:
        """Unthreaded: queue operations from now on, until L{step} runs them."""
        self._held = []

    def step(self, count: Optional[int] = None) -> int:
        """Unthreaded and held: run the next C{count} operations (all); answer how many ran."""
        held, ran = self._held or [], 0
        while held and (count is None or ran < count):
            self._do(*held.pop(0))
            ran += 1
        return ran

    # -- the reactor's side ------------------------------------------------

    def _put_write(self, handle: AppendHandle, parts: Sequence[bytes]) -> bool:
        size = sum(map(len, parts))
        pressured = handle.on_backlog is not None
        with self._lock:
            if pressured and handle.pending + size > 2 * self.high_water:
                over, limit = True, 2 * self.high_water  # its owner did not pause
            elif not pressured and self._unpressured + size > self.max_pending:
                over, limit = True, self.max_pending
            else:
                over = pause = False
                self._pending += size
                handle.pending += size
                if not pressured:
                    self._unpressured += size
                elif not handle.paused and handle.pending > self.high_water:
                    handle.paused = pause = True
        if over:
            self._give_up(handle, f"more than {limit} bytes waiting for the disk")
            return False
        if pause:
            self._paused(handle)
        self._put(_WRITE, handle, parts)  # type: ignore[arg-type]
        return True

    def _put(self, op: int, handle: Optional[AppendHandle], data: Any) -> None:
        if not self._threaded:
            if self._held is not None:
                self._held.append((op, handle, data))
            else:
                self._do(op, handle, data)
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vaporproxy-disk", daemon=True)
            self._thread.start()
        self._queue.put((op, handle, data))

    def _on_reactor(self, f: Callable[..., None], *args: Any) -> None:
        if self._threaded and threading.current_thread() is self._thread:
            self._reactor.callFromThread(f, *args)
        else:
            f(*args)

    def _paused(self, handle: AppendHandle) -> None:
        """On the reactor: C{handle} went over the high-water mark."""
        handle._seen = handle.written
        handle._progress_at = self._reactor.seconds()
        self._watch(handle)
        handle.on_backlog(True)  # type: ignore[misc]

    def _watch(self, handle: AppendHandle) -> None:
        handle._watch = self._reactor.callLater(self.stall_timeout / 5, self._check_progress, handle)

    def _check_progress(self, handle: AppendHandle) -> None:
        """On the reactor, while paused: give the file up after C{stall_timeout} s without progress."""
        handle._watch = None
        if not handle.paused or handle.failed:
            return
        now = self._reactor.seconds()
        if handle.written != handle._seen:
            handle._seen, handle._progress_at = handle.written, now
        elif now - handle._progress_at >= self.stall_timeout:
            why = f"the disk wrote none of its {handle.pending} waiting bytes for {self.stall_timeout:g} s"
            self._give_up(handle, why)
            return
        self._watch(handle)

    def _drained(self, handle: AppendHandle) -> None:
        """On the reactor: the thread brought C{handle} down to the low-water mark."""
        with self._lock:
            handle._waking = False
            if not handle.paused or handle.pending > self.low_water:
                return
            handle.paused = False
        self._unpause(handle)

    def _unpause(self, handle: AppendHandle) -> None:
        if handle._watch is not None:
            if handle._watch.active():
                handle._watch.cancel()
            handle._watch = None
        handle.on_backlog(False)  # type: ignore[misc]

    def _give_up(self, handle: AppendHandle, why: str) -> None:
        """
        Give up C{handle}'s file and tell its owner (unpaused first), on the reactor.
        """
        if handle.failed:
            return
        handle.failed = True
        handle._closed = True
        self._put(_CLOSE, handle, None)
        self._on_reactor(self._report, handle, why)

    def _report(self, handle: AppendHandle, why: str) -> None:
        with self._lock:
            paused, handle.paused = handle.paused, False
        if paused:
            self._unpause(handle)
        if handle.on_error is not None:
            handle.on_error(why)

    def stopService(self) -> None:
        """
        Let the thread write what is queued, then end it (bounded wait).
        """
        super().stopService()
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put((_STOP, None, None))
            thread.join(10)


def _writev_all(fd: int, parts: List[bytes], size: int) -> None:
    """
    C{writev} all of C{parts}, C{_MAX_PARTS} buffers a call (a recording's
    batch of small records may hold more than IOV_MAX); after a short write
    (rare on a regular file) the rest, whose failure raises.
    """
    while len(parts) > _MAX_PARTS:
        head, parts = parts[:_MAX_PARTS], parts[_MAX_PARTS:]
        head_size = sum(map(len, head))
        _writev_all(fd, head, head_size)
        size -= head_size
    done = os.writev(fd, parts)
    if done < size:
        rest = memoryview(b"".join(parts))[done:]
        while rest:
            n = os.write(fd, rest)
            if n <= 0:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            rest = rest[n:]
