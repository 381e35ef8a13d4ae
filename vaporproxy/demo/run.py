"""
C{make run}: a session libvirtd, the interactive test VM, and the proxy in
front of it, until Ctrl-C.

This is a command-line tool that drives external processes: it blocks, on
purpose, and never runs inside the proxy's reactor.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from typing import Optional, Sequence

from vaporproxy.demo.common import LIBVIRTD_BINARY, QEMU_BINARY, missing_binaries, sha256_hex
from vaporproxy.demo.guest import cache_dir, ensure_guest
from vaporproxy.demo.libvirtd import SessionLibvirtd
from vaporproxy.demo.proxy import ProxyProcess, proxy_config_text, with_extra_config
from vaporproxy.static_dirs import static_dirs
from vaporproxy.demo.vm import DemoVM


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python3 -m vaporproxy.demo",
        description="Run vaporproxy in front of a throw-away QEMU VM.",
    )
    p.add_argument("--port", type=int, default=8080, help="HTTP port on 127.0.0.1 (default 8080)")
    p.add_argument("--name", default="vapor-demo", help="the VM's name (default vapor-demo)")
    p.add_argument(
        "--seabios",
        action="store_true",
        help="boot the empty SeaBIOS VM instead of the busybox shell (nothing is downloaded)",
    )
    p.add_argument(
        "--extra-config",
        metavar="FILE",
        help="YAML sections merged over the demo's vapor.conf, e.g. 'recording: {enabled: true}' or "
        "'console: {max_bandwidth: 16}' (the demo's listen address, hypervisor and key stay)",
    )
    return p.parse_args(argv)


def _preflight() -> Optional[str]:
    """
    Why the demo cannot start here, or C{None}.
    """
    missing = missing_binaries([QEMU_BINARY, LIBVIRTD_BINARY, "setpriv", "apt-get", "dpkg-deb"])
    if missing:
        return "missing " + ", ".join(missing)
    if os.geteuid() != 0:
        return "run as root (it starts libvirtd as 'nobody')"
    return None


def _start_vm(daemon: SessionLibvirtd, name: str, seabios: bool) -> DemoVM:
    """
    Start the demo VM; for the busybox guest, wait until it is ready.
    """
    if seabios:
        print(f"starting VM {name!r} (diskless, SeaBIOS)…", flush=True)
        return DemoVM.create(daemon, name=name)
    print(f"preparing the test VM's kernel and initramfs in {cache_dir()} (downloaded once)…", flush=True)
    guest = ensure_guest()
    print(f"starting VM {name!r} (Debian kernel + busybox shell, 256 MiB, TCG)…", flush=True)
    vm = DemoVM.create(daemon, name=name, guest=guest)
    assert vm.serial is not None
    took = vm.serial.wait_ready()
    print(f"VM booted in {took:.1f}s (serial port: {vm.serial.path})", flush=True)
    return vm


def demo_config_text(workdir: str, port: int, uri: str, key: str, extra: Optional[str] = None) -> str:
    """
    The demo's C{vapor.conf}: one admin key for every VM, recordings (when
    C{extra} turns them on without a C{dir}) under C{workdir}.

    @raise ValueError: C{extra} is not a usable configuration.
    """
    text = proxy_config_text(
        listen_port=port,
        hypervisor_uri=uri,
        api_keys=[{"user": "demo", "sha256": sha256_hex(key), "vms": ["*"], "admin": True}],
        sections={"recording": {"dir": os.path.join(workdir, "recordings")}},
    )
    return with_extra_config(text, extra or "", "--extra-config")


def _write_config(workdir: str, text: str) -> str:
    path = os.path.join(workdir, "vapor.conf")
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)
    return path


def _banner(base: str, key: str, vm: DemoVM) -> str:
    """
    What the newcomer reads: the URLs, the key, and what to type.
    """
    if vm.serial is not None:
        what = (
            "The VM boots a root shell ('vm# ') on its screen.  Open a console URL, click the\n"
            "screen and type 'ls' + Enter: the output appears on the screen.  Type\n"
            "'mark hello' + Enter and 'hello' appears in the VM's serial log; clicking in the\n"
            "screen logs 'mouse: click left' there too:\n"
            f"  tail -f {vm.serial.path}\n"
        )
    else:
        what = "The VM shows SeaBIOS ('No bootable device').\n"
    return (
        "\n"
        "vaporproxy demo is running.  The API key below is shown only once.\n"
        f"  API key:  {key}\n"
        f"  VNC:      {base}/console/{vm.name}#key={key}\n"
        f"  SPICE:    {base}/console/{vm.name}?type=spice#key={key}\n"
        f"  API:      curl -H 'Authorization: Bearer {key}' "
        f"{base}/api/v1/virtualization/virtualmachines/{vm.name}/console\n"
        f"  Control room: {base}/admin#key={key}\n"
        f"  VM uuid:  {vm.uuid} (VNC port {vm.ports['vnc']}, SPICE port {vm.ports['spice']}, 127.0.0.1 only)\n"
        + what
        + "Press Ctrl-C to stop the proxy, the VM and libvirtd.\n"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(argv)
    problem = _preflight()
    if problem:
        print(f"vaporproxy demo: {problem}", file=sys.stderr)
        return 2
    if "novnc" not in static_dirs(os.environ):
        print("vaporproxy demo: noVNC not found (no VAPOR_NOVNC_DIR, vendored copy or node_modules); run 'npm ci' first", file=sys.stderr)

    def _on_signal(signum, frame):
        raise KeyboardInterrupt

    extra = None
    if args.extra_config:
        try:
            with open(args.extra_config) as f:
                extra = f.read()
            demo_config_text(tempfile.gettempdir(), args.port, "qemu:///session", "check", extra)
        except OSError as e:
            print(f"vaporproxy demo: --extra-config: cannot read {args.extra_config}: {e.strerror}", file=sys.stderr)
            return 2
        except ValueError as e:
            print(f"vaporproxy demo: {e}", file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, _on_signal)
    workdir = tempfile.mkdtemp(prefix="vapor-demo-")
    os.chmod(workdir, 0o711)  # nobody must reach libvirtd/ below it
    daemon = SessionLibvirtd(base=os.path.join(workdir, "libvirtd"))
    proxy: Optional[ProxyProcess] = None
    try:
        print("starting a session libvirtd as nobody…", flush=True)
        daemon.start()
        vm = _start_vm(daemon, args.name, args.seabios)
        key = secrets.token_urlsafe(32)
        config = demo_config_text(workdir, args.port, daemon.uri, key, extra)
        proxy = ProxyProcess(_write_config(workdir, config), args.port)
        print(f"starting: twistd {' '.join(proxy.argv()[3:])}", flush=True)
        proxy.start(foreground=True)
        print(_banner(proxy.base_url, key, vm), flush=True)
        while proxy.process is not None and proxy.process.poll() is None:
            time.sleep(0.5)
        print(f"twistd exited with {proxy.process.returncode}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping…", flush=True)
        return 0
    except RuntimeError as e:
        print(f"vaporproxy demo: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if proxy is not None:
            proxy.stop()
        daemon.stop()
        shutil.rmtree(workdir, ignore_errors=True)
