"""
One console's recording while it streams: the tap that the relay pipeline
feeds (what the browser received, and with C{include_input} what it sent),
written through the shared L{vaporproxy.filewriter.DiskWriter}.

A recording is complete while the disk makes progress: when more than the
writer's high-water mark of a recording waits for the disk, the console's
channels stop reading from the VM (each L{RecorderStage
<vaporproxy.relay.pipeline.RecorderStage>} attached its hold) until the
disk thread has brought it down to the low-water mark, as for a slow
browser.  Memory per recorded console stays bounded by that mark.

Records reach the writer in batches: one C{writev} of up to C{BATCH}
bytes (a quarter of the writer's high-water mark at most), or what there
is C{FLUSH_AFTER} seconds after a batch began, so a file is at most that
much behind its console (a crash loses no more; playback of a live
recording sees it that late).  Per record the reactor then appends two
buffers to a list (nothing is copied); the writer's lock, queue and
thread see a batch once (issue 10: 32 KiB records, 32 per MiB).

A disk that fails (C{ENOSPC}, C{EFBIG}, C{EIO}) or writes nothing of a
paused recording for the writer's C{stall_timeout} gives up the file (the
L{DiskWriter} says why): the recorder logs it once, counts it in metrics,
lets the console's reads go and stops recording; the console goes on.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Optional

from twisted.logger import Logger

from vaporproxy.recordings.format import (
    KIND_CHANNEL_CLOSE,
    KIND_CHANNEL_OPEN,
    KIND_FROM_BROWSER,
    KIND_TO_BROWSER,
    RECORD_HEADER,
    encode_header,
)

__all__ = ["ConsoleRecorder", "recording_path"]

log = Logger(namespace="vaporproxy.recordings")

#: Bytes of records handed to the writer at once, and the longest a record waits for its batch.
BATCH = 256 * 1024
FLUSH_AFTER = 0.25

#: File name suffixes: the recording, and its metadata written when it ends.
DATA_SUFFIX = ".vprec"
META_SUFFIX = ".json"


def recording_path(directory: str, recording_id: str) -> str:
    """The recording file of C{recording_id} (an id the proxy made: hex)."""
    return os.path.join(directory, recording_id + DATA_SUFFIX)


class ConsoleRecorder:
    """
    Appends one console's records.

    @param writer: the L{vaporproxy.filewriter.DiskWriter}.
    @param header: the file header's fields (id, vm_id, vm_name, type,
        user, started_at, include_input).
    @param clock: milliseconds of each record since C{started_at}.
    @param on_dropped: told once when the recording is given up (metrics).
    """

    def __init__(
        self,
        writer: Any,
        directory: str,
        header: Dict[str, Any],
        clock: Any,
        include_input: bool = False,
        on_dropped: Optional[Callable[[str], None]] = None,
    ):
        self.id = header["id"]
        self.header = header
        self.include_input = include_input
        self._directory = directory
        self._clock = clock
        self._started = clock.seconds()
        self._on_dropped = on_dropped
        self._writer = writer
        #: The holds of the console's channels on their VM reads.
        self._holds: List[Callable[[bool], None]] = []
        #: The disk is behind: the holds are held.
        self.backlogged = False
        self._handle = writer.open(recording_path(directory, self.id), on_error=self._failed, on_backlog=self._backlog)
        self._handle.write(encode_header(header))
        self._channels = 0
        #: Records not yet handed to the writer (header, data, ...), their bytes, its timer.
        self._batch: List[bytes] = []
        self._batched = 0
        self._batch_max = max(1, min(BATCH, writer.high_water // 4))
        self._flush_call: Any = None
        self._finished = False

    @property
    def active(self) -> bool:
        """Whether the file is still being written."""
        return not self._handle.failed

    @property
    def size(self) -> int:
        """Bytes written to the file so far."""
        return self._handle.written

    def attach(self, hold: Callable[[bool], None]) -> None:
        """
        A channel's hold on its reads from the VM: C{hold(True)} while the
        disk is behind (at once if it is now), C{hold(False)} once caught up.
        """
        self._holds.append(hold)
        if self.backlogged:
            hold(True)

    def detach(self, hold: Callable[[bool], None]) -> None:
        """The channel ended (its reads are let go with it)."""
        if hold in self._holds:
            self._holds.remove(hold)

    def _backlog(self, over: bool) -> None:
        self.backlogged = over
        for hold in list(self._holds):
            hold(over)

    def _t_ms(self) -> int:
        return int((self._clock.seconds() - self._started) * 1000)

    def _record(self, kind: int, channel: int, data: bytes) -> None:
        if self._handle.failed or self._finished:
            return
        batch = self._batch
        batch.append(RECORD_HEADER.pack(kind, channel, self._t_ms(), len(data)))
        batch.append(data)  # not copied: the writer's writev reads it
        self._batched += RECORD_HEADER.size + len(data)
        if self._batched >= self._batch_max:
            self._flush()
        elif self._flush_call is None:
            self._flush_call = self._clock.callLater(FLUSH_AFTER, self._flush_due)

    def _flush_due(self) -> None:
        self._flush_call = None
        self._flush()

    def _flush(self) -> None:
        """Hand the batch to the writer (one write of all its buffers)."""
        if self._batch:
            batch, self._batch, self._batched = self._batch, [], 0
            self._handle.writev(batch)

    def open_channel(self, info: Optional[Dict[str, Any]] = None) -> int:
        """A WebSocket of the console opened; answer its channel number."""
        channel = self._channels
        self._channels += 1
        self._record(KIND_CHANNEL_OPEN, channel, json.dumps(info or {}, sort_keys=True).encode())
        return channel

    def close_channel(self, channel: int) -> None:
        self._record(KIND_CHANNEL_CLOSE, channel, b"")

    def to_browser(self, channel: int, data: bytes) -> None:
        """Bytes the browser received."""
        self._record(KIND_TO_BROWSER, channel, data)

    def from_browser(self, channel: int, data: bytes) -> None:
        """Bytes the browser sent (kept only with C{include_input})."""
        if self.include_input:
            self._record(KIND_FROM_BROWSER, channel, data)

    def finish(self, summary: Dict[str, Any]) -> Dict[str, Any]:
        """
        The console ended: close the file and write its metadata (the
        header's fields, C{summary}'s and the size), also through the
        writer.  Answer the metadata (its size and completeness as of now;
        the file's are taken once the disk thread has written, or given
        up, the records still waiting for it).
        """
        self._flush()
        self._finished = True  # a channel closing after this is not recorded (the file is closed)
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        meta = dict(self.header)
        meta.update(summary)
        handle = self._handle
        meta["size"] = handle.written
        meta["complete"] = not handle.failed
        handle.close()

        def final() -> bytes:
            return json.dumps(dict(meta, size=handle.written, complete=not handle.failed), sort_keys=True).encode()

        self._writer.replace(os.path.join(self._directory, self.id + META_SUFFIX), final)
        return meta

    def _failed(self, why: str) -> None:
        log.error("recording {recording_id} dropped, the console goes on: {why}", recording_id=self.id, why=why)
        if self._on_dropped is not None:
            self._on_dropped(why)
