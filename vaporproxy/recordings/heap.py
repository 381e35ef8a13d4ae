"""
Freed memory kept in the process while consoles are recorded (issue 10).

A recording's records wait for the disk thread in batches (up to its
4 MiB high-water mark), and the thread frees them a batch at a time.
glibc gives the top of its heap back to the kernel once more than 128 KiB
of it is free, so after each batch the reactor's next reads from the VM
fault fresh zeroed pages in again (on a VM, pages the host must supply).
C{bench/recordcost.py}, 3 runs each: 0.97-1.01 ms of CPU per MiB recorded
as glibc is, 0.86-0.89 with the thresholds below.

L{keep_freed_heap} sets glibc's trim threshold to 32 MiB and its mmap
threshold to 4 MiB (setting either stops glibc's own adjusting of both,
which would have raised the mmap threshold to the largest block freed):
the process keeps up to 32 MiB of free heap for its next reads.
"""

from __future__ import annotations

import ctypes
from typing import Any, Optional

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_heap"]

#: mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

TRIM_THRESHOLD = 32 * 1024 * 1024
MMAP_THRESHOLD = 4 * 1024 * 1024


def keep_freed_heap(libc: Optional[Any] = None) -> bool:
    """
    Set the thresholds; C{False} where the C library has no C{mallopt} or
    refuses them (musl's does nothing: its own heap returns memory otherwise).
    """
    try:
        mallopt = (libc if libc is not None else ctypes.CDLL(None)).mallopt
    except (AttributeError, OSError):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
