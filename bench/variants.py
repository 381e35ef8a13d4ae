"""
Consoles with stages on (issues 9, 10) beside the same console without:
view-only, the clipboard from the VM filtered, a 10 MiB/s throttle, and a
recorded console.  Each is vaporproxy with one setting changed, run as its
own target (C{vaporproxy-viewonly}, ...) on downstream 1 and 16 consoles and
set-up 8 at a time; L{table} gives each figure and its ratio to plain
C{vaporproxy} from the same run.

The downstream workload streams real RFB FramebufferUpdates after a real
FramebufferUpdateRequest (backend.js), so that the stages that frame the
browser's messages (view-only) or the VM's (C{from_vm: false}) pass it.

The recorded console writes to a directory on tmpfs (C{/dev/shm} when
there is one, or C{$VAPORBENCH_RECORDING_BASE}: the figure is the proxy's
cost, not a disk's); after each run the recordings are measured (bytes on
disk against bytes the browser got, C{vaporproxy_recordings_dropped}) and
deleted.

Appending to tmpfs costs the kernel a fresh page per 4 KiB, and on this
bench's VM (virtio-balloon free page reporting) a page the host must fault
back in: 0.8-2.1 ms per MiB appended, more than the whole plain relay.  A
real disk's page cache is written back and its pages reused.  So a second
recorded target, C{vaporproxy-recorded-recycled}, has the bench give the
written pages back as they are written (C{fallocate} punching holes in all
but the last MiB of each file, every 50 ms, from the load CPU), and the
kernel reuses them: the cost of the same writes then is about 0.4 ms per
MiB (bench/README.md).
"""

from __future__ import annotations

import ctypes
import glob
import os
import shutil
import statistics
import tempfile
import threading
import time
import urllib.request
from typing import Any, Dict, List, Optional

__all__ = ["VARIANTS", "WORKLOADS", "targets", "table"]

#: The workloads every variant runs (plain vaporproxy runs them in the main set).
WORKLOADS = ["down1", "down16", "setup8"]

#: name, what it is, the config it adds (see run.Bench.vapor_files).
VARIANTS = [
    ("vaporproxy-viewonly", "view-only (key access: view)", {"key": "access: view"}),
    ("vaporproxy-clipboard", "clipboard from_vm: false",
     {"console": ["  clipboard: {to_vm: true, from_vm: false, max_size: null}"]}),
    ("vaporproxy-throttle", "throttle 10 MiB/s (max_bandwidth: 10240)", {"console": ["  max_bandwidth: 10240"]}),
    # The recording section is made per start.
    ("vaporproxy-recorded", "recorded (dir on tmpfs)", None),
    ("vaporproxy-recorded-recycled", "recorded, tmpfs pages recycled", None),
]

#: The CPU of the client and the backend (run.LOAD_CPU): the recycling's too.
LOAD_CPU = 1

#: fallocate(2) flags: give back a file's pages in a range, its size unchanged.
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 1, 2

#: label, workload, result key, unit
FIGURES = [
    ("downstream 1 console", "down1", "mib_s", "MiB/s"),
    ("downstream 16 consoles", "down16", "mib_s", "MiB/s"),
    ("setup, 8 at a time", "setup8", "per_s", "/s"),
]


def _recording_dir() -> str:
    base = os.environ.get("VAPORBENCH_RECORDING_BASE")
    if not base:
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix="vaporbench-rec-", dir=base)


class Recorded:
    """
    The recorded variant's side: its recording section, and after each run
    what was recorded (then deleted, so tmpfs does not fill).
    """

    def __init__(self, bench: Any, recycle: bool = False):
        self.bench = bench
        self.recycle = recycle
        self._recycler: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self.dir = ""
        self.dropped_seen = 0.0
        self.target: Any = None
        #: The config it adds, filled at each start (a fresh directory).
        self.conf: dict = {"top": []}

    def start(self, start: Any) -> Any:
        self.dir = _recording_dir()
        self.conf["top"][:] = ["recording:", "  enabled: true", f'  dir: "{self.dir}"', '  vms: ["*"]']
        if self.recycle and self._recycler is None:
            self._stop.clear()
            self._recycler = threading.Thread(target=self._recycle, args=(self.dir,), daemon=True)
            self._recycler.start()
        return start()

    def _recycle(self, directory: str) -> None:
        """
        Every 50 ms, give back the pages of each recording but its last MiB
        (the bench only measures the files' sizes, which stay), so that the
        kernel reuses them as it would a disk's written-back page cache.
        """
        try:
            os.sched_setaffinity(0, {LOAD_CPU})  # this thread only
        except OSError:
            pass
        libc = ctypes.CDLL(None, use_errno=True)
        done: Dict[str, int] = {}
        while not self._stop.wait(0.05):
            for path in glob.glob(os.path.join(directory, "*.vprec")):
                try:
                    fd = os.open(path, os.O_WRONLY)
                except OSError:
                    continue
                try:
                    start, end = done.get(path, 0), (os.fstat(fd).st_size - (1 << 20)) & ~((1 << 20) - 1)
                    if end > start:
                        libc.fallocate(fd, _FALLOC_FL_KEEP_SIZE | _FALLOC_FL_PUNCH_HOLE,
                                       ctypes.c_long(start), ctypes.c_long(end - start))
                        done[path] = end
                finally:
                    os.close(fd)

    def dropped(self) -> Optional[float]:
        """vaporproxy_recordings_dropped from /metrics (admin key), or None."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.target.port_of()}/metrics",
                                     headers={"Authorization": f"Bearer {self.bench.admin_key}"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                text = r.read().decode()
        except Exception:
            return None
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("vaporproxy_recordings_dropped") and not line.startswith("#")
                   and "_created" not in line.split()[0])

    def probe(self, workload: str, result: dict) -> dict:
        """
        After a run: the recordings' bytes once the disk thread is done
        (their sizes stop changing), the drops during the run; then delete them.
        """
        size, last, deadline = -1, -2, time.monotonic() + 10
        while size != last and time.monotonic() < deadline:
            last = size
            time.sleep(0.3)
            size = sum(os.path.getsize(f) for f in glob.glob(os.path.join(self.dir, "*.vprec")))
        dropped = self.dropped()
        out: Dict[str, Any] = {"recorded_bytes": size,
                               "recordings": len(glob.glob(os.path.join(self.dir, "*.vprec")))}
        if dropped is not None:
            out["recordings_dropped"] = dropped - self.dropped_seen
            self.dropped_seen = dropped
        if result.get("bytes"):
            # Records carry an 11-byte header each, and the handshake: >= 1 when nothing was lost.
            out["recorded_share"] = round(size / result["bytes"], 4)
        for f in os.listdir(self.dir):
            try:
                os.unlink(os.path.join(self.dir, f))
            except OSError:
                pass
        return out

    def on_down(self) -> None:
        self.dropped_seen = 0.0
        if self._recycler is not None:
            self._stop.set()
            self._recycler.join(5)
            self._recycler = None
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def targets(bench: Any) -> List[Any]:
    """The variant targets (run.Target), each running L{WORKLOADS} only."""
    out = []
    for name, _, conf in VARIANTS:
        if conf is not None:
            out.append(bench.vapor_target(name, workloads=list(WORKLOADS), conf=conf))
            continue
        rec = Recorded(bench, recycle=name.endswith("-recycled"))
        t = bench.vapor_target(name, workloads=list(WORKLOADS), conf=rec.conf)
        t.start = lambda start=t.start, rec=rec: rec.start(start)
        t.probe = rec.probe
        t.on_down = rec.on_down
        rec.target = t
        out.append(t)
    return out


def _median(results: dict, target: str, wl: str, key: str) -> Optional[float]:
    runs = results.get(target, {}).get(wl, {}).get("runs", [])
    vals = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
    return statistics.median(vals) if vals else None


def _cpu_ms_per_mib(results: dict, target: str, wl: str) -> Optional[float]:
    """The proxy's CPU milliseconds per MiB relayed (median of the runs): what other work on the host moves least."""
    runs = results.get(target, {}).get(wl, {}).get("runs", [])
    vals = [1000 * r["proxy_cpu_share"] / r["mib_s"] for r in runs
            if isinstance(r.get("proxy_cpu_share"), (int, float)) and r.get("mib_s")]
    return statistics.median(vals) if vals else None


def _fmt(v: Optional[float]) -> str:
    if v is None:
        return "–"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def table(results: dict, names: List[str]) -> List[str]:
    """
    The variants' Markdown table: each figure, and in brackets its ratio to
    plain vaporproxy in the same run (higher is better for every figure).
    """
    cols = [(n, label) for n, label, _ in VARIANTS if n in names]
    if not cols:
        return []
    rows = ["", "Consoles with stages on (issues 9, 10): each figure and its ratio to plain vaporproxy "
            "(same run; median of the runs).", "",
            "| figure | vaporproxy | " + " | ".join(label for _, label in cols) + " |",
            "|" + "---|" * (len(cols) + 2)]
    for label, wl, key, unit in FIGURES:
        base = _median(results, "vaporproxy", wl, key)
        cells = []
        for n, _ in cols:
            v = _median(results, n, wl, key)
            ratio = f" ({v / base:.2f})" if v is not None and base else ""
            cells.append(_fmt(v) + ratio)
        rows.append(f"| {label} ({unit}) | {_fmt(base)} | " + " | ".join(cells) + " |")
    for label, wl, key in (
        ("downstream 1: proxy CPU share", "down1", "proxy_cpu_share"),
        ("downstream 16: proxy CPU share", "down16", "proxy_cpu_share"),
        # Summed over the proxy's threads (a recording's disk thread waits behind the reactor too).
        ("downstream 1: proxy runnable, waiting for a CPU (share)", "down1", "proxy_wait_share"),
        ("downstream 16: proxy runnable, waiting for a CPU (share)", "down16", "proxy_wait_share"),
    ):
        base = _median(results, "vaporproxy", wl, key)
        rows.append(f"| {label} | {_fmt(base)} | "
                    + " | ".join(_fmt(_median(results, n, wl, key)) for n, _ in cols) + " |")
    for label, wl in (("downstream 1: proxy CPU ms per MiB", "down1"),
                      ("downstream 16: proxy CPU ms per MiB", "down16")):
        base = _cpu_ms_per_mib(results, "vaporproxy", wl)
        cells = []
        for n, _ in cols:
            v = _cpu_ms_per_mib(results, n, wl)
            cells.append(_fmt(v) + (f" ({v / base:.2f})" if v is not None and base else ""))
        rows.append(f"| {label} | {_fmt(base)} | " + " | ".join(cells) + " |")
    recorded = [n for n, _ in cols if n.startswith("vaporproxy-recorded")]
    if recorded:
        cells = {}
        for rn in recorded:
            parts = []
            for wl in ("down1", "down16", "setup8"):
                runs = results.get(rn, {}).get(wl, {}).get("runs", [])
                drops = sum(r.get("recordings_dropped", 0) for r in runs)
                share = _median(results, rn, wl, "recorded_share")
                parts.append(f"{wl}: {drops:.0f} dropped" + (f", recorded/received {share:.3f}" if share else ""))
            cells[rn] = "; ".join(parts)
        rows.append("| recorded: recordings dropped (all runs), bytes recorded / received | – | "
                    + " | ".join(cells.get(n, "") for n, _ in cols) + " |")
    return rows
