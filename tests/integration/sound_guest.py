"""
A guest that makes sound, for the SPICE audio tests: Debian's kernel and a
busybox initramfs (L{vaporproxy.demo.guest}) whose C{init} loads the PC
speaker driver and rings the console bell without pause (one tone).  With QEMU's
C{pcspk-audiodev} on a C{spice} audiodev, each ring is PC-speaker sound on
the SPICE playback channel.

The kernel package is fetched once with C{apt-get download} into a cache
(C{$XDG_CACHE_HOME/vaporproxy/guest-sound}); the initramfs is rebuilt when
its content changes.
"""

from __future__ import annotations

import fcntl
import gzip
import os
import shutil
import stat
import subprocess
import tempfile
from typing import List

from vaporproxy.demo.guest import (
    BUSYBOX_PACKAGE,
    Entry,
    GuestImage,
    cache_dir,
    collect_modules,
    initrd_name,
    kernel_package,
    newc_archive,
)

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
insmod /lib/modules/pcspkr.ko
echo "vm: ready" > /dev/ttyS0
# Bell at 440 Hz for 1.9 s (the longest the console allows), rung every
# second: one continuous tone, so the playback stream never stops.
printf '\\033[10;440]\\033[11;1900]' > /dev/tty0
while true; do printf '\\a' > /dev/tty0; sleep 1; done
"""


def _run(argv: List[str], cwd: str) -> None:
    subprocess.run(argv, cwd=cwd, check=True, stdin=subprocess.DEVNULL, capture_output=True)


def _download(cache: str) -> None:
    """The kernel, busybox and pcspkr.ko into C{cache} (the kernel last)."""
    with tempfile.TemporaryDirectory(prefix="download-", dir=cache) as work:
        os.chmod(work, 0o755)  # apt's _apt user writes the .debs here
        _run(["apt-get", "download", "-q", kernel_package(), BUSYBOX_PACKAGE], work)
        root = os.path.join(work, "root")
        for deb in sorted(n for n in os.listdir(work) if n.endswith(".deb")):
            _run(["dpkg-deb", "-x", deb, root], work)
        [version] = os.listdir(os.path.join(root, "lib", "modules"))
        [(name, data)] = collect_modules(os.path.join(root, "lib", "modules", version, "kernel"), ["pcspkr"])
        with open(os.path.join(cache, name), "wb") as f:
            f.write(data)
        busybox = next(p for p in ("bin/busybox", "usr/bin/busybox") if os.path.exists(os.path.join(root, p)))
        shutil.copyfile(os.path.join(root, busybox), os.path.join(cache, "busybox"))
        kernel = sorted(n for n in os.listdir(os.path.join(root, "boot")) if n.startswith("vmlinuz-"))[-1]
        shutil.copyfile(os.path.join(root, "boot", kernel), os.path.join(cache, "vmlinuz"))


def _entries(busybox: bytes, pcspkr: bytes) -> List[Entry]:
    d, x, f = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o755, stat.S_IFREG | 0o644
    none = (0, 0)
    entries: List[Entry] = [(name, d, b"", none) for name in ("bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules")]
    return entries + [
        ("dev/console", stat.S_IFCHR | 0o600, b"", (5, 1)),
        ("bin/busybox", x, busybox, none),
        ("init", x, INIT.encode(), none),
        ("lib/modules/pcspkr.ko", f, pcspkr, none),
    ]


def ensure_sound_guest() -> GuestImage:
    """
    The boot files of the ringing guest, downloaded and built only when
    missing.

    @raise RuntimeError: (or C{CalledProcessError}) when apt or dpkg fail.
    """
    cache = cache_dir() + "-sound"
    os.makedirs(cache, exist_ok=True)
    with open(os.path.join(cache, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        kernel = os.path.join(cache, "vmlinuz")
        if not os.path.exists(kernel):
            _download(cache)
        with open(os.path.join(cache, "busybox"), "rb") as b, open(os.path.join(cache, "pcspkr.ko"), "rb") as m:
            archive = newc_archive(_entries(b.read(), m.read()))
        initrd = os.path.join(cache, initrd_name(archive))
        if not os.path.exists(initrd):
            with open(initrd + ".tmp", "wb") as f:
                f.write(gzip.compress(archive, mtime=0))
            os.replace(initrd + ".tmp", initrd)
    return GuestImage(kernel=kernel, initrd=initrd)
