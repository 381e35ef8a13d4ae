"""
The shared environment of the end-to-end tests: one session libvirtd (as
C{nobody}), one diskless QEMU VM with a VNC and a SPICE console (SeaBIOS),
on demand a second one booting the interactive test VM (a busybox shell
that reports typed markers and mouse clicks on its serial port), and real
C{twistd vaporproxy} processes with generated configs, plus the Node
browser driver.

Trial has no C{setUpClass}, so the environment is created lazily by the
first test that asks for it and torn down at interpreter exit; every test
module of this package shares it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from typing import Any, Dict, List, Mapping, Optional

from twisted.internet import reactor
from twisted.internet.task import deferLater

from tests.e2e.drivers import run_browser_driver
from tests.support import StartedOnce
from vaporproxy.demo import (
    DemoVM,
    LIBVIRTD_BINARY,
    ProxyProcess,
    QEMU_BINARY,
    SerialLog,
    SessionLibvirtd,
    ensure_guest,
    free_port,
    missing_binaries,
    proxy_config_text,
    repo_root,
    sha256_hex,
)

CHROMIUM = os.environ.get("VAPOR_CHROMIUM", "/usr/bin/chromium")
VM_NAME = "vapor-e2e"
GUEST_VM_NAME = "vapor-e2e-shell"
API_PREFIX = "/api/v1/virtualization/virtualmachines/"


def skip_reason() -> Optional[str]:
    """
    Why the e2e tests cannot run here (a binary or package is truly
    absent), or C{None}.
    """
    missing = missing_binaries([QEMU_BINARY, LIBVIRTD_BINARY, "setpriv", CHROMIUM, "node"])
    root = repo_root()
    for path in (
        os.path.join(root, "node_modules", "playwright-core"),
        os.path.join(root, "node_modules", "@novnc", "novnc", "core", "rfb.js"),
        "/usr/share/spice-html5/main.js",
    ):
        if not os.path.exists(path):
            missing.append(path)
    try:
        import libvirt

        del libvirt
    except ImportError:
        missing.append("libvirt-python")
    if missing:
        return "end-to-end tests need: " + ", ".join(missing) + " (make test installs them)"
    return None


class Environment:
    """
    One libvirtd, one VM, an API key, and proxies started on demand.
    """

    def __init__(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="vapor-e2e-")
        os.chmod(self.workdir, 0o711)
        self.daemon = SessionLibvirtd(base=os.path.join(self.workdir, "libvirtd"), idle_timeout=900)
        self.vm: Optional[DemoVM] = None
        self._guest_vm: Optional[DemoVM] = None
        self._guest_failure: Optional[BaseException] = None
        self.guest_boot_seconds: Optional[float] = None
        self.key = secrets.token_urlsafe(32)
        self.proxies: Dict[str, ProxyProcess] = {}

    def start(self) -> "Environment":
        self.daemon.start()
        self.vm = DemoVM.create(self.daemon, name=VM_NAME)
        return self

    def guest_vm(self) -> DemoVM:
        """
        The interactive test VM, built (once, cached) and booted the first
        time it is asked for: blocks until its serial port says C{vm: ready}.
        """
        if self._guest_failure is not None:
            raise RuntimeError(f"the interactive test VM failed to start: {self._guest_failure}")
        if self._guest_vm is None:
            try:
                vm = DemoVM.create(self.daemon, name=GUEST_VM_NAME, guest=ensure_guest())
                assert vm.serial is not None
                self.guest_boot_seconds = vm.serial.wait_ready()
            except BaseException as e:
                self._guest_failure = e
                raise
            self._guest_vm = vm
        return self._guest_vm

    def config_text(self, port: int, console: Optional[Mapping[str, Any]] = None,
                    sections: Optional[Mapping[str, Any]] = None) -> str:  # fmt: skip
        return proxy_config_text(
            listen_port=port,
            hypervisor_uri=self.daemon.uri,
            api_keys=[{"user": "e2e", "sha256": sha256_hex(self.key), "vms": ["*"], "admin": True}],
            console=console,
            sections=sections,
        )

    def proxy(self, name: str, console: Optional[Mapping[str, Any]] = None,
              sections: Optional[Mapping[str, Any]] = None) -> ProxyProcess:  # fmt: skip
        """
        The proxy called C{name}, started with C{console} overrides the
        first time it is asked for.
        """
        if name not in self.proxies:
            port = free_port()
            path = os.path.join(self.workdir, f"vapor-{name}.conf")
            with open(path, "w") as f:
                f.write(self.config_text(port, console, sections))
            proxy = ProxyProcess(path, port, log_path=os.path.join(self.workdir, f"proxy-{name}.log"))
            self.proxies[name] = proxy
            proxy.start()
        proxy = self.proxies[name]
        if proxy.process is None or proxy.process.poll() is not None:
            raise RuntimeError(f"proxy {name!r} is not running" + proxy.log_tail())
        return proxy

    def rewrite_config(self, name: str, console: Mapping[str, Any]) -> None:
        """
        Replace the config file of proxy C{name} (then call C{reload()}).
        """
        proxy = self.proxies[name]
        with open(proxy.config_path, "w") as f:
            f.write(self.config_text(proxy.port, console))

    def proxy_log(self, name: str, tail: int = 4000) -> str:
        proxy = self.proxies.get(name)
        if proxy is None or proxy.log_path is None or not os.path.exists(proxy.log_path):
            return ""
        with open(proxy.log_path, "rb") as f:
            data = f.read()
        return data[-tail:].decode("utf-8", "replace")

    def close(self) -> None:
        for proxy in self.proxies.values():
            proxy.stop()
        self.daemon.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


#: The shared environment, started on first use (blocking, a few seconds).
environment = StartedOnce("e2e environment failed to start", Environment, Environment.start, Environment.close)


async def wait_for_serial(serial: SerialLog, line: str, timeout: float = 30.0, count: int = 1) -> None:
    """
    Wait, without blocking the reactor, until C{line} is on the serial port
    C{count} times.
    """
    for _ in range(int(timeout / 0.2)):
        if serial.lines().count(line) >= count:
            return
        await deferLater(reactor, 0.2, lambda: None)
    raise AssertionError(f"{line!r} never reached the serial port {count} time(s); it has: {serial.tail(20)}")


async def run_driver(spec: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """
    Run the browser driver with C{spec}; its per-step results.
    """
    report = await run_browser_driver("driver.mjs", spec)
    if "fatal" in report:
        raise AssertionError(f"browser driver failed: {report['fatal']}")
    return report["results"]
