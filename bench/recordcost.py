"""
The recording path alone, in one process (issue 10): a Twisted reactor
on CPU 0 reads 32 KiB chunks that a feeder process on CPU 1 streams, and
hands each to a real L{ConsoleRecorder} writing through a real
L{DiskWriter} (its thread on CPU 0 too, as in bench/run.py), then prints
the process's CPU milliseconds per MiB and its MiB/s.  With C{--plain} the
chunks are only read: the difference is what recording costs.

    python3 bench/recordcost.py [--plain] [--mib 1024] [--dir /dev/shm] [--keep-pages]

By default a second helper on CPU 1 gives the recording's written pages
back as they are written (punching holes; see bench/variants.py why: on
this VM a fresh page costs a host fault); C{--keep-pages} does not.
Seconds per run, no network, no browser: what changes in the recorder
or the writer shows here first, and bench/run.py's variant rows confirm.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import socket
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

CHUNK = 32 * 1024  # what bench/run.py's recorded console records per read


def _child(cpu: int, body) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            os.sched_setaffinity(0, {cpu})
            body()
        finally:
            os._exit(0)
    return pid


def _feed(sock: socket.socket) -> None:
    data = b"x" * CHUNK
    try:
        while True:
            sock.sendall(data)
    except OSError:
        pass


def _recycle(directory: str) -> None:
    """Give back all but the last MiB of each recording, every 50 ms."""
    libc, done = ctypes.CDLL(None), {}
    while True:
        time.sleep(0.05)
        for path in glob.glob(os.path.join(directory, "*.vprec")):
            try:
                fd = os.open(path, os.O_WRONLY)
            except OSError:
                continue
            start, end = done.get(path, 0), (os.fstat(fd).st_size - (1 << 20)) & ~((1 << 20) - 1)
            if end > start:
                libc.fallocate(fd, 3, ctypes.c_long(start), ctypes.c_long(end - start))  # keep size | punch hole
                done[path] = end
            os.close(fd)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plain", action="store_true", help="read only, record nothing")
    p.add_argument("--mib", type=int, default=1024)
    p.add_argument("--dir", default="/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
    p.add_argument("--keep-pages", action="store_true", help="do not give the written pages back")
    p.add_argument("--glibc-defaults", action="store_true",
                   help="leave malloc's thresholds as they are (the proxy sets them when recording)")
    args = p.parse_args()
    directory = tempfile.mkdtemp(prefix="vaporbench-reccost-", dir=args.dir)
    ours, theirs = socket.socketpair()
    for s in (ours, theirs):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    children = [_child(1, lambda: (ours.close(), _feed(theirs)))]
    theirs.close()
    if not args.keep_pages and not args.plain:
        children.append(_child(1, lambda: _recycle(directory)))
    os.sched_setaffinity(0, {0})

    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol

    from vaporproxy.filewriter import DiskWriter
    from vaporproxy.recordings.recorder import ConsoleRecorder

    if not args.plain and not args.glibc_defaults:
        try:  # as app/services.py's recording_store does
            from vaporproxy.recordings.heap import keep_freed_heap
        except ImportError:  # a tree before it
            pass
        else:
            keep_freed_heap()
    writer = DiskWriter(reactor)
    total = args.mib << 20
    out = {}

    class Console(Protocol):
        received = 0
        pauses = 0

        def connectionMade(self) -> None:
            self.transport.bufferSize = CHUNK  # reads of 32 KiB, records of 32 KiB
            self.recorder = None
            if not args.plain:
                self.recorder = ConsoleRecorder(writer, directory, {"id": "0123abcd", "vm_id": "bench"}, reactor)
                self.recorder.attach(self.hold)
            self.cpu0, self.wall0 = time.process_time(), time.monotonic()

        def hold(self, on: bool) -> None:
            self.pauses += on
            (self.transport.pauseProducing if on else self.transport.resumeProducing)()

        def dataReceived(self, data: bytes) -> None:
            self.received += len(data)
            if self.recorder is not None:
                self.recorder.to_browser(0, data)
            if self.received >= total:
                self.transport.stopReading()
                if self.recorder is not None:
                    self.recorder.finish({})
                writer.stopService()  # waits for the thread: its writing is counted
                mib = self.received / 2**20
                out.update(cpu_ms_per_mib=(time.process_time() - self.cpu0) * 1000 / mib,
                           mib_s=mib / (time.monotonic() - self.wall0), pauses=self.pauses)
                reactor.stop()

    class One(Factory):
        def buildProtocol(self, addr):
            return Console()

    reactor.callWhenRunning(lambda: reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, One()))
    try:
        reactor.run()
    finally:
        for pid in children:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        for f in os.listdir(directory):
            os.unlink(os.path.join(directory, f))
        os.rmdir(directory)
    print(f"{'plain' if args.plain else 'recorded'}: {out['cpu_ms_per_mib']:.3f} ms CPU per MiB, "
          f"{out['mib_s']:,.0f} MiB/s, {out['pauses']} pauses (high-water mark)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
