"""
vaporproxy benchmark (issue #3): vaporproxy beside websockify 0.13, socat
and a direct ceiling, on loopback, in one command.

The proxy under test is pinned to CPU 0, the Node client and backend to CPU 1
(C{taskset}).  Every figure is the median of C{--runs} (default 3) runs.  The
client (C{client.js}) does the client side of an RFB 3.8 handshake on every
path; vaporproxy is driven the browser's way (C{GET .../console} with a Bearer
key, then the WebSocket with the one-time token).

Usage::

    python3 bench/run.py [--quick] [--runs N] [--targets a,b] [--skip-conc]
                         [--profile] [--out FILE]

Writes C{bench/results/latest.json} (and a time-stamped copy) and prints the
table as Markdown.  Not a test; see C{bench/README.md}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import variants  # bench/variants.py (the script's directory is on sys.path)
import stallcheck  # bench/stallcheck.py

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PROXY_CPU = "0"
LOAD_CPU = "1"
VM_NAME = "bench-vm"
VM_UUID = "6a1b7a0e-3c1e-4bde-9d0f-b3a5c0ffee01"


def free_port() -> int:
    """
    A free loopback TCP port.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """
    Wait until something accepts on 127.0.0.1:port, or fail.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s")


def stop(proc: Optional[subprocess.Popen]) -> None:
    """
    Stop a process we started (and its process group, for forking proxies).
    """
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def spawn(argv: List[str], cpu: str, env: Optional[dict] = None, log: Optional[str] = None) -> subprocess.Popen:
    """
    Start argv pinned to cpu in its own process group.
    """
    out = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen(
        ["taskset", "-c", cpu, *argv],
        stdout=out,
        stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )


# ---------------------------------------------------------------- targets


@dataclass
class Target:
    """
    One path under test: how to start it, how the client reaches it.
    """

    name: str
    kind: str  # tcp | ws | vapor
    start: Callable[[], Optional[subprocess.Popen]]
    port_of: Callable[[], int]
    mem_key: str = "rss_kib"  # pss_kib for process-per-connection proxies
    forking: bool = False
    workloads: Optional[List[str]] = None  # None: all
    extra: Dict[str, Any] = field(default_factory=dict)
    proc: Optional[subprocess.Popen] = None
    #: After each steady run: figures merged into the run's result (bench/variants.py).
    probe: Optional[Callable[[str, dict], dict]] = None
    #: After the process stopped (bench/variants.py: remove recordings).
    on_down: Optional[Callable[[], None]] = None

    def up(self) -> None:
        self.proc = self.start()

    def down(self) -> None:
        stop(self.proc)
        self.proc = None
        if self.on_down is not None:
            self.on_down()

    def job_target(self) -> dict:
        return {"kind": self.kind, "host": "127.0.0.1", "port": self.port_of(), **self.extra}


class Bench:
    """
    Holds the backend, the work directory and the targets.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = tempfile.mkdtemp(prefix="vaporbench-")
        self.backend_port = free_port()
        self.backend_ws_port = free_port()
        self.backend: Optional[subprocess.Popen] = None
        self.api_key = secrets.token_hex(24)
        self.admin_key = secrets.token_hex(24)
        self.redis: Optional[subprocess.Popen] = None
        self.redis_port: Optional[int] = None

    # -- redis (the 2-worker line)
    def start_redis(self) -> int:
        """
        A throw-away redis-server on loopback (temp dir, no persistence),
        flushed before each use so every proxy starts from an empty store.
        """
        if self.redis is None or self.redis.poll() is not None:
            exe = shutil.which("redis-server")
            if not exe:
                raise RuntimeError("redis-server not installed (apt-get install redis-server)")
            self.redis_port = free_port()
            rdir = os.path.join(self.work, "redis")
            os.makedirs(rdir, exist_ok=True)
            self.redis = spawn([exe, "--port", str(self.redis_port), "--bind", "127.0.0.1",
                                "--dir", rdir, "--save", "", "--appendonly", "no",
                                "--maxclients", "1000"], "0,1",
                               log=os.path.join(self.work, "redis.log"))
            wait_port(self.redis_port, self.redis)
        with socket.create_connection(("127.0.0.1", self.redis_port), timeout=5) as s:
            s.sendall(b"*1\r\n$8\r\nFLUSHALL\r\n")
            s.recv(64)
        return self.redis_port

    def pin_backend(self, cpus: str) -> None:
        """
        Move the backend (every thread) to cpus.
        """
        if self.backend is not None:
            subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(self.backend.pid)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    # -- backend
    def start_backend(self) -> None:
        self.backend = subprocess.Popen(
            ["taskset", "-c", LOAD_CPU, "node", os.path.join(HERE, "backend.js"),
             "--tcp-port", str(self.backend_port), "--ws-port", str(self.backend_ws_port)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        line = self.backend.stdout.readline()
        if not json.loads(line).get("ready"):
            raise RuntimeError("backend did not start")

    # -- vaporproxy
    def vapor_files(self, port: int, workers: int = 1, redis_port: Optional[int] = None,
                    conf: Optional[dict] = None) -> str:
        """
        The proxy's config (and the libvirt test driver's node).  C{conf}
        (bench/variants.py) adds to it: C{key} (more fields of the bench
        key), C{console} (lines of the console section), C{top} (sections).
        """
        conf = conf or {}
        node = os.path.join(self.work, "node.xml")
        with open(node, "w") as f:
            f.write(
                "<node>\n"
                "  <domain type='test'>\n"
                f"    <name>{VM_NAME}</name>\n    <uuid>{VM_UUID}</uuid>\n"
                "    <memory>131072</memory>\n    <vcpu>1</vcpu>\n"
                "    <os><type>hvm</type></os>\n"
                f"    <devices><graphics type='vnc' port='{self.backend_port}' listen='127.0.0.1'/></devices>\n"
                "  </domain>\n</node>\n"
            )
        path = os.path.join(self.work, f"vapor-{port}.conf")
        sha = hashlib.sha256(self.api_key.encode()).hexdigest()
        admin_sha = hashlib.sha256(self.admin_key.encode()).hexdigest()
        limit = 2 * self.args.max_conc + 1000
        # Shipped defaults except the limits made for one person's use, raised for load: the
        # connection limits, and the per-credential token limits (one bench key mints every
        # token; 0 turns them off).
        lines = [
            "server:",
            f'  listen: ["tcp:{port}:interface=127.0.0.1"]',
        ]
        if workers != 1:
            lines.append(f"  workers: {workers}")
        lines += [
            "auth:",
            "  api_keys:",
            f'    - {{user: bench, sha256: "{sha}", vms: ["*"]{", " + conf["key"] if conf.get("key") else ""}}}',
            f'    - {{user: bench-admin, sha256: "{admin_sha}", admin: true}}',
            "  mint_rate: 0",
            "  max_outstanding_tokens: 0",
            "hypervisors:",
            f'  - uri: "test://{node}"',
            "console:",
            f"  max_connections_per_vm: {limit}",
            f"  max_total_connections: {limit}",
            *conf.get("console", []),
            *conf.get("top", []),
        ]
        if redis_port is not None:
            lines += ["tokens:", "  backend: redis", f'  redis_url: "redis://127.0.0.1:{redis_port}/0"']
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def vapor_target(self, name: str, nvx: bool = True, workers: int = 1,
                     workloads: Optional[List[str]] = None, redis: bool = False,
                     cpu: str = PROXY_CPU, wrapper: Sequence[str] = (),
                     start_timeout: float = 30, conf: Optional[dict] = None) -> Target:
        """
        vaporproxy under C{twistd}, run through C{wrapper} (e.g. valgrind)
        when given.
        """
        port = free_port()
        log = os.path.join(self.work, f"{name}.log")

        def start() -> subprocess.Popen:
            path = self.vapor_files(port, workers, self.start_redis() if redis else None, conf)
            env = dict(os.environ)
            env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
            if not nvx:
                env["AUTOBAHN_USE_NVX"] = "0"
            p = spawn([*wrapper, "twistd", "-n", "--pidfile=", "vaporproxy", "--config", path],
                      cpu, env, log)
            try:
                wait_port(port, p, timeout=start_timeout)
            except RuntimeError as e:
                stop(p)
                with open(log, "rb") as f:
                    tail = f.read()[-1500:].decode(errors="replace")
                raise RuntimeError(f"{name} did not start: {e}\n{tail}")
            return p

        return Target(name, "vapor", start, lambda: port, workloads=workloads,
                      extra={"vm": VM_NAME, "apiKey": self.api_key})

    def targets(self) -> List[Target]:
        b, bws = self.backend_port, self.backend_ws_port
        socat_port, wsfy_port = free_port(), free_port()

        def socat() -> subprocess.Popen:
            p = spawn(["socat", f"TCP-LISTEN:{socat_port},bind=127.0.0.1,fork,reuseaddr,backlog=4096",
                       f"TCP:127.0.0.1:{b},nodelay"], PROXY_CPU)
            wait_port(socat_port, p)
            return p

        def websockify() -> subprocess.Popen:
            p = spawn(["websockify", f"127.0.0.1:{wsfy_port}", f"127.0.0.1:{b}"], PROXY_CPU)
            wait_port(wsfy_port, p)
            return p

        all_targets = [
            Target("direct-tcp", "tcp", lambda: None, lambda: b),
            Target("direct-ws", "ws", lambda: None, lambda: bws),
            Target("socat", "tcp", socat, lambda: socat_port, mem_key="pss_kib", forking=True),
            Target("websockify", "ws", websockify, lambda: wsfy_port, mem_key="pss_kib", forking=True),
            self.vapor_target("vaporproxy"),
            self.vapor_target("vaporproxy-nonvx", nvx=False,
                              workloads=["down1", "up4k", "up64k", "rtt"]),
            *variants.targets(self),
        ]
        wanted = self.args.targets.split(",") if self.args.targets else None
        return [t for t in all_targets if wanted is None or t.name in wanted]

    # -- client
    def client(self, job: dict, timeout: float) -> dict:
        try:
            out = subprocess.run(
                ["taskset", "-c", LOAD_CPU, "node", os.path.join(HERE, "client.js"), json.dumps(job)],
                capture_output=True, timeout=timeout, cwd=HERE,
            )
        except subprocess.TimeoutExpired:
            return {"error": "client timed out"}
        lines = out.stdout.decode().strip().splitlines()
        if not lines:
            return {"error": f"client printed nothing: {out.stderr.decode()[-300:]}"}
        return json.loads(lines[-1])

    def clients(self, jobs: List[dict], timeout: float,
                during: Optional[Callable[[], Any]] = None, during_at: float = 0.0) -> tuple:
        """
        Run several client processes at once (unpinned: the 2-worker line);
        optionally call C{during()} C{during_at} seconds in.  Answers
        (results, what during() answered).
        """
        procs = [subprocess.Popen(["node", os.path.join(HERE, "client.js"), json.dumps(j)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=HERE)
                 for j in jobs]
        seen = None
        if during is not None:
            time.sleep(during_at)
            seen = during()
        out = []
        for p in procs:
            try:
                o, e = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
                out.append({"error": "client timed out"})
                continue
            lines = o.decode().strip().splitlines()
            out.append(json.loads(lines[-1]) if lines else {"error": f"client printed nothing: {e.decode()[-300:]}"})
        return out, seen


def child_pids(pid: int) -> List[int]:
    """
    The direct children of pid (the workers of a supervisor).
    """
    out: List[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def cpu_seconds(pid: int) -> float:
    """
    utime + stime of pid, in seconds.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def system_busy() -> tuple:
    """
    (busy, total) jiffies over all CPUs from /proc/stat.
    """
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def vm_connections(pids: List[int], backend_port: int) -> Dict[str, int]:
    """
    How many established TCP connections to the backend (one per console)
    each pid holds, from /proc/PID/fd and /proc/net/tcp.
    """
    to_backend = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for row in f:
                    cols = row.split()
                    if cols[3] == "01" and int(cols[2].rsplit(":", 1)[1], 16) == backend_port:
                        to_backend.add(cols[9])
        except OSError:
            pass
    out = {}
    for pid in pids:
        n = 0
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:[") and link[8:-1] in to_backend:
                    n += 1
        except OSError:
            pass
        out[str(pid)] = n
    return out


# ---------------------------------------------------------------- workloads


def workloads(args: argparse.Namespace) -> Dict[str, dict]:
    """
    The steady-state workloads: name -> client job (without target).
    """
    w, d = (300, 1000) if args.quick else (400, 1500)
    return {
        "down1": {"workload": "down", "consoles": 1, "warmup_ms": w, "duration_ms": d},
        "down4": {"workload": "down", "consoles": 4, "warmup_ms": w, "duration_ms": d},
        "down16": {"workload": "down", "consoles": 16, "warmup_ms": w, "duration_ms": d},
        "up4k": {"workload": "up", "frame": 4096, "warmup_ms": w, "duration_ms": d},
        "up64k": {"workload": "up", "frame": 65536, "warmup_ms": w, "duration_ms": d},
        "rtt": {"workload": "rtt", "warmup_ms": w, "duration_ms": d},
        "setup1": {"workload": "setup", "parallel": 1, "duration_ms": d},
        "setup8": {"workload": "setup", "parallel": 8, "duration_ms": d},
    }


# name, workload, result key, unit, higher-is-better
FIGURES = [
    ("downstream 1 console", "down1", "mib_s", "MiB/s", True),
    ("downstream 4 consoles", "down4", "mib_s", "MiB/s", True),
    ("downstream 16 consoles", "down16", "mib_s", "MiB/s", True),
    ("upstream 4 KiB frames", "up4k", "mib_s", "MiB/s", True),
    ("upstream 64 KiB frames", "up64k", "mib_s", "MiB/s", True),
    ("RTT 16 B p50", "rtt", "p50_us", "µs", False),
    ("RTT 16 B p99", "rtt", "p99_us", "µs", False),
    ("setup, 1 at a time", "setup1", "per_s", "/s", True),
    ("setup, 8 at a time", "setup8", "per_s", "/s", True),
]
CONC_FIGURES = [
    ("open consoles", "open", "", True),
    ("errors", "errors", "", False),
    ("proxy memory before", "mem_before_kib", "MiB", False),
    ("proxy memory loaded", "mem_loaded_kib", "MiB", False),
    ("memory per console", "per_console_kib", "KiB", False),
    ("ping RTT p99 under load", "p99_ms", "ms", False),
    ("establish rate", "establish_per_s", "/s", True),
]


def median_of(runs: List[dict], key: str) -> Optional[float]:
    vals = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
    return statistics.median(vals) if vals else None


def run_steady(bench: Bench, t: Target, names: List[str], results: dict) -> None:
    jobs = workloads(bench.args)
    for name in names:
        if t.workloads is not None and name not in t.workloads:
            continue
        runs = []
        for i in range(bench.args.runs):
            job = dict(jobs[name], target=t.job_target())
            if t.kind == "vapor" and t.proc:
                job["proxy_pid"] = t.proc.pid  # the proxy's CPU share over the window
            proxy0 = cpu_seconds(t.proc.pid) if t.proc else None
            backend0 = cpu_seconds(bench.backend.pid) if bench.backend else None
            r = bench.client(job, timeout=60)
            if name.startswith("setup") and "error" not in r:
                # CPU per console: the proxy's (CPU 0), and how busy the
                # client and the backend kept CPU 1 (the client reports its
                # own CPU over the workload, start-up excluded).
                done = r.get("done") or 0
                if proxy0 is not None and done:
                    r["proxy_cpu_ms_per_console"] = round((cpu_seconds(t.proc.pid) - proxy0) * 1000 / done, 4)
                if backend0 is not None and r.get("secs"):
                    r["backend_cpu_share"] = round((cpu_seconds(bench.backend.pid) - backend0) / r["secs"], 3)
            if t.probe is not None:
                r.update(t.probe(name, r))
            runs.append(r)
            if "error" in r:
                print(f"  {t.name} {name} run {i + 1}: ERROR {r['error']}", file=sys.stderr)
        results.setdefault(t.name, {})[name] = {"runs": runs}
        summary = {k: median_of(runs, k) for k in ("mib_s", "p50_us", "p99_us", "per_s", "errors",
                                                   "proxy_cpu_ms_per_console", "client_cpu_share",
                                                   "backend_cpu_share")}
        print(f"  {t.name:18} {name:7} " + " ".join(
            f"{k}={v:.1f}" if v >= 10 else f"{k}={v:.3f}" for k, v in summary.items() if v is not None),
            file=sys.stderr)


def run_rtt_interleaved(bench: Bench, targets: List[Target], results: dict) -> None:
    """
    The RTT workload of every target, interleaved: run 1 of each target,
    then run 2 of each, and so on, with all of them started.  Tail latency
    swings with whatever else the host runs; measured target after target
    (minutes apart) the p99 ratios compared different minutes, not
    different proxies.  An idle target costs nothing while another is
    measured.
    """
    job = workloads(bench.args)["rtt"]
    started: List[Target] = []
    try:
        for t in targets:
            if t.workloads is not None and "rtt" not in t.workloads:
                continue
            try:
                t.up()
            except Exception as e:  # reported like the other workloads' failures
                results.setdefault(t.name, {})["rtt"] = {"runs": [{"error": f"did not start: {str(e)[:300]}"}]}
                continue
            started.append(t)
        runs: Dict[str, List[dict]] = {t.name: [] for t in started}
        for i in range(bench.args.runs):
            for t in started:
                r = bench.client(dict(job, target=t.job_target()), timeout=60)
                runs[t.name].append(r)
                if "error" in r:
                    print(f"  {t.name} rtt run {i + 1}: ERROR {r['error']}", file=sys.stderr)
    finally:
        for t in started:
            t.down()
    for t in started:
        results.setdefault(t.name, {})["rtt"] = {"runs": runs[t.name], "interleaved": True}
        summary = {k: median_of(runs[t.name], k) for k in ("p50_us", "p99_us", "errors")}
        print(f"  {t.name:18} rtt     " + " ".join(
            f"{k}={v:.1f}" for k, v in summary.items() if v is not None), file=sys.stderr)


def run_instructions(bench: Bench, results: dict) -> None:
    """
    vaporproxy's user-space instructions per console set-up (8 at a time),
    counted by valgrind's callgrind: a count that other work on the host
    does not move, unlike the set-up rate, which swings with the host's
    load (the direct ceilings move with it).  System calls are not counted
    (the kernel's work), nor are cache misses.  One run: the proxy under
    callgrind, 3 s of warm-up, counters zeroed, 12 s of set-ups, counters
    dumped.
    """
    entry = results.setdefault("vaporproxy", {})
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        entry["setup8_instr"] = {"skipped": "valgrind not installed"}
        return
    out = os.path.join(bench.work, "callgrind.out")
    target = bench.vapor_target("vaporproxy-callgrind", start_timeout=600,
                                wrapper=["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"])
    try:
        target.up()
        proc = target.proc
        job = dict(workloads(bench.args)["setup8"], target=target.job_target())
        bench.client(dict(job, duration_ms=3000), timeout=300)
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], capture_output=True, timeout=60)
        r = bench.client(dict(job, duration_ms=12000), timeout=600)
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], capture_output=True, timeout=60)
        time.sleep(1)
        total = None
        dumps = sorted((f for f in os.listdir(bench.work) if f.startswith("callgrind.out.")),
                       key=lambda f: os.path.getmtime(os.path.join(bench.work, f)))
        if dumps:
            with open(os.path.join(bench.work, dumps[-1])) as f:
                for line in f:
                    if line.startswith(("summary:", "totals:")):
                        total = int(line.split()[1])
        done = r.get("done") or 0
        run_entry = {"instructions": total, "done": done, "errors": r.get("errors"),
                     "instructions_per_console": round(total / done) if total and done else None}
        if "error" in r:
            run_entry["error"] = r["error"]
        entry["setup8_instr"] = {"runs": [run_entry]}
        print(f"  vaporproxy         setup8 under callgrind: {done} consoles, "
              f"{run_entry['instructions_per_console']} instructions per console", file=sys.stderr)
    except Exception as e:  # reported, the rest of the bench goes on
        entry["setup8_instr"] = {"runs": [{"error": str(e)[:500]}]}
    finally:
        target.down()


def run_conc(bench: Bench, t: Target, results: dict) -> None:
    if bench.args.levels:
        levels = [int(x) for x in bench.args.levels.split(",")]
    else:
        levels = [1000] if bench.args.quick else [1000, 5000, 10000]
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    for level in levels:
        if t.forking and level > bench.args.forking_max:
            results.setdefault(t.name, {})[f"conc{level}"] = {
                "skipped": f"process per connection: {level} processes not started (--forking-max)"}
            continue
        n = min(level, bench.args.max_conc, (nofile - 200) // 2)
        runs = []
        for i in range(bench.args.conc_runs):
            t.up()  # a fresh proxy, so "before" is the idle process
            try:
                time.sleep(0.5)
                job = {
                    "workload": "conc", "consoles": n, "parallel": 64,
                    # shorter windows at 5,000+ (the ramp dominates there); still --conc-runs runs
                    "settle_ms": 2000 if level < 5000 else 1500,
                    "hold_ms": 3000 if bench.args.quick or level >= 5000 else 5000,
                    "proxy_pid": t.proc.pid if t.proc else None, "mem_key": t.mem_key,
                    "target": t.job_target(), "timeout_ms": 280000,
                }
                r = bench.client(job, timeout=300)
            finally:
                t.down()
            runs.append(r)
            if "error" in r:
                print(f"  {t.name} conc{level} run {i + 1}: ERROR {r['error']}", file=sys.stderr)
        entry = {"runs": runs, "consoles": n}
        if n != level:
            entry["note"] = f"{n} consoles: the open-files hard limit here is {nofile} (2 fds per console)"
        results.setdefault(t.name, {})[f"conc{level}"] = entry
        print(f"  {t.name:18} conc{level}: " + json.dumps(
            {k: median_of(runs, k) for k in ("open", "errors", "per_console_kib", "p99_ms", "establish_per_s")}),
            file=sys.stderr)


def run_stall(bench: Bench, t: Target, results: dict) -> None:
    runs = []
    for _ in range(bench.args.runs):
        t.up()
        try:
            time.sleep(0.3)
            job = {"workload": "stall", "duration_ms": 3000 if bench.args.quick else 4000,
                   "proxy_pid": t.proc.pid if t.proc else None, "mem_key": t.mem_key,
                   "target": t.job_target()}
            runs.append(bench.client(job, timeout=60))
        finally:
            t.down()
    results.setdefault(t.name, {})["stall"] = {"runs": runs}
    print(f"  {t.name:18} stall: max={median_of(runs, 'mem_max_kib')} KiB "
          f"before={median_of(runs, 'mem_before_kib')} KiB", file=sys.stderr)


WORKER_LINE = [
    # name, workers, redis
    ("vaporproxy-1w-memory", 1, False),
    ("vaporproxy-1w-redis", 1, True),
    ("vaporproxy-2w-redis", 2, True),
]
WORKER_CLIENTS = 2  # client processes per workload in the 2-worker line


def http_json(port: int, path: str, key: str, timeout: float = 5.0) -> Optional[dict]:
    """
    GET a JSON document from the proxy with a Bearer key; None on failure.
    """
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except Exception:
        return None


def wait_workers(bench: Bench, t: Target, workers: int, timeout: float = 30.0) -> List[int]:
    """
    Wait until the proxy answers HTTP and (with workers) every worker runs
    and has published its figures to Redis.  Answers the worker pids (or
    the proxy's own pid for one process).
    """
    port = t.port_of()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = http_json(port, "/api/v1/console/stats", bench.admin_key, timeout=2)
        if body is not None:
            if workers == 1:
                return [t.proc.pid]
            pids = child_pids(t.proc.pid)
            procs = body.get("cluster", {}).get("processes", [])
            if len(pids) >= workers and len(procs) >= workers:
                return pids
        time.sleep(0.2)
    raise RuntimeError(f"{t.name}: {workers} worker(s) not ready after {timeout}s")


def run_worker_line(bench: Bench, results: dict) -> None:
    """
    Issue #4: 1 worker (memory backend, Redis backend) against 2 workers
    (Redis), every process unpinned (proxy, workers, Redis, backend and
    clients all share both cores), 2 client processes per workload.
    """
    jobs = workloads(bench.args)
    split = {
        "down16": lambda j: [dict(j, consoles=j["consoles"] // WORKER_CLIENTS)] * WORKER_CLIENTS,
        "setup8": lambda j: [dict(j, parallel=j["parallel"] // WORKER_CLIENTS)] * WORKER_CLIENTS,
    }
    line: dict = {"clients": WORKER_CLIENTS, "pinning": "none: proxy (all workers), redis-server, "
                  "backend and client processes may all run on both cores"}
    results["workers_line"] = line
    bench.pin_backend("0,1")
    try:
        for name, workers, redis in WORKER_LINE:
            print(f"== {name}", file=sys.stderr)
            t = bench.vapor_target(name, workers=workers, redis=redis, cpu="0,1")
            try:
                t.up()
                pids = wait_workers(bench, t, workers)
            except Exception as e:
                line[name] = {"unavailable": str(e)[:2000]}
                print(f"  {name} unavailable: {str(e)[:500]}", file=sys.stderr)
                t.down()
                continue
            entry: dict = {"workers": workers, "backend": "redis" if redis else "memory", "pids": pids}
            line[name] = entry
            try:
                for wl, fn in split.items():
                    runs = []
                    for i in range(bench.args.runs):
                        cjobs = [dict(j, target=t.job_target()) for j in fn(jobs[wl])]
                        cpu0 = {p: cpu_seconds(p) for p in pids}
                        sup0 = cpu_seconds(t.proc.pid)
                        others0 = {k: cpu_seconds(p.pid) for k, p in (("backend", bench.backend), ("redis", bench.redis)) if p}
                        busy0 = system_busy()
                        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                        mid = (jobs[wl].get("warmup_ms", 0) + jobs[wl]["duration_ms"] / 2) / 1000 + 0.3

                        def sample() -> dict:
                            seen = {"consoles": vm_connections(pids, bench.backend_port)}
                            if workers > 1:
                                body = http_json(t.port_of(), "/api/v1/console/stats", bench.admin_key) or {}
                                seen["stats_processes"] = {
                                    str(pr.get("pid")): pr.get("total_connections")
                                    for pr in body.get("cluster", {}).get("processes", [])}
                            return seen

                        wall0 = time.monotonic()
                        rs, seen = bench.clients(cjobs, timeout=60, during=sample, during_at=mid)
                        wall = time.monotonic() - wall0
                        cpu = {str(p): round(cpu_seconds(p) - cpu0[p], 3) for p in pids}
                        key = "mib_s" if wl.startswith("down") else "per_s"
                        errs = [r["error"] for r in rs if "error" in r]
                        run = {key: sum(r.get(key, 0) for r in rs) if not errs else None,
                               "errors": sum(r.get("errors", 0) for r in rs) + len(errs),
                               "clients": rs, "worker_cpu_s": cpu, **(seen or {})}
                        busy1 = system_busy()
                        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                        run["client_cpu_s"] = round(ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime, 3)
                        run["wall_s"] = round(wall, 3)
                        run["proxy_cores"] = round((sum(cpu.values()) + (cpu_seconds(t.proc.pid) - sup0 if workers > 1 else 0)) / wall, 3)
                        run["machine_busy_pct"] = round(100 * (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]), 1)
                        run["other_cpu_s"] = {k: round(cpu_seconds(p.pid) - others0[k], 3)
                                              for k, p in (("backend", bench.backend), ("redis", bench.redis)) if p and k in others0}
                        if workers > 1:  # the supervisor relays its workers' log lines
                            run["supervisor_cpu_s"] = round(cpu_seconds(t.proc.pid) - sup0, 3)
                        if errs:
                            run["error"] = "; ".join(errs)[:500]
                            print(f"  {name} {wl} run {i + 1}: ERROR {run['error']}", file=sys.stderr)
                        runs.append(run)
                    entry[wl] = {"runs": runs}
                    print(f"  {name:22} {wl:7} " + " ".join(
                        f"{k}={v:.1f}" for k in ("mib_s", "per_s", "errors")
                        if (v := median_of(runs, k)) is not None)
                        + " cpu=" + json.dumps([r["worker_cpu_s"] for r in runs]), file=sys.stderr)
            finally:
                t.down()
    finally:
        bench.pin_backend(LOAD_CPU)


def profile(bench: Bench, t: Target, names: List[str], results: dict) -> None:
    """
    Record py-spy (raw, collapsed stacks) for each workload against vaporproxy.
    """
    if not shutil.which("py-spy"):
        results.setdefault("profiles", {})["error"] = "py-spy not installed"
        return
    jobs = workloads(bench.args)
    outdir = os.path.join(HERE, "results", "profiles")
    os.makedirs(outdir, exist_ok=True)
    t.up()
    try:
        for name in names:
            job = dict(jobs[name], target=t.job_target())
            job["duration_ms"] = 4000
            out = os.path.join(outdir, f"{t.name}-{name}.txt")
            spy = subprocess.Popen(["py-spy", "record", "--pid", str(t.proc.pid), "--rate", "250",
                                    "--duration", "4", "--nonblocking", "--format", "raw", "-o", out],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            r = bench.client(job, timeout=60)
            spy.wait(timeout=30)
            results.setdefault("profiles", {})[name] = {"file": os.path.relpath(out, REPO), "result": r}
    finally:
        t.down()


# ---------------------------------------------------------------- output


def fmt(v: Optional[float], unit: str) -> str:
    if v is None:
        return "–"
    if unit == "MiB" and v is not None:
        return f"{v / 1024:.1f}"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def ratio(a: Optional[float], b: Optional[float]) -> str:
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.2f}"


def table(results: dict, names: List[str]) -> str:
    cols = [n for n in ["direct-tcp", "direct-ws", "socat", "websockify", "vaporproxy", "vaporproxy-nonvx"]
            if n in names]
    head = "| figure | " + " | ".join(cols) + " | vp/websockify | vp/socat |"
    rows = [head, "|" + "---|" * (len(cols) + 3)] if cols else []

    def val(target: str, wl: str, key: str) -> Optional[float]:
        e = results.get(target, {}).get(wl)
        return median_of(e["runs"], key) if e and "runs" in e else None

    for label, wl, key, unit, _ in (FIGURES if cols else []):
        vs = [val(c, wl, key) for c in cols]
        vp, wf, so = val("vaporproxy", wl, key), val("websockify", wl, key), val("socat", wl, key)
        rows.append(f"| {label} ({unit}) | " + " | ".join(fmt(v, unit) for v in vs)
                    + f" | {ratio(vp, wf)} | {ratio(vp, so)} |")
    levels = sorted({int(k[4:]) for c in cols for k in results.get(c, {}) if k.startswith("conc")})
    nofile = results.get("meta", {}).get("nofile", [0, 0])[1]
    for level in levels:
        wl = f"conc{level}"
        if not any(wl in results.get(c, {}) for c in cols):
            continue
        for label, key, unit, _ in CONC_FIGURES:
            vs = [val(c, wl, key) for c in cols]
            cells = []
            for c, v in zip(cols, vs):
                e = results.get(c, {}).get(wl, {})
                cells.append("skipped" if "skipped" in e else fmt(v, unit))
            vp, wf, so = val("vaporproxy", wl, key), val("websockify", wl, key), val("socat", wl, key)
            run_n = {results.get(c, {}).get(wl, {}).get("consoles") for c in cols} - {None, level}
            lvl = f"{level:,}" if not run_n else f"{level:,} (ran {max(run_n):,}, open-files limit {nofile:,})"
            rows.append(f"| {lvl} consoles: {label}{(' (' + unit + ')') if unit else ''} | "
                        + " | ".join(cells) + f" | {ratio(vp, wf)} | {ratio(vp, so)} |")
    instr = val("vaporproxy", "setup8_instr", "instructions_per_console") if "vaporproxy" in cols else None
    if instr is not None:
        cells = [f"{instr / 1e6:.2f}" if c == "vaporproxy" else "–" for c in cols]
        rows.append("| setup, 8 at a time: proxy instructions per console (millions, callgrind) | "
                    + " | ".join(cells) + " | – | – |")
    if any("stall" in results.get(c, {}) for c in cols):
        for label, key in (("stalled reader: memory before", "mem_before_kib"),
                           ("stalled reader: memory max over the stall", "mem_max_kib")):
            vs = [val(c, "stall", key) for c in cols]
            vp, wf, so = (val(n, "stall", key) for n in ("vaporproxy", "websockify", "socat"))
            rows.append(f"| {label} (MiB) | " + " | ".join(fmt(v, "MiB") for v in vs)
                        + f" | {ratio(vp, wf)} | {ratio(vp, so)} |")
    rows += variants.table(results, names)
    rows += worker_table(results.get("workers_line"))
    return "\n".join(rows)


def worker_table(line: Optional[dict]) -> List[str]:
    """
    The 2-worker line (issue #4) as its own Markdown table.
    """
    if not line:
        return []
    names = [n for n, _, _ in WORKER_LINE if n in line]
    rows = ["", f"2-worker line (issue #4): {line.get('pinning')}; {line.get('clients')} client processes "
            "per workload; median of the runs.", "",
            "| figure | " + " | ".join(names) + " | 2w/1w (redis) | 2w/1w (memory) |",
            "|" + "---|" * (len(names) + 3)]

    def val(n: str, wl: str, key: str) -> Optional[float]:
        e = line.get(n, {}).get(wl)
        return median_of(e["runs"], key) if e else None

    for wl, key, label, unit in (("down16", "mib_s", "downstream 16 consoles, aggregate", "MiB/s"),
                                 ("setup8", "per_s", "setup, 8 at a time", "/s")):
        vs = {n: val(n, wl, key) for n in names}
        cells = [("unavailable" if "unavailable" in line.get(n, {}) else fmt(vs[n], unit)) for n in names]
        two = vs.get("vaporproxy-2w-redis")
        rows.append(f"| {label} ({unit}) | " + " | ".join(cells)
                    + f" | {ratio(two, vs.get('vaporproxy-1w-redis'))} | {ratio(two, vs.get('vaporproxy-1w-memory'))} |")
    for wl, key, label, unit in (("down16", "mib_s", "downstream 16", "MiB/s"), ("setup8", "per_s", "setup 8", "/s")):
        cores = {n: val(n, wl, "proxy_cores") for n in names}
        per_core = {n: (val(n, wl, key) / cores[n]) if cores[n] and val(n, wl, key) else None for n in names}
        rows.append(f"| {label}: proxy CPU cores used (workers + supervisor) | "
                    + " | ".join(fmt(cores[n], "") for n in names) + " | | |")
        two, one_r, one_m = (per_core.get(n) for n in ("vaporproxy-2w-redis", "vaporproxy-1w-redis", "vaporproxy-1w-memory"))
        proj = lambda a, b: f"{2 * a / b:.2f} projected" if a and b else "–"  # noqa: E731
        rows.append(f"| {label}: {unit} per proxy core | " + " | ".join(fmt(per_core[n], unit) for n in names)
                    + f" | {proj(two, one_r)} | {proj(two, one_m)} |")
    for wl, label in (("down16", "downstream 16"), ("setup8", "setup 8")):
        cells = []
        for n in names:
            runs = line.get(n, {}).get(wl, {}).get("runs", [])
            if not runs:
                cells.append("–")
                continue

            def med(f: Callable[[dict], float]) -> float:
                return statistics.median(f(r) for r in runs)

            cells.append(f"{med(lambda r: sum(r.get('worker_cpu_s', {}).values()) + r.get('supervisor_cpu_s', 0)):.2f}"
                         f" / {med(lambda r: r.get('client_cpu_s', 0)):.2f}"
                         f" / {med(lambda r: sum(r.get('other_cpu_s', {}).values())):.2f}"
                         f" ({med(lambda r: r.get('machine_busy_pct', 0)):.0f}%)")
        rows.append(f"| {label}: CPU s proxy / clients / backend+redis (machine busy) | "
                    + " | ".join(cells) + " | | |")
    two = line.get("vaporproxy-2w-redis", {})
    blank = " | ".join([""] * (len(names) + 1))
    for wl, label in (("down16", "downstream 16 consoles"), ("setup8", "setup, 8 at a time")):
        runs = two.get(wl, {}).get("runs", [])
        if not runs:
            continue
        shares = []
        for r in runs:
            cpu = list(r.get("worker_cpu_s", {}).values())
            if len(cpu) >= 2 and sum(cpu) > 0:
                shares.append("/".join(f"{100 * c / sum(cpu):.0f}" for c in cpu))
        rows.append(f"| 2 workers, {label}: CPU share per worker, each run (%) | {', '.join(shares)} | {blank} |")
        if wl == "down16":
            cons = ["/".join(str(v) for v in r.get("consoles", {}).values()) for r in runs]
            rows.append(f"| 2 workers, {label}: consoles per worker mid-run, each run | {', '.join(cons)} | {blank} |")
        sup = [r.get("supervisor_cpu_s") for r in runs if r.get("supervisor_cpu_s") is not None]
        wsum = [sum(r.get("worker_cpu_s", {}).values()) for r in runs]
        if sup:
            rows.append(f"| 2 workers, {label}: supervisor CPU / workers' CPU (s) | "
                        f"{statistics.median(sup):.2f} / {statistics.median(wsum):.2f} | {blank} |")
    return rows


def stall_check(bench: Bench, args: argparse.Namespace) -> int:
    """
    --stall-check N (bench/stallcheck.py): prints the runs and the verdict,
    writes results/stallcheck.json; exit status 0 on PASS, 1 on FAIL.
    """
    try:
        verdict = stallcheck.run(bench, bench.vapor_target("vaporproxy"), workloads(args)["up64k"],
                                 args.stall_check)
    finally:
        stop(bench.backend)
        shutil.rmtree(bench.work, ignore_errors=True)
    verdict["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out = os.path.join(os.path.dirname(args.out), "stallcheck.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(verdict, f, indent=1)
    print(stallcheck.report(verdict))
    return 0 if verdict["pass"] else 1


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short runs, 1,000 consoles only")
    p.add_argument("--runs", type=int, default=None, help="runs per figure (default 3; 1 with --quick)")
    p.add_argument("--conc-runs", type=int, default=None, help="runs per concurrency level (default: --runs)")
    p.add_argument("--targets", default="", help="comma list (default all)")
    p.add_argument("--workloads", default="", help="comma list of steady workloads (default all)")
    p.add_argument("--skip-conc", action="store_true")
    p.add_argument("--skip-stall", action="store_true")
    p.add_argument("--max-conc", type=int, default=10000)
    p.add_argument("--levels", default="", help="comma list of concurrency levels (default 1000,5000,10000)")
    p.add_argument("--forking-max", type=int, default=1000,
                   help="largest concurrency level run against process-per-connection proxies")
    p.add_argument("--workers2", action="store_true",
                   help="run the 2-worker line (issue #4) even with --targets (it runs by default otherwise)")
    p.add_argument("--keep-work", action="store_true", help="keep the work directory (configs, proxy logs)")
    p.add_argument("--no-workers2", action="store_true", help="skip the 2-worker line")
    p.add_argument("--profile", action="store_true", help="py-spy profiles of vaporproxy")
    p.add_argument("--no-instructions", action="store_true",
                   help="skip counting vaporproxy's instructions per console set-up under callgrind")
    p.add_argument("--stall-check", type=int, default=0, metavar="N",
                   help="only issue 8's flow-control check: N upstream 64 KiB runs (bench/stallcheck.py)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "latest.json"))
    args = p.parse_args(argv)
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.conc_runs is None:
        args.conc_runs = args.runs
    if not os.path.isdir(os.path.join(HERE, "node_modules", "ws")):
        subprocess.run(["npm", "install", "--no-audit", "--no-fund"], cwd=HERE, check=True)

    bench = Bench(args)
    bench.start_backend()
    if args.stall_check > 0:
        return stall_check(bench, args)
    results: dict = {"meta": {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "quick": args.quick,
        "runs": args.runs, "cpus": os.cpu_count(), "proxy_cpu": PROXY_CPU, "load_cpu": LOAD_CPU,
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
    }}
    names = list(workloads(args))
    if args.workloads:
        names = [n for n in names if n in args.workloads.split(",")]
    ran = []
    started = time.monotonic()
    elapsed = results["meta"]["elapsed_s"] = {}
    # RTT runs interleaved across the targets, after the rest (see
    # run_rtt_interleaved); the other steady workloads target by target.
    interleave_rtt = "rtt" in names
    steady = [n for n in names if n != "rtt"]
    targets = bench.targets()
    try:
        for t in targets:
            t_start = time.monotonic()
            print(f"== {t.name}", file=sys.stderr)
            try:
                t.up()
            except Exception as e:  # a target that cannot start is reported, the rest go on
                results[t.name] = {"unavailable": str(e)[:2000]}
                print(f"  {t.name} unavailable: {str(e)[:500]}", file=sys.stderr)
                continue
            ran.append(t.name)
            try:
                run_steady(bench, t, steady, results)
            finally:
                t.down()
            if t.workloads is None:
                if not args.skip_stall and t.name not in ("direct-tcp", "direct-ws"):
                    run_stall(bench, t, results)
                if not args.skip_conc:
                    run_conc(bench, t, results)
            if t.name == "vaporproxy" and "setup8" in names and not args.quick and not args.no_instructions:
                run_instructions(bench, results)
            if args.profile and t.name == "vaporproxy":
                profile(bench, t, ["down1", "up4k", "setup8"], results)
            elapsed[t.name] = round(time.monotonic() - t_start, 1)
        if interleave_rtt and ran:
            t_start = time.monotonic()
            print("== RTT, interleaved: " + ", ".join(ran), file=sys.stderr)
            run_rtt_interleaved(bench, [t for t in targets if t.name in ran], results)
            elapsed["rtt_interleaved"] = round(time.monotonic() - t_start, 1)
        if args.workers2 or (not args.no_workers2 and not args.targets):
            t_start = time.monotonic()
            run_worker_line(bench, results)
            elapsed["workers_line"] = round(time.monotonic() - t_start, 1)
    finally:
        elapsed["total"] = round(time.monotonic() - started, 1)
        stop(bench.backend)
        stop(bench.redis)
        if args.keep_work:
            print(f"work directory kept: {bench.work}", file=sys.stderr)
        else:
            shutil.rmtree(bench.work, ignore_errors=True)
    md = table(results, ran)
    results["table_markdown"] = md
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    stamped = os.path.join(os.path.dirname(args.out), time.strftime("%Y%m%dT%H%M%S") + ".json")
    shutil.copyfile(args.out, stamped)
    print(md)
    print(f"\nTotal {elapsed['total'] / 60:.1f} min; JSON: {os.path.relpath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
