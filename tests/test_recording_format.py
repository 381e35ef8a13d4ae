"""
Tests for L{vaporproxy.recordings.format}: written, read back, cut short.
"""

import struct

from twisted.trial.unittest import SynchronousTestCase

from vaporproxy.recordings.format import (
    KIND_CHANNEL_OPEN,
    KIND_FROM_BROWSER,
    KIND_TO_BROWSER,
    MAGIC,
    Record,
    RecordingFormatError,
    encode_header,
    encode_record,
    read_recording,
)

HEADER = {"id": "r1", "vm_id": "6f1b2a3c-1111-4222-8333-944455556666", "type": "vnc", "user": "alice"}
RECORDS = [
    Record(KIND_CHANNEL_OPEN, 0, 0, b'{"channel_type":null}'),
    Record(KIND_TO_BROWSER, 0, 5, b"RFB 003.008\n"),
    Record(KIND_FROM_BROWSER, 0, 12, b"RFB 003.008\n"),
    Record(KIND_TO_BROWSER, 0, 1500, b"\x00" * 70000),
]


def blob():
    return encode_header(HEADER) + b"".join(encode_record(r.kind, r.channel, r.t_ms, r.data) for r in RECORDS)


class RecordingFormatTests(SynchronousTestCase):
    def test_roundTrip(self):
        """
        When a header and records are written, reading the file gives them back whole and not cut.
        """
        header, records, cut = read_recording(blob())
        self.assertEqual(header, HEADER)
        self.assertEqual(records, RECORDS)
        self.assertFalse(cut)

    def test_versionByte(self):
        """
        When a file says a version this reader does not know, it is refused with the version named.
        """
        data = bytearray(blob())
        self.assertEqual(data[: len(MAGIC)], MAGIC)
        data[len(MAGIC)] = 2
        with self.assertRaises(RecordingFormatError) as e:
            read_recording(bytes(data))
        self.assertIn("version 2", str(e.exception))

    def test_truncatedKeepsPrefix(self):
        """
        When a file is cut at any byte inside the records, the complete records before the cut are read.
        """
        data = blob()
        header_end = len(encode_header(HEADER))
        complete = [header_end]
        for r in RECORDS:
            complete.append(complete[-1] + 11 + len(r.data))
        for cut_at in range(header_end, len(data), 97):
            header, records, cut = read_recording(data[:cut_at])
            whole = sum(1 for end in complete[1:] if end <= cut_at)
            self.assertEqual(records, RECORDS[:whole])
            self.assertEqual(cut, cut_at not in complete)

    def test_notARecording(self):
        """
        When the bytes are not a recording, or the header is cut, the reader says so.
        """
        self.assertRaises(RecordingFormatError, read_recording, b"GIF89a" + b"\x00" * 20)
        self.assertRaises(RecordingFormatError, read_recording, encode_header(HEADER)[:-3])
        self.assertRaises(RecordingFormatError, read_recording, b"VP")

    def test_timeClamped(self):
        """
        When a record's time is past the u32 range, it is written as the largest value, not wrapped.
        """
        record = encode_record(KIND_TO_BROWSER, 1, 2**40, b"x")
        self.assertEqual(struct.unpack_from("<BHII", record), (0, 1, 0xFFFFFFFF, 1))
