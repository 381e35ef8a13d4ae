"""
The proxy as the demo and the end-to-end tests run it: a generated
C{vapor.conf} and C{twistd -n vaporproxy} as a child process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Dict, List, Mapping, Optional, Sequence

from vaporproxy.demo.common import _terminate, repo_root


def proxy_config_text(
    *,
    listen_port: int,
    hypervisor_uri: str,
    api_keys: Sequence[Mapping[str, object]],
    console: Optional[Mapping[str, object]] = None,
    sections: Optional[Mapping[str, Mapping[str, object]]] = None,
) -> str:
    """
    A C{vapor.conf} (YAML) for a proxy on 127.0.0.1:C{listen_port} that
    finds VMs on C{hypervisor_uri}.  C{api_keys} are C{{user, sha256, vms,
    admin}} mappings; C{console} overrides keys of the C{console:} section;
    C{sections} adds whole sections (e.g. C{recording}).  JSON is valid
    YAML, so the values are written with C{json.dumps}.
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
    for name, values in (sections or {}).items():
        lines.append(f"{name}: {json.dumps(dict(values))}")
    return "\n".join(lines) + "\n"


def with_extra_config(text: str, extra: str, source: str = "extra config") -> str:
    """
    The demo's generated C{text} with a person's own YAML C{extra} merged
    over it (mappings key by key, anything else replaced), so that the demo
    can show recording, bandwidth limits or step-up policies; the demo's
    listen address, hypervisor and API key stay, so its printed URLs work.
    The result is checked by the proxy's own parser.

    @raise ValueError: one line naming C{source} and what is wrong.
    """
    import yaml

    from vaporproxy.config import ConfigError, parse_config

    try:
        mine = yaml.safe_load(extra)
    except yaml.YAMLError as e:
        raise ValueError(f"{source}: not YAML: {str(e).splitlines()[0]}") from None
    if mine is None:
        return text
    if not isinstance(mine, dict):
        raise ValueError(f"{source}: expected sections (console:, recording:, …), got {type(mine).__name__}")
    base = yaml.safe_load(text)
    merged = _merged(base, mine)
    if not isinstance(merged.get("server"), dict) or not isinstance(merged.get("auth"), dict) \
            or not isinstance(merged["auth"].get("api_keys"), list):  # fmt: skip
        raise ValueError(f"{source}: server and auth must be mappings, auth.api_keys a list")
    merged["server"]["listen"] = base["server"]["listen"]
    merged["hypervisors"] = base["hypervisors"]
    keys = merged["auth"]["api_keys"]
    for key in base["auth"]["api_keys"]:
        if key not in keys:
            keys.insert(0, key)
    result = json.dumps(merged, indent=2) + "\n"  # JSON is YAML
    try:
        parse_config(result)
    except ConfigError as e:
        raise ValueError(f"{source}: {e}") from None
    return result


def _merged(base: object, extra: object) -> object:
    if isinstance(base, dict) and isinstance(extra, dict):
        out = dict(base)
        for key, value in extra.items():
            out[key] = _merged(base.get(key), value)
        return out
    return extra


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
