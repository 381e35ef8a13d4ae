"""
A runnable demo of vaporproxy against a real QEMU VM (C{make run}).

C{python3 -m vaporproxy.demo} starts a session C{libvirtd} as user
C{nobody} in a temporary directory, defines and starts a small diskless VM
with a VNC and a SPICE console (both password protected), writes a demo
C{vapor.conf} with a fresh random API key (stored as its SHA-256; the key is
printed once), runs C{twistd -n vaporproxy --config <that file>} and prints
the URL to open.  Ctrl-C or SIGTERM stops the proxy, the VM and libvirtd.

The same helpers (L{SessionLibvirtd}, L{domain_xml}, L{DemoVM},
L{proxy_config_text}) are the fixture of the end-to-end tests in
C{tests/e2e}.

This is a command-line tool that drives external processes: it blocks, on
purpose, and never runs inside the proxy's reactor.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence
from xml.sax.saxutils import quoteattr

from lxml import etree

#: The display port range given to the session libvirtd (REAL-WORLD.md).
PORT_MIN = 5950
PORT_MAX = 5999

QEMU_BINARY = "/usr/bin/qemu-system-x86_64"
LIBVIRTD_BINARY = "/usr/sbin/libvirtd"

#: Environment of the unprivileged daemon: nothing leaks in from ours.
_BASE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def _terminate(process: Optional["subprocess.Popen[bytes]"]) -> None:
    """
    SIGTERM C{process} if it still runs; SIGKILL it after 10 s.
    """
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def repo_root() -> str:
    """
    The directory holding the C{vaporproxy} package (and C{node_modules}).
    """
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def missing_binaries(names: Iterable[str]) -> List[str]:
    """
    The names among C{names} that are neither an existing absolute path nor
    found on C{PATH} (also searching the sbin directories).
    """
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    missing = []
    for name in names:
        if os.path.isabs(name):
            if not os.access(name, os.X_OK):
                missing.append(name)
        elif shutil.which(name, path=path) is None:
            missing.append(name)
    return missing


def free_port(host: str = "127.0.0.1") -> int:
    """
    A TCP port that was free on C{host} a moment ago.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def sha256_hex(secret: str) -> str:
    """
    The lower-case hex SHA-256 of C{secret} (how API keys are stored).
    """
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------
# Session libvirtd
# ---------------------------------------------------------------------------


class SessionLibvirtd:
    """
    A C{libvirtd} running as C{nobody} with its own directories under a
    temporary directory; root talks to it through its socket.

    @ivar base: the temporary directory.
    @ivar uri: the libvirt URI to connect to (C{qemu:///session?socket=…}).
    """

    def __init__(
        self,
        base: Optional[str] = None,
        port_min: int = PORT_MIN,
        port_max: int = PORT_MAX,
        idle_timeout: Optional[int] = None,
        user: str = "nobody",
        group: str = "nogroup",
    ) -> None:
        self.base = base if base is not None else tempfile.mkdtemp(prefix="vapor-libvirtd-")
        self.port_min = port_min
        self.port_max = port_max
        self.idle_timeout = idle_timeout
        self.user = user
        self.group = group
        self.process: Optional[subprocess.Popen] = None
        self._log = None

    @property
    def socket_path(self) -> str:
        return os.path.join(self.base, "run", "libvirt", "libvirt-sock")

    @property
    def uri(self) -> str:
        return "qemu:///session?socket=" + self.socket_path

    @property
    def log_path(self) -> str:
        return os.path.join(self.base, "libvirtd.log")

    def _environment(self) -> Dict[str, str]:
        b = self.base
        return {
            "PATH": _BASE_PATH,
            "HOME": os.path.join(b, "home"),
            "XDG_RUNTIME_DIR": os.path.join(b, "run"),
            "XDG_CONFIG_HOME": os.path.join(b, "config"),
            "XDG_CACHE_HOME": os.path.join(b, "cache"),
            "XDG_DATA_HOME": os.path.join(b, "data"),
        }

    def start(self, timeout: float = 30.0) -> "SessionLibvirtd":
        """
        Prepare the directories, start the daemon and wait until its socket
        accepts a libvirt connection.
        """
        import pwd

        b = self.base
        for sub in ("home", "run", "config/libvirt", "cache", "data"):
            os.makedirs(os.path.join(b, sub), exist_ok=True)
        with open(os.path.join(b, "config", "libvirt", "qemu.conf"), "w") as f:
            f.write(
                'stdio_handler = "file"\n'
                f"remote_display_port_min = {self.port_min}\n"
                f"remote_display_port_max = {self.port_max}\n"
            )
        pw = pwd.getpwnam(self.user)
        for root, dirs, files in os.walk(b):
            os.chown(root, pw.pw_uid, pw.pw_gid)
            for name in files:
                os.chown(os.path.join(root, name), pw.pw_uid, pw.pw_gid)
        os.chmod(os.path.join(b, "run"), 0o700)
        # The temporary directory itself is 0700 root-owned by mkdtemp; it is
        # chowned above, and root may always enter it.
        argv = [
            "setpriv",
            f"--reuid={self.user}",
            f"--regid={self.group}",
            "--clear-groups",
            LIBVIRTD_BINARY,
        ]
        if self.idle_timeout:
            argv += ["--timeout", str(int(self.idle_timeout))]
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            argv,
            env=self._environment(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=os.path.join(b, "home"),
            start_new_session=True,
        )
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        import libvirt

        libvirt.registerErrorHandler(lambda ctx, err: None, None)
        deadline = time.monotonic() + timeout
        last: Optional[Exception] = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"libvirtd exited with {self.process.returncode}; see {self.log_path}"
                )
            if os.path.exists(self.socket_path):
                try:
                    conn = libvirt.open(self.uri)
                    conn.close()
                    return
                except libvirt.libvirtError as e:
                    last = e
            time.sleep(0.05)
        raise RuntimeError(f"libvirtd not ready after {timeout}s: {last}")

    def connect(self):
        """
        A new read-write libvirt connection to this daemon.
        """
        import libvirt

        return libvirt.open(self.uri)

    def _qemu_pids(self) -> List[int]:
        """
        PIDs of QEMU processes this daemon started (from its pid files).
        """
        pids = []
        run = os.path.join(self.base, "run", "libvirt", "qemu", "run")
        if os.path.isdir(run):
            for name in os.listdir(run):
                if name.endswith(".pid"):
                    try:
                        with open(os.path.join(run, name)) as f:
                            pids.append(int(f.read().strip()))
                    except (OSError, ValueError):
                        pass
        return pids

    def stop(self, remove: bool = True) -> None:
        """
        Destroy every running domain, stop the daemon, and remove the
        directory.  Safe to call more than once.
        """
        if self.process is not None and self.process.poll() is None:
            try:
                conn = self.connect()
                try:
                    for dom in conn.listAllDomains():
                        try:
                            if dom.isActive():
                                dom.destroy()
                        except Exception:
                            pass
                finally:
                    conn.close()
            except Exception:
                pass
        # Whatever QEMU survived (e.g. the daemon died first) goes by PID.
        for pid in self._qemu_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        _terminate(self.process)
        if self._log is not None:
            self._log.close()
            self._log = None
        if remove:
            shutil.rmtree(self.base, ignore_errors=True)


# ---------------------------------------------------------------------------
# The VM
# ---------------------------------------------------------------------------


def domain_xml(
    name: str,
    uuid: str,
    vnc_password: Optional[str],
    spice_password: Optional[str],
    memory_mib: int = 128,
    emulator: str = QEMU_BINARY,
) -> str:
    """
    A diskless TCG domain with qxl video, a VNC and a SPICE console, both
    listening on 127.0.0.1 with automatically assigned ports.  It boots
    SeaBIOS to "No bootable device", which shows "Machine UUID <uuid>".
    """
    vnc_pw = f" passwd={quoteattr(vnc_password)}" if vnc_password else ""
    spice_pw = f" passwd={quoteattr(spice_password)}" if spice_password else ""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <boot dev='hd'/>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{emulator}</emulator>
    <graphics type='vnc' autoport='yes' listen='127.0.0.1'{vnc_pw}>
      <listen type='address' address='127.0.0.1'/>
    </graphics>
    <graphics type='spice' autoport='yes'{spice_pw}>
      <listen type='address' address='127.0.0.1'/>
    </graphics>
    <video>
      <model type='qxl'/>
    </video>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def live_graphics_ports(xml: bytes) -> Dict[str, int]:
    """
    C{{"vnc": port, "spice": port}} from a running domain's live XML.
    """
    root = etree.fromstring(xml, parser=etree.XMLParser(resolve_entities=False, no_network=True))
    ports: Dict[str, int] = {}
    for g in root.iterfind("devices/graphics"):
        port = g.get("port")
        if port is not None and int(port) > 0:
            ports.setdefault(g.get("type"), int(port))
    return ports


@dataclass
class DemoVM:
    """
    A running VM defined on a L{SessionLibvirtd}.
    """

    name: str
    uuid: str
    vnc_password: str
    spice_password: str
    ports: Dict[str, int]

    @classmethod
    def create(
        cls,
        daemon: SessionLibvirtd,
        name: str = "vapor-demo",
        vnc_password: Optional[str] = None,
        spice_password: Optional[str] = None,
    ) -> "DemoVM":
        """
        Define and start the VM; wait until both console ports are known.
        """
        import libvirt

        vnc_password = vnc_password or secrets.token_hex(4)  # VNC: 8 chars max
        spice_password = spice_password or secrets.token_hex(8)
        vm_uuid = str(uuidlib.uuid4())
        conn = daemon.connect()
        try:
            dom = conn.defineXML(domain_xml(name, vm_uuid, vnc_password, spice_password))
            dom.create()
            ports = live_graphics_ports(dom.XMLDesc(0).encode())
            if set(ports) != {"vnc", "spice"}:
                raise RuntimeError(f"console ports not assigned: {ports}")
        except libvirt.libvirtError as e:
            raise RuntimeError(f"could not start the demo VM: {e}; see {daemon.log_path}") from e
        finally:
            conn.close()
        return cls(name, vm_uuid, vnc_password, spice_password, ports)


# ---------------------------------------------------------------------------
# The proxy
# ---------------------------------------------------------------------------


def proxy_config_text(
    *,
    listen_port: int,
    hypervisor_uri: str,
    api_keys: Sequence[Mapping[str, object]],
    console: Optional[Mapping[str, object]] = None,
) -> str:
    """
    A C{vapor.conf} (YAML) for a proxy on 127.0.0.1:C{listen_port} that
    finds VMs on C{hypervisor_uri}.  C{api_keys} are C{{user, sha256, vms,
    admin}} mappings; C{console} overrides keys of the C{console:} section.
    JSON is valid YAML, so the values are written with C{json.dumps}.
    """
    lines = [
        "server:",
        f"  listen: [{json.dumps(f'tcp:{listen_port}:interface=127.0.0.1')}]",
        "auth:",
        "  api_keys:",
    ]
    for key in api_keys:
        lines.append("    - " + json.dumps(dict(key)))
    lines += [
        "hypervisors:",
        f"  - uri: {json.dumps(hypervisor_uri)}",
        "tokens:",
        "  backend: memory",
        "logging:",
        "  level: info",
        "  format: text",
    ]
    if console:
        lines.append("console:")
        for k, v in console.items():
            lines.append(f"  {k}: {json.dumps(v)}")
    return "\n".join(lines) + "\n"


def static_mappings() -> Dict[str, str]:
    """
    Where the bundled page's assets live on this machine.
    """
    return {
        "novnc": os.path.join(repo_root(), "node_modules", "@novnc", "novnc"),
        "spice-html5": "/usr/share/spice-html5",
    }


class ProxyProcess:
    """
    C{twistd -n --pidfile= vaporproxy --config PATH} as a child process.
    """

    def __init__(self, config_path: str, port: int, log_path: Optional[str] = None) -> None:
        self.config_path = config_path
        self.port = port
        self.log_path = log_path
        self.process: Optional[subprocess.Popen] = None
        self._log = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> List[str]:
        return [
            sys.executable,
            "-c",
            "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
            "-n",
            "--pidfile=",
            "vaporproxy",
            "--config",
            self.config_path,
        ]

    def environment(self) -> Dict[str, str]:
        env = dict(os.environ)
        root = repo_root()
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env

    def start(self, timeout: float = 30.0, foreground: bool = False) -> "ProxyProcess":
        """
        Start twistd; wait until the HTTP port answers C{/healthz}.
        With C{foreground}, the proxy's log goes to our stdout.
        """
        if foreground or self.log_path is None:
            out = None
        else:
            self._log = open(self.log_path, "ab")
            out = self._log
        self.process = subprocess.Popen(
            self.argv(),
            env=self.environment(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
            cwd=repo_root(),
        )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"twistd exited with {self.process.returncode}" + self.log_tail())
            try:
                with urllib.request.urlopen(self.base_url + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        return
            except urllib.error.HTTPError as e:
                last = e
                if e.code < 500:
                    return
            except OSError as e:
                last = e
            time.sleep(0.1)
        raise RuntimeError(f"proxy not ready after {timeout}s: {last}" + self.log_tail())

    def log_tail(self, size: int = 3000) -> str:
        """
        The end of the proxy's log file, for error messages ("" if none).
        """
        if self.log_path is None:
            return ""
        if self._log is not None:
            self._log.flush()
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - size))
                return "; log tail:\n" + f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def reload(self) -> None:
        """
        Ask the proxy to re-read its configuration (SIGHUP).
        """
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        _terminate(self.process)
        if self._log is not None:
            self._log.close()
            self._log = None


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python3 -m vaporproxy.demo",
        description="Run vaporproxy in front of a throw-away QEMU VM.",
    )
    p.add_argument("--port", type=int, default=8080, help="HTTP port on 127.0.0.1 (default 8080)")
    p.add_argument("--name", default="vapor-demo", help="the VM's name (default vapor-demo)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(argv)
    missing = missing_binaries([QEMU_BINARY, LIBVIRTD_BINARY, "setpriv"])
    if missing:
        print("vaporproxy demo: missing " + ", ".join(missing), file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("vaporproxy demo: run as root (it starts libvirtd as 'nobody')", file=sys.stderr)
        return 2
    if not os.path.isdir(static_mappings()["novnc"]):
        print("vaporproxy demo: node_modules/@novnc/novnc missing; run 'npm ci' first", file=sys.stderr)

    stopping = []

    def _on_signal(signum, frame):
        stopping.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _on_signal)

    workdir = tempfile.mkdtemp(prefix="vapor-demo-")
    os.chmod(workdir, 0o711)  # nobody must reach libvirtd/ below it
    daemon = SessionLibvirtd(base=os.path.join(workdir, "libvirtd"))
    proxy: Optional[ProxyProcess] = None
    try:
        print("starting a session libvirtd as nobody…", flush=True)
        daemon.start()
        print(f"starting VM {args.name!r} (diskless, SeaBIOS)…", flush=True)
        vm = DemoVM.create(daemon, name=args.name)
        key = secrets.token_urlsafe(32)
        config_path = os.path.join(workdir, "vapor.conf")
        with open(config_path, "w") as f:
            f.write(
                proxy_config_text(
                    listen_port=args.port,
                    hypervisor_uri=daemon.uri,
                    api_keys=[{"user": "demo", "sha256": sha256_hex(key), "vms": ["*"], "admin": True}],
                )
            )
        os.chmod(config_path, 0o600)
        proxy = ProxyProcess(config_path, args.port)
        print(f"starting: twistd {' '.join(proxy.argv()[3:])}", flush=True)
        proxy.start(foreground=True)
        base = proxy.base_url
        print(
            "\n"
            "vaporproxy demo is running.  The API key below is shown only once.\n"
            f"  API key:  {key}\n"
            f"  VNC:      {base}/console/{vm.name}#key={key}\n"
            f"  SPICE:    {base}/console/{vm.name}?type=spice#key={key}\n"
            f"  API:      curl -H 'Authorization: Bearer {key}' "
            f"{base}/api/v1/virtualization/virtualmachines/{vm.name}/console\n"
            f"  VM uuid:  {vm.uuid} (VNC port {vm.ports['vnc']}, SPICE port {vm.ports['spice']}, 127.0.0.1 only)\n"
            "Press Ctrl-C to stop the proxy, the VM and libvirtd.\n",
            flush=True,
        )
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


if __name__ == "__main__":
    sys.exit(main())
