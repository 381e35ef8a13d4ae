"""
The recordings directory: starting recordings, listing them with their
metadata, and applying retention (age and total size, oldest first).

Each recording is C{ID.vprec} (the file) and, once its console ended,
C{ID.json} (its metadata).  A recording with no metadata is either being
written by this process (C{live}) or was cut by a crash (C{interrupted}):
its header still says whose console it was.

C{complete} says whether the file holds the whole console: C{True} once a
console ended with its recording whole, C{False} when the recording was
dropped (disk full or too slow: C{dropped} says why; the console went on)
or cut by a crash, C{None} while it is still being written.

Listing, deleting and the cleanup touch the disk: they run on a thread
pool (C{run}: a C{deferToThreadPool}-like callable), never on the reactor.
"""

from __future__ import annotations

import json
import os
import secrets
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, List, Optional

from twisted.internet.defer import Deferred, succeed

from vaporproxy.recordings.format import RecordingFormatError, read_recording
from vaporproxy.recordings.recorder import DATA_SUFFIX, META_SUFFIX, ConsoleRecorder, recording_path
from vaporproxy.timestamps import iso_utc

__all__ = ["RecordingStore", "cleanup_directory", "is_recording_id", "list_directory"]

#: How much of a file is read to learn its header when it has no metadata.
HEADER_PROBE = 64 * 1024 + 16
#: How many ended recordings' metadata a store keeps in memory (a few KB).
ENDED_KEPT = 256
#: Why a recording was dropped: the most reasons kept in memory.
DROPPED_KEPT = 1024


def is_recording_id(text: str) -> bool:
    """Whether C{text} has the form of an id the proxy makes (so it is safe in a path)."""
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)


def _describe(directory: str, recording_id: str, live: Iterable[str]) -> Optional[Dict[str, Any]]:
    """One recording's metadata, from its .json or else its header."""
    data = recording_path(directory, recording_id)
    try:
        size = os.path.getsize(data)
    except OSError:
        return None
    try:
        with open(os.path.join(directory, recording_id + META_SUFFIX), "rb") as f:
            meta = json.loads(f.read())
    except (OSError, ValueError):
        try:
            with open(data, "rb") as f:
                meta, _, _ = read_recording(f.read(HEADER_PROBE))
        except (OSError, RecordingFormatError, ValueError):
            return None
        meta.update(ended_at=None, duration_s=None, bytes=None)
        meta["outcome"] = "LIVE" if recording_id in live else "INTERRUPTED"
        meta["complete"] = None if recording_id in live else False
    meta["id"] = recording_id
    meta["size"] = size
    return meta


def list_directory(directory: str, live: Iterable[str] = ()) -> List[Dict[str, Any]]:
    """Every recording in C{directory}, oldest first."""
    live = set(live)
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    ids = [n[: -len(DATA_SUFFIX)] for n in names if n.endswith(DATA_SUFFIX) and is_recording_id(n[: -len(DATA_SUFFIX)])]
    found = [m for m in (_describe(directory, i, live) for i in ids) if m is not None]
    found.sort(key=lambda m: (m.get("started_at_s") or 0, m["id"]))
    return found


def delete_files(directory: str, recording_id: str) -> bool:
    """Remove a recording's files; whether it existed."""
    existed = False
    for suffix in (DATA_SUFFIX, META_SUFFIX):
        try:
            os.remove(os.path.join(directory, recording_id + suffix))
            existed = True
        except FileNotFoundError:
            pass
    return existed


def cleanup_directory(
    directory: str, now: float, retention_s: float, max_total_size: int, live: Iterable[str] = ()
) -> List[str]:
    """
    Delete recordings older than C{retention_s}, then the oldest until the
    total size is at most C{max_total_size}; live ones are kept.  Answer
    the deleted ids.
    """
    live = set(live)
    everything = list_directory(directory, live)
    total = sum(m["size"] for m in everything)
    deleted = []
    for meta in [m for m in everything if m["id"] not in live]:
        too_old = now - (meta.get("started_at_s") or 0) > retention_s
        if too_old or total > max_total_size:
            if delete_files(directory, meta["id"]):
                deleted.append(meta["id"])
                total -= meta["size"]
    return deleted


class RecordingStore:
    """
    The recordings of this process's directory.

    @param run: runs a blocking function on a thread pool, answering a
        L{Deferred} (C{lambda f, *a: deferToThreadPool(reactor, pool, f, *a)}).
    """

    def __init__(
        self,
        directory: str,
        writer: Any,
        clock: Any,
        run: Callable[..., Deferred],
        *,
        include_input: bool = False,
        retention_s: float = 30 * 86400,
        max_total_size: int = 10 * 1024**3,
        on_dropped: Optional[Callable[[str], None]] = None,
    ):
        self.directory = directory
        self._writer = writer
        self._clock = clock
        self._run = run
        self.include_input = include_input
        self.retention_s = retention_s
        self.max_total_size = max_total_size
        self._on_dropped = on_dropped
        self.live: Dict[str, ConsoleRecorder] = {}
        #: Metadata of recordings that ended lately, kept because their .json
        #: is written by the disk thread after the console is gone: a listing
        #: made in between shows the final outcome, never LIVE or INTERRUPTED.
        self._ended: "OrderedDict[str, Dict[str, Any]]" = OrderedDict()
        #: Why recordings of this process were dropped, by id.
        self._dropped: "OrderedDict[str, str]" = OrderedDict()

    def start(self, *, vm_id: str, vm_name: Optional[str], console_type: str, user: str) -> ConsoleRecorder:
        """Begin recording a console."""
        now = self._clock.seconds()
        header = {
            "id": secrets.token_hex(16),
            "vm_id": vm_id,
            "vm_name": vm_name,
            "type": console_type,
            "user": user,
            "started_at": iso_utc(now),
            "started_at_s": now,
            "include_input": self.include_input,
        }
        recorder = ConsoleRecorder(
            self._writer, self.directory, header, self._clock, self.include_input,
            lambda why: self._was_dropped(header["id"], why),
        )  # fmt: skip
        self.live[recorder.id] = recorder
        return recorder

    def _was_dropped(self, recording_id: str, why: str) -> None:
        self._dropped[recording_id] = why
        while len(self._dropped) > DROPPED_KEPT:
            self._dropped.popitem(last=False)
        if self._on_dropped is not None:
            self._on_dropped(why)

    def written(self) -> int:
        """Bytes written so far to the files of the recordings being made."""
        return sum(recorder.size for recorder in list(self.live.values()))

    def finish(self, recorder: ConsoleRecorder, *, bytes_sent: int, outcome: Optional[str]) -> Dict[str, Any]:
        """The console ended: write the recording's metadata."""
        now = self._clock.seconds()
        meta = recorder.finish(
            {
                "ended_at": iso_utc(now),
                "duration_s": round(now - recorder.header["started_at_s"], 3),
                "bytes": bytes_sent,
                "outcome": outcome or "ok",
                "dropped": self._dropped.get(recorder.id),
            }
        )
        self._ended[recorder.id] = meta
        while len(self._ended) > ENDED_KEPT:
            self._ended.popitem(last=False)
        self.live.pop(recorder.id, None)
        return meta

    def list(self) -> Deferred:
        """Every recording on disk; those that just ended with their final metadata."""
        d = self._run(list_directory, self.directory, list(self.live))
        d.addCallback(self._with_ended)
        return d

    def _with_ended(self, found: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        ended, dropped = self._ended, self._dropped
        listed = []
        for meta in found:
            if meta["id"] in ended:
                meta = dict(ended[meta["id"]], id=meta["id"], size=meta["size"])
            elif meta["id"] in dropped:
                meta = dict(meta, complete=False, dropped=dropped[meta["id"]])
            listed.append(meta)
        # A live recording dropped before its header reached the disk.
        seen = {meta["id"] for meta in listed}
        for recording_id, recorder in list(self.live.items()):
            if recording_id not in seen:
                listed.append(dict(
                    recorder.header, ended_at=None, duration_s=None, bytes=None, outcome="LIVE", size=recorder.size,
                    complete=None if recorder.active else False, dropped=dropped.get(recording_id),
                ))  # fmt: skip
        listed.sort(key=lambda m: (m.get("started_at_s") or 0, m["id"]))
        return listed

    def delete(self, recording_id: str) -> Deferred:
        self._ended.pop(recording_id, None)
        if recording_id not in self.live:
            self._dropped.pop(recording_id, None)
        if not is_recording_id(recording_id) or recording_id in self.live:
            return succeed(False)
        return self._run(delete_files, self.directory, recording_id)

    def cleanup(self) -> Deferred:
        return self._run(
            cleanup_directory,
            self.directory,
            self._clock.seconds(),
            self.retention_s,
            self.max_total_size,
            list(self.live),
        )
