"""
Appending to files without making the reactor wait on the disk
(DESIGN.md rule 1): the audit trail and console recordings hand their bytes
to one L{DiskWriter}, whose single thread writes and flushes them.

What the reactor does per write is a queue put and a counter update.  The
bytes waiting for the thread are bounded (C{max_pending}): past it a write
is refused and its file is given up (a slow or full disk costs a file, never
the reactor's memory or a console).  A failed write (C{ENOSPC}, C{EFBIG}
under a file-size limit, ...) gives up that file too and is reported on the
reactor through the handle's C{on_error}.

Flushing: a handle opened with C{flush_each} is flushed after every write
(the audit trail: one event, one flush); the others are flushed whenever
the thread's queue runs empty and at least every C{flush_interval} seconds
(recordings: a crash leaves everything up to the last second on disk).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import Any, Callable, Dict, Optional

from twisted.application.service import Service
from twisted.logger import Logger

__all__ = ["AppendHandle", "DiskWriter"]

log = Logger(namespace="vaporproxy.filewriter")

#: What the thread is told to do.
_OPEN, _WRITE, _CLOSE, _REPLACE, _STOP = range(5)


class AppendHandle:
    """
    One file being appended to through a L{DiskWriter}.

    @ivar failed: the file was given up (a write failed, or too much was
        waiting); later writes are ignored.
    @ivar written: bytes the thread has written to it so far.
    """

    __slots__ = ("path", "flush_each", "on_error", "failed", "written", "_writer", "_closed")

    def __init__(
        self, writer: "DiskWriter", path: str, flush_each: bool, on_error: Optional[Callable[[str], None]]
    ):
        self._writer = writer
        self.path = path
        self.flush_each = flush_each
        self.on_error = on_error
        self.failed = False
        self.written = 0
        self._closed = False

    def write(self, data: bytes) -> bool:
        """
        Queue C{data}; C{False} when it was not queued (the file was given
        up before, or is given up now because too much is waiting).
        """
        if self.failed or self._closed or not data:
            return not self.failed and not self._closed
        return self._writer._put_write(self, data)

    def close(self) -> None:
        """
        Close the file once everything queued before is written.
        """
        if not self._closed:
            self._closed = True
            self._writer._put(_CLOSE, self, None)


class DiskWriter(Service):
    """
    One thread appending to many files for the reactor.

    @param reactor: where errors are reported (C{callFromThread}).
    @param max_pending: the most bytes waiting for the thread, all files
        together.
    @param flush_interval: the longest a written byte waits for a flush.
    @param threaded: C{False} runs every operation at once in the caller
        (unit tests); the behaviour is otherwise the same.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        max_pending: int = 8 * 1024 * 1024,
        flush_interval: float = 1.0,
        threaded: bool = True,
    ):
        self._reactor = reactor
        self.max_pending = max_pending
        self.flush_interval = flush_interval
        self._threaded = threaded
        self._queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0
        self._thread: Optional[threading.Thread] = None
        self._files: Dict[AppendHandle, Any] = {}
        self._dirty: Dict[AppendHandle, None] = {}
        self._last_flush = time.monotonic()

    @property
    def pending(self) -> int:
        """Bytes queued and not yet written."""
        return self._pending

    def open(
        self, path: str, *, flush_each: bool = False, on_error: Optional[Callable[[str], None]] = None
    ) -> AppendHandle:
        """
        A handle appending to C{path} (created if missing, mode 0600).
        """
        handle = AppendHandle(self, path, flush_each, on_error)
        self._put(_OPEN, handle, None)
        return handle

    def replace(self, path: str, data: bytes) -> None:
        """
        Write a small file whole, replacing C{path} atomically (a temporary
        file renamed over it), after everything queued before.  A failure
        is logged.
        """
        self._put(_REPLACE, None, (path, data))  # type: ignore[arg-type]

    # -- the reactor's side ------------------------------------------------

    def _put_write(self, handle: AppendHandle, data: bytes) -> bool:
        size = len(data)
        with self._lock:
            if self._pending + size > self.max_pending:
                over = True
            else:
                over = False
                self._pending += size
        if over:
            self._give_up(handle, f"more than {self.max_pending} bytes waiting for the disk")
            return False
        self._put(_WRITE, handle, data)
        return True

    def _put(self, op: int, handle: Optional[AppendHandle], data: Optional[bytes]) -> None:
        if not self._threaded:
            self._do(op, handle, data)
            self._flush_dirty()
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vaporproxy-disk", daemon=True)
            self._thread.start()
        self._queue.put((op, handle, data))

    def _give_up(self, handle: AppendHandle, why: str) -> None:
        """
        Give up C{handle}'s file and tell its owner, on the reactor.
        """
        if handle.failed:
            return
        handle.failed = True
        handle._closed = True
        self._put(_CLOSE, handle, None)
        if handle.on_error is not None:
            if self._threaded and threading.current_thread() is self._thread:
                self._reactor.callFromThread(handle.on_error, why)
            else:
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

    # -- the thread's side -------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self.flush_interval)
            except queue.Empty:
                self._flush_dirty()
                continue
            op, handle, data = item
            if op == _STOP:
                self._flush_dirty()
                for handle in list(self._files):
                    self._do(_CLOSE, handle, None)
                return
            self._do(op, handle, data)
            if self._queue.empty() or time.monotonic() - self._last_flush >= self.flush_interval:
                self._flush_dirty()

    def _do(self, op: int, handle: AppendHandle, data: Optional[bytes]) -> None:
        if op == _REPLACE:
            self._replace(*data)  # type: ignore[misc]
            return
        try:
            if op == _OPEN:
                fd = os.open(handle.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
                self._files[handle] = os.fdopen(fd, "ab")
            elif op == _WRITE:
                with self._lock:
                    self._pending -= len(data)  # type: ignore[arg-type]
                f = self._files.get(handle)
                if f is None or handle.failed:
                    return
                f.write(data)
                handle.written += len(data)  # type: ignore[arg-type]
                if handle.flush_each:
                    f.flush()
                else:
                    self._dirty[handle] = None
            elif op == _CLOSE:
                self._dirty.pop(handle, None)
                f = self._files.pop(handle, None)
                if f is not None:
                    f.close()
        except OSError as e:
            self._dirty.pop(handle, None)
            self._fail(handle, e)

    def _replace(self, path: str, data: bytes) -> None:
        temporary = path + ".tmp"
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(temporary, path)
        except OSError as e:
            log.error("could not write {path}: {error}", path=path, error=e.strerror or str(e))

    def _flush_dirty(self) -> None:
        self._last_flush = time.monotonic()
        dirty, self._dirty = self._dirty, {}
        for handle in dirty:
            f = self._files.get(handle)
            if f is None:
                continue
            try:
                f.flush()
            except OSError as e:
                self._fail(handle, e)

    def _fail(self, handle: AppendHandle, error: OSError) -> None:
        """
        A write, flush or open of C{handle}'s file failed: close what is
        open (quietly: its buffer cannot be written either) and give it up.
        """
        f = self._files.pop(handle, None)
        if f is not None:
            try:
                f.close()
            except OSError:
                pass
        self._give_up(handle, f"{error.strerror or error} ({handle.path})")
