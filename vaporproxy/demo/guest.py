"""
The interactive test VM's boot files: Debian's kernel and a busybox
initramfs that boots to a root shell on the screen (tty0) and reports on
the serial port (ttyS0).

Nothing is installed on the host: C{apt-get download} fetches the kernel
package (the one C{linux-image-amd64} depends on) and C{busybox-static}
into a cache directory, C{dpkg-deb -x} unpacks them, and the initramfs is
written here as a gzipped newc cpio.  The cache holds the kernel, busybox
and the pointer-driver modules; the initramfs is named after a hash of
what goes into it, so changing the scripts below rebuilds it without a
new download.

On the serial port the guest writes:
  - C{vm: ready} once its shell runs and the pointer watchers are up;
  - whatever C{mark WORDS} is given (C{mark} is typed at the shell);
  - C{mouse: click left|right|middle} for each pointer button press.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import lzma
import os
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

#: The kernel meta-package whose dependency names the real kernel package.
KERNEL_META = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
#: Pointer drivers (modules in Debian's kernel): the PS/2 mouse QEMU's pc
#: machine has, and the event interface the watcher reads.
POINTER_MODULES = ("psmouse", "evdev")

READY_LINE = "vm: ready"

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m; done
/bin/pointer-watch
echo "vm: ready" > /dev/ttyS0
export PS1='vm# '
while true; do setsid cttyhack sh; done
"""

MARK = """#!/bin/sh
# mark WORDS: write WORDS to the serial port (what tests read back).
echo "$*" > /dev/ttyS0
"""

#: Waits (up to 10 s) for the PS/2 mouse's event device, then reads every
#: event device one 24-byte struct input_event at a time (dd on a kept-open
#: descriptor, so nothing sits in a pipe buffer) and reports button presses:
#: type EV_KEY (01 00), code BTN_LEFT/RIGHT/MIDDLE (10|11|12 01), value 1.
POINTER_WATCH = """#!/bin/sh
i=0
while [ $i -lt 100 ] && ! grep -q 'Handlers=.*mouse.*event' /proc/bus/input/devices; do
    sleep 0.1; i=$((i + 1))
done
watch() {
    exec 3<"$1"
    while true; do
        h=$(dd bs=24 count=1 <&3 2>/dev/null | hexdump -v -e '24/1 "%02x"')
        case "$h" in
            *0100100101000000) echo "mouse: click left" > /dev/ttyS0 ;;
            *0100110101000000) echo "mouse: click right" > /dev/ttyS0 ;;
            *0100120101000000) echo "mouse: click middle" > /dev/ttyS0 ;;
            "") sleep 1 ;;
        esac
    done
}
for d in /dev/input/event*; do watch "$d" & done
"""


@dataclass(frozen=True)
class GuestImage:
    """
    The files a VM boots from: C{-kernel}, C{-initrd} and C{-append}.
    """

    kernel: str
    initrd: str
    cmdline: str = "console=ttyS0 console=tty0 quiet"


def cache_dir() -> str:
    """
    Where the boot files are kept: C{$VAPOR_GUEST_CACHE}, else
    C{$XDG_CACHE_HOME/vaporproxy/guest} (C{~/.cache/vaporproxy/guest}).
    """
    explicit = os.environ.get("VAPOR_GUEST_CACHE")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vaporproxy", "guest")


# ---------------------------------------------------------------------------
# The initramfs, in pure Python
# ---------------------------------------------------------------------------

#: One archive member: (path, mode with file type bits, content, rdev (major, minor)).
Entry = Tuple[str, int, bytes, Tuple[int, int]]


def newc_archive(entries: Iterable[Entry]) -> bytes:
    """
    A cpio archive in the "newc" format the kernel unpacks as an initramfs,
    ending with the C{TRAILER!!!} member.  Owner root, mtime 0.
    """
    out = bytearray()

    def member(ino: int, name: str, mode: int, data: bytes, rdev: Tuple[int, int]) -> None:
        raw = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw), 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + raw)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    ino = 0
    for ino, (name, mode, data, rdev) in enumerate(entries, start=1):
        member(ino, name, mode, data, rdev)
    member(ino + 1, "TRAILER!!!", 0, b"", (0, 0))
    return bytes(out)


def initramfs_entries(busybox: bytes, modules: Sequence[Tuple[str, bytes]]) -> List[Entry]:
    """
    The initramfs tree: busybox, C{init}, C{mark}, the pointer watcher, the
    modules with their load order, empty mount points and C{dev/console}.
    """
    d, x, f = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o755, stat.S_IFREG | 0o644
    none = (0, 0)
    entries: List[Entry] = [(name, d, b"", none) for name in ("bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules")]
    entries += [
        ("dev/console", stat.S_IFCHR | 0o600, b"", (5, 1)),
        ("bin/busybox", x, busybox, none),
        ("init", x, INIT.encode(), none),
        ("bin/mark", x, MARK.encode(), none),
        ("bin/pointer-watch", x, POINTER_WATCH.encode(), none),
        ("lib/modules/order", f, "".join(name + "\n" for name, _ in modules).encode(), none),
    ]
    entries += [("lib/modules/" + name, f, data, none) for name, data in modules]
    return entries


# ---------------------------------------------------------------------------
# Kernel modules
# ---------------------------------------------------------------------------


def module_depends(data: bytes) -> List[str]:
    """
    The modules an (uncompressed) C{.ko} needs first: its C{.modinfo}
    C{depends=} field (C{modules.dep} is made by depmod at install time, so
    an unpacked package has none).
    """
    at = data.find(b"\0depends=")
    if at < 0:
        return []
    value = data[at + len(b"\0depends=") : data.index(b"\0", at + 1)].decode()
    return [name for name in value.split(",") if name]


def _read_module(path: str) -> bytes:
    """
    A module's bytes, decompressed (busybox C{insmod} wants plain C{.ko}).
    """
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".xz"):
        return lzma.decompress(data)
    if path.endswith(".gz"):
        return gzip.decompress(data)
    if path.endswith(".zst"):
        raise RuntimeError(f"cannot decompress {path}: zstd is not in the standard library")
    return data


def find_modules(module_root: str) -> Dict[str, str]:
    """
    Module name (with C{-} as C{_}) to file, for every C{.ko[.xz|.gz|.zst]}
    under C{module_root}.
    """
    found: Dict[str, str] = {}
    for root, _dirs, files in os.walk(module_root):
        for name in files:
            base = name.split(".ko")[0]
            if ".ko" in name:
                found[base.replace("-", "_")] = os.path.join(root, name)
    return found


def collect_modules(module_root: str, wanted: Sequence[str]) -> List[Tuple[str, bytes]]:
    """
    C{(file name, plain .ko bytes)} for C{wanted} and what they depend on,
    dependencies first (the order to C{insmod} them in).  A name that is
    not a module file (built into the kernel) is skipped.
    """
    files = find_modules(module_root)
    ordered: List[Tuple[str, bytes]] = []
    seen = set()

    def visit(name: str) -> None:
        key = name.replace("-", "_")
        if key in seen or key not in files:
            return
        seen.add(key)
        data = _read_module(files[key])
        for dep in module_depends(data):
            visit(dep)
        ordered.append((key + ".ko", data))

    for name in wanted:
        visit(name)
    return ordered


# ---------------------------------------------------------------------------
# Download, unpack, cache
# ---------------------------------------------------------------------------


def _run(argv: Sequence[str], cwd: Optional[str] = None) -> str:
    result = subprocess.run(list(argv), cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()[-800:]}")
    return result.stdout


def kernel_package(depends_output: Optional[str] = None) -> str:
    """
    The versioned kernel package C{linux-image-amd64} depends on, read from
    C{apt-cache depends} (its output may be given).
    """
    if depends_output is None:
        depends_output = _run(["apt-cache", "depends", KERNEL_META])
    for line in depends_output.splitlines():
        name = line.strip().partition("Depends: ")[2]
        if name.startswith("linux-image-6"):
            return name
    raise RuntimeError(f"apt-cache knows no linux-image-6* for {KERNEL_META}; run apt-get update")


def _first_existing(root: str, paths: Sequence[str]) -> str:
    """
    The first of C{paths} under C{root} that exists (Debian moved /lib and
    /bin under /usr in later releases).
    """
    for path in paths:
        if os.path.exists(os.path.join(root, path)):
            return os.path.join(root, path)
    raise RuntimeError(f"none of {list(paths)} in the unpacked packages")


def _download_parts(cache: str) -> None:
    """
    Fetch and unpack the two packages; keep the kernel, busybox and the
    pointer modules in C{cache}.
    """
    with tempfile.TemporaryDirectory(prefix="download-", dir=cache) as work:
        os.chmod(work, 0o755)  # apt's _apt user writes the .debs here
        try:
            kernel = kernel_package()
        except RuntimeError:
            # A fresh machine may have empty package lists.
            _run(["apt-get", "update", "-q"])
            kernel = kernel_package()
        _run(["apt-get", "download", "-q", kernel, BUSYBOX_PACKAGE], cwd=work)
        debs = sorted(name for name in os.listdir(work) if name.endswith(".deb"))
        for deb in debs:
            _run(["dpkg-deb", "-x", os.path.join(work, deb), os.path.join(work, "root")])
        root = os.path.join(work, "root")
        kernels = sorted(n for n in os.listdir(os.path.join(root, "boot")) if n.startswith("vmlinuz-"))
        module_dir = _first_existing(root, ("lib/modules", "usr/lib/modules"))
        [version] = os.listdir(module_dir)
        modules = collect_modules(os.path.join(module_dir, version, "kernel"), POINTER_MODULES)
        missing = set(POINTER_MODULES) - {name[: -len(".ko")] for name, _ in modules}
        if missing:
            raise RuntimeError(f"kernel {version} has no module file for {sorted(missing)}")
        moddir = os.path.join(cache, "modules")
        shutil.rmtree(moddir, ignore_errors=True)
        os.makedirs(moddir)
        for name, data in modules:
            with open(os.path.join(moddir, name), "wb") as f:
                f.write(data)
        with open(os.path.join(moddir, "order"), "w") as f:
            f.write("".join(name + "\n" for name, _ in modules))
        shutil.copyfile(_first_existing(root, ("bin/busybox", "usr/bin/busybox")), os.path.join(cache, "busybox"))
        # The kernel last: its presence says the parts are complete.
        shutil.copyfile(os.path.join(root, "boot", kernels[-1]), os.path.join(cache, "vmlinuz"))


def _cached_modules(cache: str) -> List[Tuple[str, bytes]]:
    moddir = os.path.join(cache, "modules")
    with open(os.path.join(moddir, "order")) as f:
        names = f.read().split()
    out = []
    for name in names:
        with open(os.path.join(moddir, name), "rb") as m:
            out.append((name, m.read()))
    return out


def initrd_name(archive: bytes) -> str:
    """
    The initramfs's file name: a hash of its content, so a changed recipe
    is a new file.
    """
    return f"initrd-{hashlib.sha256(archive).hexdigest()[:12]}.gz"


def ensure_guest(cache: Optional[str] = None) -> GuestImage:
    """
    The boot files, downloaded and built into C{cache} (default
    L{cache_dir}) only when missing.  A lock file serialises concurrent
    builders (the demo and a test run).

    @raise RuntimeError: when C{apt-get}/C{dpkg-deb} fail or the kernel
        lacks a needed module.
    """
    cache = cache or cache_dir()
    os.makedirs(cache, exist_ok=True)
    with open(os.path.join(cache, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        kernel = os.path.join(cache, "vmlinuz")
        if not os.path.exists(kernel):
            _download_parts(cache)
        with open(os.path.join(cache, "busybox"), "rb") as f:
            busybox = f.read()
        archive = newc_archive(initramfs_entries(busybox, _cached_modules(cache)))
        initrd = os.path.join(cache, initrd_name(archive))
        if not os.path.exists(initrd):
            for old in os.listdir(cache):
                if old.startswith("initrd-"):
                    os.unlink(os.path.join(cache, old))
            with open(initrd + ".tmp", "wb") as f:
                f.write(gzip.compress(archive, compresslevel=6, mtime=0))
            os.replace(initrd + ".tmp", initrd)
        return GuestImage(kernel, initrd)
