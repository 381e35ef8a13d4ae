"""
Reloading the config on SIGHUP: what may change in a running process, what
needs a restart, and the start-up log lines that say which settings apply.
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable, List, Mapping, Optional, Sequence

from twisted.application.service import Service
from twisted.logger import Logger

from vaporproxy.config import Config, ConfigError, load_config, with_listen
from vaporproxy.logs import LogSetup, effective_level

log = Logger(namespace="vaporproxy.tap")

#: Settings that SIGHUP cannot change in a running process.
RESTART_ONLY = (
    ("server.listen", lambda c: c.server.listen),
    ("server.workers", lambda c: c.server.workers),
    ("tokens", lambda c: c.tokens),
    ("console.cleanup_interval", lambda c: c.console.cleanup_interval),
    ("hypervisors", lambda c: c.hypervisors),
    ("logging.format", lambda c: c.logging.format),
    ("audit.file", lambda c: c.audit.file),
)


def recording_stale(started: Config, new: Config) -> bool:
    """
    Whether C{new} asks for recording the process cannot do: its recording
    store is made at start-up, so turning recording on, or changing where
    and how it writes, needs a restart (turning it off, or its C{vms}, does
    not).
    """
    was, now = started.recording, new.recording
    if not now.enabled:
        return False
    how = lambda r: (r.dir, r.include_input, r.retention, r.max_total_size)  # noqa: E731
    return not was.enabled or how(was) != how(now)


class ReloadService(Service):
    """
    Reloads the config file on SIGHUP and hands the new config to C{apply}.

    A file that does not parse is logged and the running config is kept.
    """

    name = "reload"

    def __init__(
        self,
        path: Optional[str],
        listen: Sequence[str],
        config: Config,
        apply: Callable[[Config], None],
        reactor: Any,
    ):
        self.path = path
        self.listen = list(listen)
        self.config = config
        self.started = config
        self.apply = apply
        self.reactor = reactor
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGHUP, self._on_signal)

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> bool:
        """
        Read the file again and apply it; answer whether it was applied.
        """
        if self.path is None:
            log.warn("SIGHUP: no config file was given; nothing to reload")
            return False
        try:
            new = with_listen(load_config(self.path), self.listen)
            check_files(new)
        except ConfigError as e:
            log.error("SIGHUP: {path} not reloaded, keeping the running config: {error}", path=self.path, error=str(e))
            return False
        stale = [key for key, get in RESTART_ONLY if get(new) != get(self.config)]
        if recording_stale(self.started, new):
            stale.append("recording")
        if stale:
            log.warn("SIGHUP: {keys} changed; restart to apply", keys=", ".join(stale))
        try:
            self.apply(new)
        except Exception:
            log.failure("SIGHUP: applying {path} failed", path=self.path)
            return False
        self.config = new
        log.info("SIGHUP: reloaded {path}", path=self.path)
        log_limits(new)
        return True


def check_files(config: Config) -> None:
    """
    Load the files a config refers to (the JWT key, the hypervisors'
    C{vnc_tls} and C{spice_tls} CA, certificate and key files) so that a bad one stops
    start-up with a one-line error, and a SIGHUP with a bad one changes
    nothing, instead of failing half-way through applying it.

    @raise ConfigError: naming the key of the first unusable file.
    """
    if config.auth.jwt is not None:
        from vaporproxy.http.jwt_keys import load_jwt_key

        load_jwt_key(config.auth.jwt)
    if any(h.vnc_tls is not None for h in config.hypervisors):
        from vaporproxy.guards.vencrypt import vnc_tls_by_uri

        vnc_tls_by_uri(config.hypervisors)
    if any(h.spice_tls is not None for h in config.hypervisors):
        from vaporproxy.vm.dial import spice_tls_by_uri

        spice_tls_by_uri(config.hypervisors)


def apply_reload(config: Config, *, limiter: Any, host_policy: Any, api: Any, bridge_factory: Any,
                 log_setup: LogSetup, environ: Mapping[str, str], token_store: Any = None,
                 guard: Any = None, site: Any = None, registry: Any = None,
                 planner: Any = None) -> None:  # fmt: skip
    """
    Apply what SIGHUP may change to the running pieces: the steps that may
    still refuse the new config (they load files) first, so a refusal
    leaves everything as it was.
    """
    console = config.console
    api.reload(config)
    bridge_factory.reload(config)
    if planner is not None:
        planner.reload(config)
    if token_store is not None:
        token_store.ttl = console.token_ttl  # tokens issued from now on
    limiter.set_limits(console.max_connections_per_vm, console.max_total_connections,
                       console.max_connections_per_user, console.max_connections_per_client)  # fmt: skip
    host_policy.set_allowed(console.allowed_hosts)
    revocation = getattr(token_store, "revocation", None)
    if revocation is not None:
        from vaporproxy.http.revocation import close_revoked

        revocation.reload(config.auth)
        if registry is not None:
            close_revoked(registry, revocation.allows)
    if site is not None:
        site.access_log = config.logging.access_log
    if guard is not None:
        server = config.server
        guard.set_limits(server.request_timeout, server.max_pending_connections, server.max_pending_per_client)
    try:
        log_setup.set_level(effective_level(config.logging.level, environ))
    except ConfigError as e:
        log.error("{error}", error=str(e))


def log_startup(config: Config) -> None:
    import autobahn
    import autobahn.websocket

    nvx = bool(getattr(autobahn.websocket, "USES_NVX", False))
    log.info("vaporproxy starting: autobahn {version}, native WebSocket acceleration (NVX) {nvx}",
             version=autobahn.__version__, nvx="on" if nvx else "off")  # fmt: skip
    if not nvx:
        log.warn("autobahn NVX is off: WebSocket masking and UTF-8 checks run in pure Python (slower)")
    log.info("tokens: {backend}; listening on {listen}", backend=config.tokens.backend,
             listen=", ".join(config.server.listen))  # fmt: skip
    features = features_on(config)
    if features:
        log.info("on: {features}", features="; ".join(features))
    log_limits(config)


def features_on(config: Config) -> List[str]:
    """
    The optional behaviours this config turns on, for the start-up log: an
    operator (or someone trying the demo) sees at once whether recording,
    the audit trail, bandwidth limits or step-up sign-in are in force.
    """
    on: List[str] = []
    recording = config.recording
    if recording.enabled:
        input_too = ", with the browser's input" if recording.include_input else ""
        on.append(f"recording to {recording.dir} (VMs {', '.join(recording.vms)}{input_too})")
    if config.audit.file is not None:
        on.append(f"audit trail in {config.audit.file}")
    console = config.console
    if console.max_bandwidth:
        on.append(f"max_bandwidth {console.max_bandwidth // 1024} KB/s per console")
    if console.max_bandwidth_per_vm:
        on.append(f"max_bandwidth_per_vm {console.max_bandwidth_per_vm // 1024} KB/s")
    if console.min_update_interval:
        on.append(f"min_update_interval {console.min_update_interval:g}s")
    if config.auth.policies:
        on.append(f"{len(config.auth.policies)} step-up policy(ies)")
    return on


def log_limits(config: Config) -> None:
    console = config.console
    log.debug("config: {per_vm} consoles per VM, {total} in total, token_ttl {ttl}s, "
              "allowed hosts {hosts}, hypervisors {uris}", per_vm=console.max_connections_per_vm,
              total=console.max_total_connections, ttl=console.token_ttl,
              hosts=", ".join(console.allowed_hosts), uris=", ".join(h.uri for h in config.hypervisors))  # fmt: skip
