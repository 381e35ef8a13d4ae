"""
Issue 8's acceptance check of flow control: "each direction pauses at the
high-water mark and resumes at a low-water mark; five quick runs of
upstream 64 KiB within +-10 % of each other, proxy CPU >= 85 % in each".

A relay that stalls (a direction paused and never resumed until a buffer
fully drains, or a timer) shows as runs far apart and a proxy idling while
there is work.  C{python3 bench/run.py --stall-check 5} runs the upstream
64 KiB workload N times against one vaporproxy (pinned to its CPU, as in
the rest of the bench) and prints each run's MiB/s and the proxy's CPU
share over the measured window, the spread, and PASS or FAIL.

"Within +-10 % of each other" is read as: every run within 10 % of the
median run.  The proxy's CPU share is its user + system time over the
window (C{/proc/PID/stat}, read by the client at the window's edges).
Each run also shows the share of the window the proxy's threads were
runnable but waiting for a CPU (C{schedstat}): other work on the host,
not the proxy, when it is large (then the verdict says little).
"""

from __future__ import annotations

import statistics
from typing import Any, Dict, List

__all__ = ["MAX_DEVIATION", "MIN_CPU", "judge", "report", "run"]

#: Every run within this share of the median run.
MAX_DEVIATION = 0.10
#: The proxy's least CPU share in every run.
MIN_CPU = 0.85


def judge(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """
    The verdict on C{runs} (each with C{mib_s} and C{proxy_cpu_share}, or
    C{error}): the spread and PASS/FAIL with the reasons.
    """
    failures = [f"run {i + 1}: {r['error']}" for i, r in enumerate(runs) if "error" in r]
    rates = [r["mib_s"] for r in runs if isinstance(r.get("mib_s"), (int, float))]
    out: Dict[str, Any] = {"runs": runs}
    if not rates:
        failures.append("no run measured")
    else:
        median = statistics.median(rates)
        deviation = max(abs(v - median) for v in rates) / median if median else float("inf")
        out.update(median_mib_s=round(median, 1), max_deviation=round(deviation, 4),
                   spread=round((max(rates) - min(rates)) / min(rates), 4) if min(rates) else None)
        if deviation > MAX_DEVIATION:
            failures.append(f"a run is {deviation:.1%} off the median (most allowed {MAX_DEVIATION:.0%})")
    for i, r in enumerate(runs):
        cpu = r.get("proxy_cpu_share")
        if "error" not in r and (cpu is None or cpu < MIN_CPU):
            failures.append(f"run {i + 1}: proxy CPU {'unknown' if cpu is None else f'{cpu:.0%}'} "
                            f"(least allowed {MIN_CPU:.0%})")
    out["pass"] = not failures
    out["failures"] = failures
    return out


def report(verdict: Dict[str, Any]) -> str:
    """The verdict as lines of text."""
    lines = []
    for i, r in enumerate(verdict["runs"]):
        if "error" in r:
            lines.append(f"run {i + 1}: ERROR {r['error']}")
            continue
        cpu, wait, load = r.get("proxy_cpu_share"), r.get("proxy_wait_share"), r.get("load_cpu_share")
        lines.append(f"run {i + 1}: {r['mib_s']:8.1f} MiB/s   proxy CPU {'–' if cpu is None else f'{cpu:.0%}'}"
                     + ("" if wait is None else f"   (runnable, waiting for a CPU: {wait:.0%})")
                     + ("" if load is None else f"   load side (client + backend) CPU {load:.0%}"))
    if "median_mib_s" in verdict:
        lines.append(f"median {verdict['median_mib_s']:.1f} MiB/s; largest deviation from the median "
                     f"{verdict['max_deviation']:.1%}; spread (max-min)/min {verdict['spread']:.1%}")
    lines.append("PASS" if verdict["pass"] else "FAIL: " + "; ".join(verdict["failures"]))
    return "\n".join(lines)


def run(bench: Any, target: Any, job: Dict[str, Any], n: int) -> Dict[str, Any]:
    """
    N runs of C{job} (upstream 64 KiB) against C{target} (a started-once
    vaporproxy), the client reading the proxy's CPU at the window's edges.
    """
    target.up()
    try:
        runs = []
        for _ in range(n):
            backend_pid = bench.backend.pid if getattr(bench, "backend", None) is not None else None
            r = bench.client(dict(job, target=target.job_target(), proxy_pid=target.proc.pid,
                                  backend_pid=backend_pid), timeout=60)
            if "error" not in r and r.get("errors"):
                r["error"] = "the console closed during the run"
            runs.append(r)
    finally:
        target.down()
    return judge(runs)
