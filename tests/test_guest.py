"""
The interactive test VM's pure parts (L{vaporproxy.demo.guest},
L{vaporproxy.demo.boot}, the guest form of L{vaporproxy.demo.vm.domain_xml}):
the initramfs archive, module selection, the cache, the boot command line
and reading the serial file.  Booting it is tested in
C{tests/integration/test_guest_vm.py} and C{tests/e2e/test_shell.py}.
"""

from __future__ import annotations

import gzip
import lzma
import os
import stat
from typing import Dict, List, Tuple

from lxml import etree
from twisted.trial import unittest

from vaporproxy.demo.boot import SerialLog, plain_qemu_argv
from vaporproxy.demo.guest import (
    READY_LINE,
    GuestImage,
    collect_modules,
    ensure_guest,
    initramfs_entries,
    kernel_package,
    module_depends,
    newc_archive,
)
from vaporproxy.demo.vm import domain_xml

UUID = "5b1f4a8e-0c1d-4f6e-9a7b-2c3d4e5f6a7b"
APT_CACHE_DEPENDS = "linux-image-amd64\n  Depends: linux-image-6.1.0-57-amd64\n"
GUEST = GuestImage("/var/guest/vmlinuz", "/var/guest/initrd-0123.gz")


def read_newc(archive: bytes) -> List[Tuple[str, int, bytes, Tuple[int, int], int]]:
    """
    The members of a newc cpio archive: (name, mode, data, rdev, header
    offset), checking the magic and the 4-byte alignment as the kernel does.
    """
    out = []
    at = 0
    while True:
        assert archive[at : at + 6] == b"070701", (at, archive[at : at + 6])
        fields = [int(archive[at + 6 + 8 * i : at + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        name_at = at + 110
        name = archive[name_at : name_at + namesize - 1].decode()
        data_at = (name_at + namesize + 3) & ~3
        data = archive[data_at : data_at + size]
        out.append((name, mode, data, (rmaj, rmin), at))
        at = (data_at + size + 3) & ~3
        if name == "TRAILER!!!":
            return out


def fake_module(depends: str) -> bytes:
    """
    Bytes shaped like a .ko's .modinfo section for the parser.
    """
    return b"\x7fELF...\0license=GPL\0depends=" + depends.encode() + b"\0vermagic=6.1.0 SMP\0"


class NewcArchiveTests(unittest.SynchronousTestCase):
    """
    The pure-Python cpio writer.
    """

    def test_round_trip(self) -> None:
        """
        When members are archived, a newc reader finds each one aligned, with
        its name, type and mode, content and device numbers, then the trailer.
        """
        entries = [
            ("bin", stat.S_IFDIR | 0o755, b"", (0, 0)),
            ("dev/console", stat.S_IFCHR | 0o600, b"", (5, 1)),
            ("init", stat.S_IFREG | 0o755, b"#!/bin/sh\necho hi\n", (0, 0)),
            ("odd", stat.S_IFREG | 0o644, b"x" * 5, (0, 0)),
        ]
        members = read_newc(newc_archive(entries))
        self.assertEqual([m[:4] for m in members[:-1]], entries)
        self.assertEqual(members[-1][0], "TRAILER!!!")
        self.assertEqual([m[4] % 4 for m in members], [0] * len(members))


class InitramfsTests(unittest.SynchronousTestCase):
    """
    The tree the guest boots from.
    """

    def setUp(self) -> None:
        modules = [("psmouse.ko", b"PS"), ("evdev.ko", b"EV")]
        self.tree: Dict[str, Tuple[int, bytes, Tuple[int, int]]] = {
            name: (mode, data, rdev) for name, mode, data, rdev in initramfs_entries(b"BUSYBOX", modules)
        }

    def test_console_device(self) -> None:
        """
        When the tree is built, it has C{dev/console} as character device 5,1
        (without it the kernel gives init no console).
        """
        mode, _, rdev = self.tree["dev/console"]
        self.assertTrue(stat.S_ISCHR(mode))
        self.assertEqual(rdev, (5, 1))

    def test_init_and_helpers(self) -> None:
        """
        When the tree is built, C{init}, C{bin/mark} and the pointer watcher
        are executable scripts; init loads the modules, starts the watcher,
        says the ready line on the serial port and runs a shell.
        """
        for name in ("init", "bin/mark", "bin/pointer-watch", "bin/busybox"):
            self.assertTrue(self.tree[name][0] & 0o111, name)
        init = self.tree["init"][1].decode()
        self.assertTrue(init.startswith("#!/bin/busybox sh\n"))
        for part in ("insmod", "/bin/pointer-watch", f'echo "{READY_LINE}" > /dev/ttyS0', "cttyhack sh"):
            self.assertIn(part, init)
        self.assertIn('echo "$*" > /dev/ttyS0', self.tree["bin/mark"][1].decode())

    def test_modules_in_order(self) -> None:
        """
        When modules are given, they are in C{lib/modules} with an C{order}
        file listing them in the given (load) order.
        """
        self.assertEqual(self.tree["lib/modules/order"][1], b"psmouse.ko\nevdev.ko\n")
        self.assertEqual(self.tree["lib/modules/evdev.ko"][1], b"EV")


class ModuleTests(unittest.SynchronousTestCase):
    """
    Picking kernel modules out of an unpacked kernel package.
    """

    def test_depends(self) -> None:
        """
        When a module's .modinfo names dependencies, they are listed; an
        empty C{depends=} is none.
        """
        self.assertEqual(module_depends(fake_module("serio,libps2")), ["serio", "libps2"])
        self.assertEqual(module_depends(fake_module("")), [])

    def test_dependencies_first_and_decompressed(self) -> None:
        """
        When a wanted module depends on an xz-compressed one and on a
        built-in one, the compressed one comes first, decompressed, and the
        built-in one is skipped.
        """
        root = self.mktemp()
        os.makedirs(os.path.join(root, "drivers", "input", "mouse"))
        top = fake_module("lib-ps2,builtin_core")
        dep = fake_module("")
        with open(os.path.join(root, "drivers", "input", "mouse", "psmouse.ko"), "wb") as f:
            f.write(top)
        with open(os.path.join(root, "drivers", "input", "lib_ps2.ko.xz"), "wb") as f:
            f.write(lzma.compress(dep))
        self.assertEqual(collect_modules(root, ["psmouse"]), [("lib_ps2.ko", dep), ("psmouse.ko", top)])

    def test_kernel_package(self) -> None:
        """
        When C{apt-cache depends linux-image-amd64} names a versioned
        package, that is the one to download.
        """
        self.assertEqual(kernel_package(APT_CACHE_DEPENDS), "linux-image-6.1.0-57-amd64")


class CacheTests(unittest.SynchronousTestCase):
    """
    L{ensure_guest} with the downloaded parts already in the cache.
    """

    def setUp(self) -> None:
        self.cache = self.mktemp()
        os.makedirs(os.path.join(self.cache, "modules"))
        for name, data in (("vmlinuz", b"KERNEL"), ("busybox", b"BUSYBOX"), ("modules/evdev.ko", b"EV")):
            with open(os.path.join(self.cache, name), "wb") as f:
                f.write(data)
        with open(os.path.join(self.cache, "modules", "order"), "w") as f:
            f.write("evdev.ko\n")

    def test_builds_once(self) -> None:
        """
        When the parts are cached, the initramfs is built from them without
        a download, gzipped, and a second call answers the same files.
        """
        first = ensure_guest(self.cache)
        self.assertEqual(first.kernel, os.path.join(self.cache, "vmlinuz"))
        with open(first.initrd, "rb") as f:
            names = [m[0] for m in read_newc(gzip.decompress(f.read()))]
        self.assertIn("lib/modules/evdev.ko", names)
        mtime = os.stat(first.initrd).st_mtime_ns
        self.assertEqual(ensure_guest(self.cache), first)
        self.assertEqual(os.stat(first.initrd).st_mtime_ns, mtime)

    def test_new_recipe_replaces_initrd(self) -> None:
        """
        When what goes into the initramfs changes, a new file is written and
        the old one removed.
        """
        first = ensure_guest(self.cache)
        with open(os.path.join(self.cache, "busybox"), "wb") as f:
            f.write(b"BUSYBOX 2")
        second = ensure_guest(self.cache)
        self.assertNotEqual(second.initrd, first.initrd)
        self.assertEqual([n for n in os.listdir(self.cache) if n.startswith("initrd-")], [os.path.basename(second.initrd)])


class BootTests(unittest.SynchronousTestCase):
    """
    How the guest is booted: plain QEMU and libvirt.
    """

    def test_plain_qemu(self) -> None:
        """
        When plain QEMU is asked for, it boots the kernel and initramfs with
        the console command line under TCG, its serial port in the file.
        """
        argv = plain_qemu_argv(GUEST, "/tmp/s.log", vnc="127.0.0.1:10", spice="port=5930,addr=127.0.0.1")
        pairs = dict(zip(argv[1::2], argv[2::2]))
        self.assertEqual(pairs["-machine"], "pc,accel=tcg")
        self.assertEqual(pairs["-m"], "256")
        self.assertEqual((pairs["-kernel"], pairs["-initrd"]), (GUEST.kernel, GUEST.initrd))
        self.assertEqual(pairs["-append"], "console=ttyS0 console=tty0 quiet")
        self.assertEqual(pairs["-serial"], "file:/tmp/s.log")
        self.assertEqual(pairs["-vga"], "qxl")

    def test_domain_xml(self) -> None:
        """
        When the domain XML boots a guest, its C{<os>} has the kernel,
        initramfs and command line (no boot device), and its serial port is
        the file.
        """
        xml = domain_xml("d", UUID, "v", "s", 256, guest=GUEST, serial_path="/srv/serial.log")
        root = etree.fromstring(xml.encode())
        self.assertEqual(root.findtext("os/kernel"), GUEST.kernel)
        self.assertEqual(root.findtext("os/initrd"), GUEST.initrd)
        self.assertEqual(root.findtext("os/cmdline"), GUEST.cmdline)
        self.assertIsNone(root.find("os/boot"))
        self.assertEqual(root.find("devices/serial").get("type"), "file")
        self.assertEqual(root.find("devices/serial/source").get("path"), "/srv/serial.log")
        self.assertEqual(root.findtext("memory"), "256")


class SerialLogTests(unittest.SynchronousTestCase):
    """
    Reading the guest's serial port file.
    """

    def setUp(self) -> None:
        self.path = self.mktemp()
        self.serial = SerialLog(self.path)

    def test_complete_lines(self) -> None:
        """
        When the file has CRLF lines and a partial last line, only the
        complete lines are answered, without line ends; no file is no lines.
        """
        self.assertEqual(self.serial.lines(), [])
        with open(self.path, "wb") as f:
            f.write(b"vm: ready\r\nabc123\r\nmou")
        self.assertEqual(self.serial.lines(), ["vm: ready", "abc123"])
        self.assertTrue(self.serial.has_line("abc123"))
        self.assertFalse(self.serial.has_line("mou"))

    def test_wait(self) -> None:
        """
        When the line is there, waiting returns at once; when it is not,
        waiting fails after the timeout naming what the file holds.
        """
        with open(self.path, "wb") as f:
            f.write(b"vm: ready\n")
        self.assertLess(self.serial.wait_ready(timeout=0), 1.0)
        error = self.assertRaises(RuntimeError, self.serial.wait_for, "missing", 0)
        self.assertIn("vm: ready", str(error))

    def test_wait_stops_when_vm_gone(self) -> None:
        """
        When the VM is gone, waiting fails at once instead of timing out.
        """
        error = self.assertRaises(RuntimeError, self.serial.wait_for, "x", 60, lambda: False)
        self.assertIn("stopped", str(error))
