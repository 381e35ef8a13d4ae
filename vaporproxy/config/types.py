"""
The values vapor.conf parses into: frozen dataclasses, one per section.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional, Tuple



class ConfigError(ValueError):
    """
    A bad configuration; C{str(e)} is one line naming the key.
    """


@dataclass(frozen=True)
class ClipboardConfig:
    """
    The clipboard of a console (SPEC.md "Clipboard policy").  C{max_size}
    None: no size cap, so a console with both directions allowed needs no
    parsing of its streams at all; set it to cap every transfer (and to
    parse every console that has a clipboard).
    """

    to_vm: bool = True
    from_vm: bool = True
    max_size: Optional[int] = None


@dataclass(frozen=True)
class ConsoleConfig:
    max_connections_per_vm: int = 5
    max_total_connections: int = 100
    token_ttl: float = 300.0  # seconds
    connection_timeout: float = 30.0
    idle_timeout: float = 600.0
    allowed_hosts: Tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
    enable_tls: bool = False
    buffer_size: int = 32 * 1024  # bytes (configured in KB)
    cleanup_interval: float = 60.0
    bind_client_ip: bool = False
    # Caps on what one client may send (not in the original; SPEC: "every
    # WebSocket message and frame has a size cap").
    max_message_size: int = 1024 * 1024  # bytes
    # Issue #11: one user or one client address cannot take every slot (0: unlimited).
    max_connections_per_user: int = 0
    max_connections_per_client: int = 0
    # Issue #9: console policy.
    clipboard: ClipboardConfig = ClipboardConfig()
    max_bandwidth: int = 0  # bytes a second from the VM to one browser (configured in KB/s; 0: none)
    max_bandwidth_per_vm: int = 0  # the same summed over a VM's consoles in this process
    min_update_interval: float = 0.0  # VNC: at most one FramebufferUpdateRequest per interval


@dataclass(frozen=True)
class ServerConfig:
    listen: Tuple[str, ...] = ("tcp:8080:interface=127.0.0.1",)
    allowed_origins: Tuple[str, ...] = ()
    trusted_proxies: Tuple[str, ...] = ()
    workers: int = 1
    # Issue #11 (hostile clients): every connection that is not an open console.
    request_timeout: float = 30.0  # seconds for a request, headers and body included
    max_pending_connections: int = 512  # in total (safe on a 1024-descriptor process)
    max_pending_per_client: int = 128  # per client address (0: no per-address cap)
    metrics_local: bool = False  # /metrics without a key from loopback


@dataclass(frozen=True)
class ApiKey:
    user: str
    sha256: str = field(repr=False)  # lower-case hex SHA-256 of the key
    vms: Tuple[str, ...] = ("*",)
    admin: bool = False
    #: "control" or "view": a view key's consoles are always view-only.
    access: str = "control"
    #: Per-key overrides of console.clipboard and console.max_bandwidth.
    clipboard: Optional["ClipboardConfig"] = None
    max_bandwidth: Optional[int] = None


@dataclass(frozen=True)
class JWTConfig:
    algorithms: Tuple[str, ...]
    key_file: str
    issuer: Optional[str] = None
    audience: Optional[str] = None
    require_mfa: bool = False


@dataclass(frozen=True)
class StepUpPolicy:
    """One entry of C{auth.policies} (see L{vaporproxy.http.stepup})."""

    vms: Tuple[str, ...]
    require_mfa: bool = True
    #: Seconds since the user authenticated (C{auth_time}), or None: any age.
    max_auth_age: Optional[float] = None
    acr_values: Optional[str] = None


@dataclass(frozen=True)
class AuthConfig:
    api_keys: Tuple[ApiKey, ...] = ()
    jwt: Optional[JWTConfig] = None
    # Issue #11: per credential (0: unlimited).
    max_outstanding_tokens: int = 100
    mint_rate: float = 10.0  # tokens a second, sustained
    mint_burst: int = 50
    # Issue #9: step-up authentication for chosen VMs; first match wins.
    policies: Tuple[StepUpPolicy, ...] = ()


@dataclass(frozen=True)
class VncTLSConfig:
    """
    VeNCrypt (VNC over TLS with X.509) towards a hypervisor's VMs.

    @ivar ca_file: PEM CA certificate(s) the VM's certificate must chain
        to; C{None} uses the system trust store.
    @ivar cert_file: optional PEM client certificate the proxy presents.
    @ivar key_file: the client certificate's PEM key (default: C{cert_file}).
    @ivar verify: check the VM's certificate and name; C{False} only when
        set explicitly.
    @ivar server_name: the name the certificate must carry; C{None} means
        the host name or address the proxy dials.
    @ivar allow_anonymous: also accept the anonymous-TLS sub-types (TLSVnc,
        TLSNone), which do not authenticate the VM.
    """

    ca_file: Optional[str] = None
    cert_file: Optional[str] = None
    key_file: Optional[str] = None
    verify: bool = True
    server_name: Optional[str] = None
    allow_anonymous: bool = False


@dataclass(frozen=True)
class SpiceTLSConfig:
    """
    SPICE over TLS towards a hypervisor's VMs (their C{tlsPort}): the
    fields of L{VncTLSConfig}; SPICE has no anonymous TLS.
    """

    ca_file: Optional[str] = None
    cert_file: Optional[str] = None
    key_file: Optional[str] = None
    verify: bool = True
    server_name: Optional[str] = None
    #: Not a setting: read by the TLS loader shared with vnc_tls.
    allow_anonymous: ClassVar[bool] = False


@dataclass(frozen=True)
class HypervisorConfig:
    uri: str
    console_host: Optional[str] = None
    # None: a VM that wants VeNCrypt is refused with a clear reason.
    vnc_tls: Optional[VncTLSConfig] = None
    # SPICE over TLS to the VMs (allow_anonymous unused); None: a SPICE
    # console that needs TLS is refused with a clear reason.
    spice_tls: Optional[SpiceTLSConfig] = None
    # Whether the proxy runs on this hypervisor's host (UNIX-socket
    # consoles); None: true for a URI without a host (qemu:///system).
    local: Optional[bool] = None
    # Open every console of this (local) hypervisor through libvirt
    # (virDomainOpenGraphicsFD), not only those with <listen type='none'/>.
    open_graphics: bool = False


@dataclass(frozen=True)
class RedisSentinelConfig:
    """
    Find the Redis master through Sentinel instead of C{tokens.redis_url}.
    """

    sentinels: Tuple[Tuple[str, int], ...]  # (host, port) of each sentinel
    master: str  # the name the sentinels monitor it by
    password: Optional[str] = None  # the master's (and replicas') password, as in redis_url
    username: Optional[str] = None  # its ACL user, as in redis_url
    db: int = 0  # the database number, as in redis_url's /db
    sentinel_password: Optional[str] = None  # the sentinels' own requirepass
    wait_replicas: int = 1  # replicas that must acknowledge a mint or a redemption


@dataclass(frozen=True)
class TokensConfig:
    backend: str = "memory"  # or "redis"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_timeout: float = 2.0  # seconds, every Redis call
    lease_ttl: float = 15.0  # seconds a Redis lease lives without renewal
    redis_sentinel: Optional[RedisSentinelConfig] = None  # instead of redis_url


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    format: str = "text"
    access_log: bool = True  # one line per HTTP request (twisted.web's access log)


@dataclass(frozen=True)
class AuditConfig:
    #: The JSON-lines audit file, or None: events go to the log only.
    file: Optional[str] = None


@dataclass(frozen=True)
class RecordingConfig:
    enabled: bool = False
    dir: str = "/var/lib/vaporproxy/recordings"
    #: VM name/UUID patterns whose consoles are recorded.
    vms: Tuple[str, ...] = ("*",)
    #: Whether the browser's input (keystrokes!) is recorded too.
    include_input: bool = False
    retention: float = 30 * 86400.0
    max_total_size: int = 10 * 1024**3


@dataclass(frozen=True)
class Config:
    console: ConsoleConfig = ConsoleConfig()
    server: ServerConfig = ServerConfig()
    auth: AuthConfig = AuthConfig()
    hypervisors: Tuple[HypervisorConfig, ...] = (HypervisorConfig("qemu:///system"),)
    tokens: TokensConfig = TokensConfig()
    logging: LoggingConfig = LoggingConfig()
    audit: AuditConfig = AuditConfig()
    recording: RecordingConfig = RecordingConfig()


# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------
