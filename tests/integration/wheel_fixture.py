"""
vaporproxy as a user installs it: a wheel built from a copy of the checkout,
installed into a fresh venv (the locked dependencies, then the wheel), and
C{twistd -n vaporproxy} started from that venv in a directory outside the
checkout, with no C{PYTHONPATH} and no C{VAPOR_*_DIR} overrides.

Building and installing take about a minute, so one venv is made lazily by
the first test that asks (L{installed}) and removed at interpreter exit.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Callable, Dict, Iterator, List, Optional, Set, Tuple
from urllib.parse import urljoin, urlsplit

from tests.integration.redis_server import stop_process
from tests.support import StartedOnce, free_port

CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: What a build from a clean clone would not see.
NOT_SOURCES = shutil.ignore_patterns(
    ".git", "node_modules", "build", "dist", "*.egg-info", "_trial_temp*", ".stamps", "__pycache__", "results"
)
#: Variables that would make the installed proxy use the checkout's files.
LEAKS = ("PYTHONPATH", "VAPOR_NOVNC_DIR", "VAPOR_SPICE_HTML5_DIR", "VAPOR_LOG_LEVEL")


def clean_environment() -> Dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in LEAKS}


def run(argv: List[str], cwd: Optional[str] = None, timeout: float = 600) -> str:
    """
    Run a command; its output, or an error carrying the output's end.
    """
    done = subprocess.run(
        argv, cwd=cwd, env=clean_environment(), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout,
    )  # fmt: skip
    out = done.stdout.decode("utf-8", "replace")
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {done.returncode}:\n{out[-3000:]}")
    return out


def source_copy(directory: str) -> str:
    """
    A copy of the checkout's sources (no build leftovers) with the
    checkout's C{node_modules} linked in, as after C{git clone; npm ci}.
    """
    source = os.path.join(directory, "src")
    shutil.copytree(CHECKOUT, source, ignore=NOT_SOURCES, symlinks=True)
    os.symlink(os.path.join(CHECKOUT, "node_modules"), os.path.join(source, "node_modules"))
    return source


def build_wheel(source: str, out: str) -> str:
    """
    C{pip wheel --no-deps} of C{source} (an unpacked tree or an sdist) into
    C{out}; the wheel's path.
    """
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-w", out, source])
    wheels = glob.glob(os.path.join(out, "vaporproxy-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one vaporproxy wheel in {out}, found {wheels}")
    return wheels[0]


class InstalledWheel:
    """
    A fresh venv holding the locked dependencies and the wheel.
    """

    def __init__(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="vapor-wheel-")
        self.venv = os.path.join(self.workdir, "venv")
        self.wheel = ""

    def bin(self, name: str) -> str:
        return os.path.join(self.venv, "bin", name)

    def create(self) -> "InstalledWheel":
        self.wheel = build_wheel(source_copy(self.workdir), os.path.join(self.workdir, "dist"))
        run([sys.executable, "-m", "venv", self.venv])
        pip = [self.bin("python"), "-m", "pip", "--disable-pip-version-check"]
        run(pip + ["install", "-q", "--require-hashes", "-r", os.path.join(CHECKOUT, "requirements.lock")])
        run(pip + ["install", "-q", "--no-deps", self.wheel])
        run(pip + ["check"])
        return self

    def package_dir(self) -> str:
        """
        Where the venv's python imports vaporproxy from.
        """
        code = "import os, vaporproxy; print(os.path.dirname(vaporproxy.__file__))"
        return run([self.bin("python"), "-c", code], cwd=self.workdir).strip()

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


#: The shared venv, made on first use.
installed = StartedOnce("building and installing the wheel failed", InstalledWheel, InstalledWheel.create,
                        InstalledWheel.close)


class InstalledProxy:
    """
    C{twistd -n --pidfile= vaporproxy --config vapor.conf} from the venv, in
    a fresh directory outside the checkout.
    """

    def __init__(self, wheel: InstalledWheel, config_for_port: Callable[[int], str]) -> None:
        self.wheel = wheel
        self.port = free_port()
        self.directory = tempfile.mkdtemp(prefix="run-", dir=wheel.workdir)
        self.log_path = os.path.join(self.directory, "twistd.log")
        with open(os.path.join(self.directory, "vapor.conf"), "w") as f:
            f.write(config_for_port(self.port))
        self.process: Optional[subprocess.Popen] = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> "InstalledProxy":
        argv = [self.wheel.bin("twistd"), "-n", "--pidfile=", "vaporproxy", "--config", "vapor.conf"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                argv, cwd=self.directory, env=clean_environment(), stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"twistd exited with {self.process.returncode}: {self.log_tail()}")
            try:
                if fetch(self.base_url + "/healthz")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"twistd not ready after {timeout}s: {self.log_tail()}")

    def log_tail(self, size: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-size:].decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self) -> None:
        stop_process(self.process)


def fetch(url: str) -> Tuple[int, bytes]:
    """
    GET C{url}; (status, body), error statuses included.
    """
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


#: What a page or an ES module loads: <script src>, <link href>, static and dynamic imports.
_LOADS = (
    re.compile(r"""<script[^>]*\ssrc=["']([^"']+)["']"""),
    re.compile(r"""<link[^>]*\shref=["']([^"':]+)["']"""),
    re.compile(r"""^\s*(?:import|export)\b[^'";]*?\bfrom\s*["']([^"']+)["']""", re.M),
    re.compile(r"""^\s*import\s*["']([^"']+)["']""", re.M),
    re.compile(r"""\bimport\(\s*["']([^"']+)["']\s*\)"""),
)


def loaded_urls(url: str, text: str) -> Iterator[str]:
    """
    The same-origin URLs C{text} (a page or a module at C{url}) loads.
    """
    for pattern in _LOADS:
        for ref in pattern.findall(text):
            if ref.startswith(("/", "./", "../")):
                yield urljoin(url, ref)


def crawl(page_url: str) -> Dict[str, int]:
    """
    Fetch a page and, transitively, every script and style it loads; the
    status of each, by path.
    """
    seen: Dict[str, int] = {}
    todo: List[str] = [page_url]
    queued: Set[str] = {page_url}
    while todo:
        url = todo.pop()
        status, body = fetch(url)
        seen[urlsplit(url).path] = status
        if status != 200:
            continue
        for ref in loaded_urls(url, body.decode("utf-8", "replace")):
            if ref not in queued:
                queued.add(ref)
                todo.append(ref)
    return seen
