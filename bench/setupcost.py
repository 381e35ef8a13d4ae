"""
Marginal instructions per console set-up (issue 8), counted by callgrind.

C{bench/run.py}'s figure divides a 12 s window's instructions by the
consoles done in it, so whatever the proxy spends per second rather than
per console (the reactor's loop, timers) is shared out differently when
the host is busy.  This script runs the proxy under
C{valgrind --tool=callgrind} once and counts two client runs of different
lengths (counters zeroed before each, dumped after); the slope

    (instructions of the long run - of the short run)
    / (consoles of the long run - of the short run)

is what one more console costs, and what the two runs share (the tail of
closes after the client stops, per-run start-up) cancels out.

    python3 bench/setupcost.py                    # slope, 8 at a time
    python3 bench/setupcost.py --top 30           # + top C functions per console (callgrind)
    python3 bench/setupcost.py --pyspy 30         # + top Python functions per console (py-spy)
    python3 bench/setupcost.py --json /tmp/sc.json

With C{--top} the per-function figure is also a slope (each function's
inclusive count in both dumps).  With C{--pyspy} the proxy is run again
without valgrind, sampled by py-spy while the same client sets consoles
up, and each Python function's share of samples is turned into
instructions per console with the slope.  Not a test.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import profsummary  # noqa: E402
from run import Bench, workloads  # noqa: E402


def _dumps(work: str) -> List[str]:
    return [f for f in os.listdir(work) if f.startswith("callgrind.out.")]


def dump(pid: int, work: str, timeout: float = 120.0) -> str:
    """
    Ask callgrind for a dump and answer its file once written.
    """
    before = set(_dumps(work))
    subprocess.run(["callgrind_control", "-d", str(pid)], capture_output=True, timeout=timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = set(_dumps(work)) - before
        if new:
            path = os.path.join(work, sorted(new)[0])
            size = -1
            while os.path.getsize(path) != size:  # callgrind writes it in pieces
                size = os.path.getsize(path)
                time.sleep(0.3)
            return path
        time.sleep(0.1)
    raise RuntimeError("callgrind wrote no dump")


def total_of(path: str) -> int:
    """
    The instructions a callgrind dump counted.
    """
    with open(path) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


_ANNOTATE_LINE = re.compile(r"^\s*([\d,]+)\s+\([^)]*\)\s+(.+?)\s*$")


def costs_of(path: str, inclusive: bool) -> Dict[str, int]:
    """
    Each function's inclusive (or self) instruction count (callgrind_annotate).
    """
    out = subprocess.run(["callgrind_annotate", f"--inclusive={'yes' if inclusive else 'no'}",
                          "--threshold=100", path],
                         capture_output=True, text=True, timeout=600).stdout
    counts: Dict[str, int] = {}
    for line in out.splitlines():
        m = _ANNOTATE_LINE.match(line)
        if m and ":" in m.group(2):
            name = m.group(2).split(" [")[0].split("/Python-3")[-1]
            counts[name] = max(counts.get(name, 0), int(m.group(1).replace(",", "")))
    return counts


def counted_run(bench: Bench, pid: int, job: dict, ms: int) -> Tuple[dict, str]:
    """
    Zero the counters, set consoles up for C{ms}, dump: (client's answer, dump file).
    """
    subprocess.run(["callgrind_control", "-z", str(pid)], capture_output=True, timeout=120)
    r = bench.client(dict(job, duration_ms=ms), timeout=ms / 1000 + 300)
    if "error" in r:
        raise RuntimeError(f"client: {r['error']}")
    time.sleep(0.5)  # the last closes
    return r, dump(pid, bench.work)


def measure(bench: Bench, args: argparse.Namespace) -> dict:
    """
    The proxy under callgrind, warm-up, then the short and the long run.
    """
    out = os.path.join(bench.work, "callgrind.out")
    target = bench.vapor_target("vaporproxy-callgrind", start_timeout=600,
                                wrapper=["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"])
    job = dict(workloads(bench.args)[f"setup{args.parallel}"] if args.parallel in (1, 8)
               else dict(workloads(bench.args)["setup8"], parallel=args.parallel))
    target.up()
    pairs = []
    try:
        job["target"] = target.job_target()
        bench.client(dict(job, duration_ms=int(args.warmup * 1000)), timeout=600)
        for _ in range(args.repeat):
            short, short_dump = counted_run(bench, target.proc.pid, job, int(args.short * 1000))
            long_, long_dump = counted_run(bench, target.proc.pid, job, int(args.long * 1000))
            pairs.append((short, short_dump, long_, long_dump))
    finally:
        target.down()
    slopes = []
    for short, short_dump, long_, long_dump in pairs:
        i_s, i_l, d_s, d_l = total_of(short_dump), total_of(long_dump), short["done"], long_["done"]
        if d_l > d_s:
            slopes.append((i_l - i_s) / (d_l - d_s))
    # The figures below are the last pair's; the marginal figure is the median over the pairs.
    i_s, i_l = total_of(short_dump), total_of(long_dump)
    d_s, d_l = short["done"], long_["done"]
    res = {
        "parallel": args.parallel,
        "short": {"ms": int(args.short * 1000), "done": d_s, "instructions": i_s, "errors": short.get("errors"),
                  "per_console": round(i_s / d_s) if d_s else None},
        "long": {"ms": int(args.long * 1000), "done": d_l, "instructions": i_l, "errors": long_.get("errors"),
                 "per_console": round(i_l / d_l) if d_l else None},
        "marginal_per_console": round(statistics.median(slopes)) if slopes else None,
        "slopes": [round(x) for x in slopes],
    }
    if args.top:
        for key, inclusive in (("top_c", True), ("top_c_self", False)):
            a, b = costs_of(short_dump, inclusive), costs_of(long_dump, inclusive)
            rows = [(name, (b[name] - a.get(name, 0)) / (d_l - d_s)) for name in b]
            rows.sort(key=lambda r: -r[1])
            res[key] = [{"function": n, "per_console": round(v)} for n, v in rows[:args.top]]
    return res


def sample_counts(path: str) -> Tuple[collections.Counter, collections.Counter, int]:
    """
    Self and inclusive samples per function of a py-spy raw profile
    (profsummary's reading, as counts).
    """
    self_t: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            frames = [profsummary.frame_name(x) for x in stack.split(";") if x]
            total += n
            if frames:
                self_t[frames[-1]] += n
            for fr in set(frames):
                incl[fr] += n
    return self_t, incl, total


def pyspy(bench: Bench, args: argparse.Namespace, per_console: Optional[int]) -> dict:
    """
    Python functions' share of the proxy's samples while consoles are set
    up (no valgrind), scaled to instructions per console.
    """
    if not shutil.which("py-spy"):
        return {"error": "py-spy not installed"}
    target = bench.vapor_target("vaporproxy-pyspy")
    raw = os.path.join(bench.work, "pyspy.txt")
    target.up()
    try:
        job = dict(workloads(bench.args)["setup8"], parallel=args.parallel, target=target.job_target())
        bench.client(dict(job, duration_ms=1000), timeout=60)
        # --gil: only samples of the thread running Python (idle waits in
        # epoll and the thread pool's idle workers are not work).
        spy = subprocess.Popen(["py-spy", "record", "--gil", "--pid", str(target.proc.pid), "--rate", "500",
                                "--duration", str(int(args.pyspy_secs)), "--nonblocking", "--format", "raw",
                                "-o", raw], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        bench.client(dict(job, duration_ms=int(args.pyspy_secs * 1000) + 500), timeout=120)
        spy.wait(timeout=60)
    finally:
        target.down()
    self_t, incl, total = sample_counts(raw)
    scale = (per_console or 0) / total if total else 0

    def rows(c) -> List[dict]:
        return [{"function": n, "share": round(v / total, 4), "per_console": round(v * scale)}
                for n, v in c.most_common(args.pyspy)]
    return {"samples": total, "inclusive": rows(incl), "self": rows(self_t)}


def report(res: dict) -> str:
    lines = [f"setup {res['parallel']} at a time under callgrind:"]
    for k in ("short", "long"):
        if k not in res:
            continue
        r = res[k]
        lines.append(f"  {k:5} {r['ms'] / 1000:5.1f} s: {r['done']:5} consoles, {r['instructions']:>14,} "
                     f"instructions, {r['per_console']:>10,} per console (errors {r['errors']})")
    m = res["marginal_per_console"]
    lines.append(f"  marginal: {m:,} instructions per console ({m / 1e6:.3f} M)" if m else "  marginal: –")
    if len(res.get("slopes", ())) > 1:
        lines.append("  (median of the pairs' slopes: " + ", ".join(f"{x / 1e6:.3f}" for x in res["slopes"]) + " M)")
    for key, title in (("top_c", "inclusive"), ("top_c_self", "self")):
        if key in res:
            lines.append(f"C functions per console ({title}):")
            lines += [f"  {row['per_console']:>12,}  {row['function']}" for row in res[key]]
    py = res.get("pyspy")
    if py and "error" not in py:
        lines.append(f"py-spy, {py['samples']} samples, scaled to the marginal figure (inclusive):")
        lines += [f"  {r['per_console']:>10,}  {100 * r['share']:5.1f}%  {r['function']}" for r in py["inclusive"]]
        lines.append("self:")
        lines += [f"  {r['per_console']:>10,}  {100 * r['share']:5.1f}%  {r['function']}" for r in py["self"]]
    elif py:
        lines.append(f"py-spy: {py['error']}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parallel", type=int, default=8, help="consoles set up at a time (default 8)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of set-ups before counting")
    p.add_argument("--short", type=float, default=4.0, help="seconds of the short counted run")
    p.add_argument("--long", type=float, default=12.0, help="seconds of the long counted run")
    p.add_argument("--repeat", type=int, default=1,
                   help="short+long pairs counted on the same proxy; the median slope is reported")
    p.add_argument("--top", type=int, default=0, help="print the N C functions costing most per console")
    p.add_argument("--pyspy", type=int, default=0, help="print the N Python functions costing most (py-spy)")
    p.add_argument("--pyspy-secs", type=float, default=8.0)
    p.add_argument("--per-console", type=int, default=0,
                   help="skip callgrind: scale the py-spy shares to this many instructions per console")
    p.add_argument("--json", default="", help="write the figures here too")
    p.add_argument("--keep-work", action="store_true")
    args = p.parse_args(argv)
    if args.long <= args.short:
        p.error("--long must be longer than --short")
    for tool in ("valgrind", "callgrind_control", "callgrind_annotate"):
        if not shutil.which(tool):
            p.error(f"{tool} not installed (apt-get install valgrind)")
    bench = Bench(argparse.Namespace(max_conc=1000, quick=False))
    bench.start_backend()
    try:
        if args.per_console:
            res = {"parallel": args.parallel, "marginal_per_console": args.per_console, "given": True}
        else:
            res = measure(bench, args)
        if args.pyspy:
            res["pyspy"] = pyspy(bench, args, res["marginal_per_console"])
    finally:
        if bench.backend is not None:
            from run import stop
            stop(bench.backend)
        if args.keep_work:
            print(f"work directory kept: {bench.work}", file=sys.stderr)
        else:
            shutil.rmtree(bench.work, ignore_errors=True)
    print(report(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
