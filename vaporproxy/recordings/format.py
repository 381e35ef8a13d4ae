"""
The recording file format (version 1), written while a console streams.

A file is a header then records, all little-endian::

    b"VPREC"  version:u8  header_len:u32  header: JSON (UTF-8)
    record*:  kind:u8  channel:u16  t_ms:u32  length:u32  data[length]

C{t_ms} is milliseconds since the console started.  Kinds: C{0} bytes the
browser received (what the VM sent, after the proxy's security handshake:
the browser-side stream, which carries no VM password), C{1} bytes the
browser sent (only with C{include_input}), C{2} a channel opened (data: JSON,
e.g. C{{"channel_type": 2}} for a SPICE display channel), C{3} a channel
closed.  VNC consoles have one channel (0); SPICE consoles one per
WebSocket, numbered in the order they joined.

Records are appended and flushed at least once a second, so a file cut by
a crash is a valid prefix plus perhaps one partial record, which readers
ignore.  The version byte lets later versions read old files: a reader
refuses a version it does not know instead of guessing.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Tuple

__all__ = [
    "MAGIC",
    "VERSION",
    "Record",
    "RecordingFormatError",
    "encode_header",
    "encode_record",
    "read_recording",
]

MAGIC = b"VPREC"
VERSION = 1

KIND_TO_BROWSER = 0
KIND_FROM_BROWSER = 1
KIND_CHANNEL_OPEN = 2
KIND_CHANNEL_CLOSE = 3
KINDS = (KIND_TO_BROWSER, KIND_FROM_BROWSER, KIND_CHANNEL_OPEN, KIND_CHANNEL_CLOSE)

_PREAMBLE = struct.Struct("<5sBI")
RECORD_HEADER = struct.Struct("<BHII")

#: The largest header a reader accepts (it holds a few ids and names).
MAX_HEADER = 64 * 1024


class RecordingFormatError(ValueError):
    """Not a recording, or one of a version this code cannot read."""


@dataclass(frozen=True)
class Record:
    kind: int
    channel: int
    t_ms: int
    data: bytes


def encode_header(fields: Dict[str, Any]) -> bytes:
    """The file's first bytes: magic, version and the JSON header."""
    body = json.dumps(fields, separators=(",", ":"), sort_keys=True).encode("utf-8")
    return _PREAMBLE.pack(MAGIC, VERSION, len(body)) + body


def encode_record(kind: int, channel: int, t_ms: int, data: bytes) -> bytes:
    """One record (C{t_ms} is clamped to the u32 range: about 49 days)."""
    return RECORD_HEADER.pack(kind, channel, min(max(t_ms, 0), 0xFFFFFFFF), len(data)) + data


def read_recording(blob: bytes) -> Tuple[Dict[str, Any], List[Record], bool]:
    """
    Parse a whole file: its header, its complete records, and whether it
    ended in the middle of a record (a file cut by a crash or still being
    written).

    @raise RecordingFormatError: not a recording, or an unknown version.
    """
    if len(blob) < _PREAMBLE.size:
        raise RecordingFormatError("too short for a recording header")
    magic, version, header_len = _PREAMBLE.unpack_from(blob)
    if magic != MAGIC:
        raise RecordingFormatError("not a vaporproxy recording")
    if version != VERSION:
        raise RecordingFormatError(f"recording format version {version} (this reader knows {VERSION})")
    if header_len > MAX_HEADER or len(blob) < _PREAMBLE.size + header_len:
        raise RecordingFormatError("recording header cut short or too long")
    start = _PREAMBLE.size
    header = json.loads(blob[start : start + header_len].decode("utf-8"))
    records = list(_records(blob, start + header_len))
    consumed = start + header_len + sum(RECORD_HEADER.size + len(r.data) for r in records)
    return header, records, consumed != len(blob)


def _records(blob: bytes, pos: int) -> Iterator[Record]:
    end = len(blob)
    while end - pos >= RECORD_HEADER.size:
        kind, channel, t_ms, length = RECORD_HEADER.unpack_from(blob, pos)
        if kind not in KINDS:
            return
        data_start = pos + RECORD_HEADER.size
        if end - data_start < length:
            return
        yield Record(kind, channel, t_ms, blob[data_start : data_start + length])
        pos = data_start + length
