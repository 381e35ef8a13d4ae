"""
vapor.conf: parsing and validation.

C{parse_config(text) -> Config}: a frozen value.  Unknown keys and bad
values raise L{ConfigError} whose message is one line naming the dotted
key, the value and what was expected, e.g.::

    console.token_ttl: '5 minutes' is not a duration (expected e.g. 500ms, 30s, 5m, 1h)

Secrets (API key hashes) are never echoed: they show as C{<hidden>}.
Everything here is pure: text in, value out (only C{ssl:} listen endpoints
and C{auth.jwt.key_file} look at the file system, to say early that a file
is missing).
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, Mapping, Optional, Sequence, Tuple
from urllib.parse import urlsplit

import yaml


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

HIDDEN = "<hidden>"
LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_FORMATS = ("text", "json")
TOKEN_BACKENDS = ("memory", "redis")
#: Console modes, least first: a credential of one mode gets no more.
ACCESS_MODES = ("view", "control")
JWT_ALGORITHMS = (
    "HS256", "HS384", "HS512",
    "RS256", "RS384", "RS512",
    "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512",
    "EdDSA",
)  # fmt: skip

_DURATION_EXPECTED = "expected e.g. 500ms, 30s, 5m, 1h"
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(b|kb|k|mb|m|gb|g)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2, "g": 1024**3, "gb": 1024**3}
_HOST_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_URI_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*$")


# ---------------------------------------------------------------------------
# One-line errors
# ---------------------------------------------------------------------------


def show(value: Any) -> str:
    """
    A value as it appears in an error message: Python literal syntax, on
    one line, cut short when long.
    """
    text = repr(value)
    if len(text) > 200:
        text = text[:197] + "..."
    return text


def _bad(key: str, value: Any, what: str, expected: str) -> ConfigError:
    return ConfigError(f"{key}: {show(value)} is not {what} ({expected})")


def _hidden(key: str, what: str, expected: str) -> ConfigError:
    return ConfigError(f"{key}: {HIDDEN} is not {what} ({expected})")


# ---------------------------------------------------------------------------
# Scalar checkers: (key, value) -> parsed value, or ConfigError
# ---------------------------------------------------------------------------


def parse_duration(key: str, value: Any) -> float:
    """
    A duration: C{500ms}, C{30s}, C{5m}, C{1h}, or a bare number of seconds.
    Must be greater than zero.
    """
    if isinstance(value, bool):
        raise _bad(key, value, "a duration", _DURATION_EXPECTED)
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION_RE.match(value)):
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise _bad(key, value, "a duration", _DURATION_EXPECTED)
    if not seconds > 0 or seconds == float("inf"):
        raise _bad(key, value, "a positive duration", _DURATION_EXPECTED)
    return seconds


def parse_size(key: str, value: Any) -> int:
    """
    A size in bytes: a bare integer (bytes) or C{64KB}, C{1MB}.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (match := _SIZE_RE.match(value)):
        unit = match.group(2).lower() if match.group(2) else None
        size = int(match.group(1)) * _SIZE_UNITS[unit]
    else:
        raise _bad(key, value, "a size", "expected bytes as an integer, or e.g. 64KB, 1MB")
    if size <= 0:
        raise _bad(key, value, "a positive size", "expected bytes as an integer, or e.g. 64KB, 1MB")
    return size


def parse_int(key: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _bad(key, value, "a valid integer", f"expected an integer >= {minimum}")
    return value


def parse_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad(key, value, "a boolean", "expected true or false")
    return value


def parse_choice(key: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value.lower() not in choices:
        raise _bad(key, value, "a valid choice", "expected one of " + ", ".join(choices))
    return value.lower()


def parse_str(key: str, value: Any, what: str = "a non-empty string") -> str:
    if not isinstance(value, str) or not value.strip():
        raise _bad(key, value, what, "expected a non-empty string")
    return value


def parse_optional_str(key: str, value: Any) -> Optional[str]:
    return None if value is None else parse_str(key, value)


def parse_list(key: str, value: Any, allow_empty: bool = True) -> list:
    if not isinstance(value, list):
        raise _bad(key, value, "a list", "expected a YAML list, e.g. [a, b]")
    if not value and not allow_empty:
        raise _bad(key, value, "a non-empty list", "expected at least one entry")
    return value


def is_host_name(text: str) -> bool:
    """
    Whether C{text} is a DNS host name (RFC 1123 labels).
    """
    name = text[:-1] if text.endswith(".") else text
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    if all(label.isdigit() for label in labels):
        return False  # looks like a broken IPv4 address, not a name
    return all(_HOST_LABEL_RE.match(label) for label in labels)


def parse_host(key: str, value: Any) -> str:
    """
    A host name, an IPv4 or an IPv6 address.
    """
    if isinstance(value, str):
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            if is_host_name(value):
                return value.lower()
    raise _bad(key, value, "a host", "expected a host name, an IPv4 or an IPv6 address")


def parse_network(key: str, value: Any, names: bool) -> str:
    """
    An IP address or a CIDR network; with C{names}, also a host name.
    """
    expected = (
        "expected a host name, an IP address or a CIDR such as 192.168.1.0/24"
        if names
        else "expected an IP address or a CIDR such as 10.0.0.0/8"
    )
    if isinstance(value, str):
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            pass
        if "/" in value:
            try:
                return str(ipaddress.ip_network(value, strict=True))
            except ValueError:
                raise _bad(
                    key, value, "a network", expected + "; host bits must be zero"
                ) from None
        if names and is_host_name(value):
            return value.lower()
    raise _bad(key, value, "a host or network" if names else "an IP address or network", expected)


def parse_allowed_host(key: str, value: Any) -> str:
    """
    An C{allowed_hosts} entry: a host, address or CIDR, or the absolute
    path of a directory whose UNIX sockets may be dialled (ends with C{/}
    once normalised).
    """
    if isinstance(value, str) and value.startswith("/"):
        path = os.path.normpath(value)
        if "\0" in path or any(part == ".." for part in value.split("/")):
            raise _bad(key, value, "a socket directory", "expected an absolute directory path without '..'")
        return path.rstrip("/") + "/"
    return parse_network(key, value, names=True)


def is_ssl_endpoint(description: str) -> bool:
    return description.split(":", 1)[0].strip().lower() == "ssl"


def parse_endpoint(key: str, value: Any) -> str:
    """
    A Twisted server endpoint string, checked with C{serverFromString}
    against a L{MemoryReactor} (nothing listens).  For C{ssl:} the
    certificate and key files must exist (C{serverFromString} reads them).
    """
    expected = "expected a Twisted endpoint such as tcp:8080:interface=127.0.0.1"
    if not isinstance(value, str) or not value.strip():
        raise _bad(key, value, "an endpoint", expected)
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    parts = value.split(":")
    if parts[0].strip().lower() in ("tcp", "tcp6", "ssl") and len(parts) > 1:
        port = parts[1].strip()
        if port.startswith("port="):
            port = port[len("port=") :]
        if not port.isdigit() or int(port) > 65535:
            raise _bad(key, value, "a valid endpoint", f"{expected}; the port must be 0-65535")
    try:
        serverFromString(MemoryReactor(), value)
    except FileNotFoundError as e:
        raise _bad(
            key, value, "a usable TLS endpoint", f"file {e.filename!r} does not exist"
        ) from None
    except Exception as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "multiple values" in detail:
            detail += r"; write a colon inside a value as \:"
        raise _bad(key, value, "a valid endpoint", f"{expected}; {detail}") from None
    return value


def parse_origin(key: str, value: Any) -> str:
    """
    A WebSocket origin: C{scheme://host[:port]}, no path.
    """
    expected = "expected an origin such as https://example.com"
    if not isinstance(value, str):
        raise _bad(key, value, "an origin", expected)
    parts = urlsplit(value)
    try:
        parts.port
    except ValueError:
        raise _bad(key, value, "an origin", expected) from None
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username is not None
    ):
        raise _bad(key, value, "an origin", expected)
    return f"{parts.scheme}://{parts.netloc.lower()}"


def parse_redis_url(key: str, value: Any) -> str:
    """
    A C{redis://[:password@]host[:port][/db]} URL (C{rediss://} for TLS).
    A password in it is never echoed in an error.
    """
    expected = "expected e.g. redis://127.0.0.1:6379/0"
    if not isinstance(value, str):
        raise _bad(key, value, "a redis:// URL", expected)
    parts = urlsplit(value)
    shown = HIDDEN if "@" in parts.netloc else show(value)
    error = ConfigError(f"{key}: {shown} is not a redis:// URL ({expected})")
    try:
        parts.port
        db = parts.path.lstrip("/")
        if db and not db.isdigit():
            raise error
    except ValueError:
        raise error from None
    if parts.scheme not in ("redis", "rediss") or not parts.hostname or parts.query or parts.fragment:
        raise error
    return value


def parse_host_port(key: str, value: Any) -> Tuple[str, int]:
    """
    C{host:port} (C{[v6]:port} for an IPv6 address), e.g. a sentinel's.
    """
    expected = "expected host:port, e.g. 10.0.0.5:26379 or [::1]:26379"
    if not isinstance(value, str):
        raise _bad(key, value, "a host:port", expected)
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        sep = ""
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise _bad(key, value, "a host:port", expected)
    try:
        return parse_host(key, host), int(port)
    except ConfigError:
        raise _bad(key, value, "a host:port", expected) from None


def parse_libvirt_uri(key: str, value: Any) -> str:
    expected = "expected a libvirt URI such as qemu:///system"
    if not isinstance(value, str) or "://" not in value:
        raise _bad(key, value, "a libvirt URI", expected)
    scheme = value.split("://", 1)[0]
    if not _URI_SCHEME_RE.match(scheme):
        raise _bad(key, value, "a libvirt URI", expected)
    return value


# ---------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------


def _mapping(key: str, value: Any, allowed: Sequence[str]) -> Mapping[str, Any]:
    """
    A YAML mapping (C{None} reads as empty) with no keys outside C{allowed}.
    """
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(key or "vapor.conf", value, "a mapping", "expected keys: " + ", ".join(allowed))
    for name in value:
        if name not in allowed:
            where = f"{key}.{name}" if key else str(name)
            raise ConfigError(f"{where}: unknown key (expected one of: {', '.join(allowed)})")
    return value


def _fields(cls: type) -> Tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _section(
    key: str,
    raw: Any,
    cls: type,
    parsers: Mapping[str, Callable[[str, Any], Any]],
    required: Sequence[str] = (),
) -> Any:
    """
    Build dataclass C{cls} from mapping C{raw}; each present key goes
    through its parser; absent keys keep the dataclass defaults.
    """
    data = _mapping(key, raw, _fields(cls))
    for name in required:
        if data.get(name) is None:
            raise ConfigError(f"{key}.{name}: missing (expected a value)")
    values = {name: parsers[name](f"{key}.{name}", v) for name, v in data.items()}
    return cls(**values)


def _list_of(parse_one: Callable[[str, Any], Any], allow_empty: bool = True) -> Callable[[str, Any], tuple]:
    def parse(key: str, value: Any) -> tuple:
        items = parse_list(key, value, allow_empty)
        return tuple(parse_one(f"{key}[{i}]", item) for i, item in enumerate(items))

    return parse


def _parse_console(raw: Any) -> ConsoleConfig:
    return _section(
        "console",
        raw,
        ConsoleConfig,
        {
            "max_connections_per_vm": parse_int,
            "max_total_connections": parse_int,
            "token_ttl": parse_duration,
            "connection_timeout": parse_duration,
            "idle_timeout": parse_duration,
            "allowed_hosts": _list_of(parse_allowed_host, allow_empty=False),
            "enable_tls": parse_bool,
            "buffer_size": lambda k, v: parse_int(k, v) * 1024,
            "cleanup_interval": parse_duration,
            "bind_client_ip": parse_bool,
            "max_message_size": parse_size,
            "max_connections_per_user": lambda k, v: parse_int(k, v, minimum=0),
            "max_connections_per_client": lambda k, v: parse_int(k, v, minimum=0),
            "clipboard": parse_clipboard,
            "max_bandwidth": _parse_bandwidth,
            "max_bandwidth_per_vm": _parse_bandwidth,
            "min_update_interval": _parse_interval,
        },
    )


def parse_clipboard(key: str, value: Any) -> ClipboardConfig:
    return _section(key, value, ClipboardConfig, {
        "to_vm": parse_bool, "from_vm": parse_bool,
        "max_size": lambda k, v: None if v is None else parse_size(k, v),
    })  # fmt: skip


def _parse_bandwidth(key: str, value: Any) -> int:
    """KB/s as in the original's buffer_size; 0 is unlimited."""
    return parse_int(key, value, minimum=0) * 1024


def _parse_interval(key: str, value: Any) -> float:
    """A duration, or 0 (off)."""
    if value in (0, "0", "0s", "0ms"):
        return 0.0
    return parse_duration(key, value)


def _parse_server(raw: Any) -> ServerConfig:
    return _section(
        "server",
        raw,
        ServerConfig,
        {
            "listen": _list_of(parse_endpoint, allow_empty=False),
            "allowed_origins": _list_of(parse_origin),
            "trusted_proxies": _list_of(lambda k, v: parse_network(k, v, names=False)),
            "workers": parse_int,
            "request_timeout": parse_duration,
            "max_pending_connections": parse_int,
            "max_pending_per_client": lambda k, v: parse_int(k, v, minimum=0),
            "metrics_local": parse_bool,
        },
    )


def _parse_sha256(key: str, value: Any) -> str:
    if not isinstance(value, str) or not _SHA256_RE.match(value):
        raise _hidden(key, "a SHA-256", "expected 64 lower-case hex characters, e.g. from sha256sum")
    return value


def _parse_api_key(key: str, raw: Any) -> ApiKey:
    return _section(
        key,
        raw,
        ApiKey,
        {
            "user": parse_str,
            "sha256": _parse_sha256,
            "vms": _list_of(parse_str, allow_empty=False),
            "admin": parse_bool,
            "access": lambda k, v: parse_choice(k, v, ACCESS_MODES),
            "clipboard": parse_clipboard,
            "max_bandwidth": _parse_bandwidth,
        },
        required=("user", "sha256"),
    )


def api_key_id(api_key: ApiKey) -> str:
    """
    The identity of a configured API key: its stored SHA-256's first 16
    hex digits (the SHA-256 of a hash: no secret).  Tokens carry it.
    """
    return "key:" + hashlib.sha256(api_key.sha256.encode("ascii")).hexdigest()[:16]


def _parse_algorithm(key: str, value: Any) -> str:
    if value not in JWT_ALGORITHMS:
        raise _bad(key, value, "a JWT algorithm", "expected one of " + ", ".join(JWT_ALGORITHMS))
    return value


def _parse_key_file(key: str, value: Any) -> str:
    path = parse_str(key, value)
    if not os.path.isfile(path):
        raise _bad(key, value, "a readable file", "expected the path of an existing key file")
    return path


def _parse_jwt(key: str, raw: Any) -> Optional[JWTConfig]:
    if raw is None:
        return None
    return _section(
        key,
        raw,
        JWTConfig,
        {
            "algorithms": _list_of(_parse_algorithm, allow_empty=False),
            "key_file": _parse_key_file,
            "issuer": parse_optional_str,
            "audience": parse_optional_str,
            "require_mfa": parse_bool,
        },
        required=("algorithms", "key_file"),
    )


def _parse_api_keys(key: str, value: Any) -> Tuple[ApiKey, ...]:
    keys = _list_of(_parse_api_key)(key, value)
    seen: Dict[str, int] = {}
    for i, api_key in enumerate(keys):
        if api_key.sha256 in seen:
            raise ConfigError(
                f"{key}[{i}].sha256: {HIDDEN} is a duplicate of {key}[{seen[api_key.sha256]}].sha256"
                " (expected every key to be different)"
            )
        seen[api_key.sha256] = i
    return keys


def _parse_rate(key: str, value: Any) -> float:
    """
    A rate per second: a number or C{N/s}, zero or more (0: unlimited).
    """
    text = value[:-2] if isinstance(value, str) and value.endswith("/s") else value
    try:
        rate = float(text) if not isinstance(text, bool) else -1.0
    except (TypeError, ValueError):
        rate = -1.0
    if not 0 <= rate < float("inf"):
        raise _bad(key, value, "a rate", "expected tokens a second, e.g. 10 or 10/s; 0 for unlimited")
    return rate


def _parse_auth(raw: Any) -> AuthConfig:
    return _section("auth", raw, AuthConfig, {
        "api_keys": _parse_api_keys,
        "jwt": _parse_jwt,
        "max_outstanding_tokens": lambda k, v: parse_int(k, v, minimum=0),
        "mint_rate": _parse_rate,
        "mint_burst": parse_int,
        "policies": _parse_step_up_policies,
    })  # fmt: skip


def _parse_step_up_policies(key: str, value: Any) -> Tuple[StepUpPolicy, ...]:
    policies = []
    for i, raw in enumerate(parse_list(key, value)):
        item = f"{key}[{i}]"
        data = _mapping(item, raw, _fields(StepUpPolicy))
        if not data.get("vms"):
            raise ConfigError(f"{item}.vms: missing (expected a list of VM name/UUID patterns)")
        policies.append(_section(item, data, StepUpPolicy, {
            "vms": _list_of(parse_str, allow_empty=False),
            "require_mfa": parse_bool,
            "max_auth_age": parse_duration,
            "acr_values": parse_str,
        }))  # fmt: skip
    return tuple(policies)


def _parse_pem_file(key: str, value: Any) -> Optional[str]:
    if value is None:
        return None
    path = parse_str(key, value)
    if not os.path.isfile(path):
        raise _bad(key, value, "a readable file", "expected the path of an existing PEM file")
    return path


def _parse_vnc_tls(key: str, raw: Any) -> Optional[VncTLSConfig]:
    if raw is None:
        return None
    fields = dict(_TLS_FIELDS, allow_anonymous=parse_bool)
    return _check_tls(key, _section(key, raw, VncTLSConfig, fields))


def _parse_spice_tls(key: str, raw: Any) -> Optional[SpiceTLSConfig]:
    """SPICE over TLS: as C{vnc_tls} without C{allow_anonymous}."""
    if raw is None:
        return None
    return _check_tls(key, _section(key, raw, SpiceTLSConfig, dict(_TLS_FIELDS)))


_TLS_FIELDS: Mapping[str, Callable[[str, Any], Any]] = {
    "ca_file": _parse_pem_file,
    "cert_file": _parse_pem_file,
    "key_file": _parse_pem_file,
    "verify": parse_bool,
    "server_name": lambda k, v: None if v is None else parse_host(k, v),
}


def _check_tls(key: str, tls: Any) -> Any:
    if tls.key_file is not None and tls.cert_file is None:
        raise ConfigError(f"{key}.key_file: needs {key}.cert_file (expected both, or only cert_file holding both)")
    if not tls.verify and (tls.ca_file is not None or tls.server_name is not None):
        raise ConfigError(
            f"{key}.verify: False ignores ca_file and server_name (expected verify: true, or no ca_file/server_name)"
        )
    return tls


def _parse_hypervisor(key: str, raw: Any) -> HypervisorConfig:
    hypervisor = _parse_hypervisor_keys(key, raw)
    if hypervisor.open_graphics:
        local = hypervisor.local if hypervisor.local is not None else not urlsplit(hypervisor.uri).netloc
        if not local:
            raise ConfigError(
                f"{key}.open_graphics: needs a local hypervisor (expected local: true, or a URI without a host)"
            )
    return hypervisor


def _parse_hypervisor_keys(key: str, raw: Any) -> HypervisorConfig:
    return _section(
        key,
        raw,
        HypervisorConfig,
        {
            "uri": parse_libvirt_uri,
            "console_host": lambda k, v: None if v is None else parse_host(k, v),
            "vnc_tls": _parse_vnc_tls,
            "spice_tls": _parse_spice_tls,
            "local": lambda k, v: None if v is None else parse_bool(k, v),
            "open_graphics": parse_bool,
        },
        required=("uri",),
    )


def _parse_secret(key: str, value: Any) -> Optional[str]:
    """
    An optional password: a non-empty string, never echoed in an error.
    """
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise _hidden(key, "a password", "expected a non-empty string, or no key")
    return value


def _parse_redis_sentinel(key: str, raw: Any) -> Optional[RedisSentinelConfig]:
    if raw is None:
        return None
    return _section(
        key,
        raw,
        RedisSentinelConfig,
        {
            "sentinels": _list_of(parse_host_port, allow_empty=False),
            "master": parse_str,
            "password": _parse_secret,
            "username": parse_optional_str,
            "db": lambda k, v: parse_int(k, v, minimum=0),
            "sentinel_password": _parse_secret,
            "wait_replicas": lambda k, v: parse_int(k, v, minimum=0),
        },
        required=("sentinels", "master"),
    )


def _parse_tokens(raw: Any) -> TokensConfig:
    tokens = _section(
        "tokens",
        raw,
        TokensConfig,
        {
            "backend": lambda k, v: parse_choice(k, v, TOKEN_BACKENDS),
            "redis_url": parse_redis_url,
            "redis_timeout": parse_duration,
            "lease_ttl": parse_duration,
            "redis_sentinel": _parse_redis_sentinel,
        },
    )
    if tokens.redis_sentinel is not None:
        if tokens.backend != "redis":
            raise ConfigError(
                f"tokens.redis_sentinel: needs tokens.backend: redis (backend is {tokens.backend};"
                " expected backend: redis, or no redis_sentinel)"
            )
        if "redis_url" in (raw or {}):
            raise ConfigError(
                "tokens.redis_url: not used with tokens.redis_sentinel (expected one of them:"
                " the sentinels name the master; its password and db go in redis_sentinel)"
            )
    return tokens


def _parse_logging(raw: Any) -> LoggingConfig:
    return _section(
        "logging",
        raw,
        LoggingConfig,
        {
            "level": parse_log_level,
            "format": lambda k, v: parse_choice(k, v, LOG_FORMATS),
            "access_log": parse_bool,
        },
    )


def _parse_recording(raw: Any) -> RecordingConfig:
    return _section(
        "recording",
        raw,
        RecordingConfig,
        {
            "enabled": parse_bool,
            "dir": _parse_absolute_path,
            "vms": _list_of(parse_str, allow_empty=False),
            "include_input": parse_bool,
            "retention": parse_duration,
            "max_total_size": parse_size,
        },
    )


def _parse_absolute_path(key: str, value: Any) -> str:
    path = parse_str(key, value)
    if not os.path.isabs(path):
        raise _bad(key, value, "an absolute path", "expected e.g. /var/lib/vaporproxy/recordings")
    return path


def _parse_audit_file(key: str, value: Any) -> Optional[str]:
    path = parse_optional_str(key, value)
    if path is not None and not os.path.isabs(path):
        raise _bad(key, value, "an absolute path", "expected e.g. /var/log/vaporproxy/audit.jsonl")
    return path


def parse_log_level(key: str, value: Any) -> str:
    """
    A log level: debug, info, warn or error (case-insensitive).
    """
    return parse_choice(key, value, LOG_LEVELS)


# ---------------------------------------------------------------------------
# The document
# ---------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """
    C{yaml.SafeLoader} that refuses a key given twice in one mapping
    (plain C{safe_load} silently keeps the last one).
    """


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(
                f"vapor.conf line {key_node.start_mark.line + 1}: key {show(key)} is given twice"
                " (expected each key once per mapping)"
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _load_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"vapor.conf: not valid YAML{where}: {problem}") from None


SECTIONS = ("console", "server", "auth", "hypervisors", "tokens", "logging", "audit", "recording")


def parse_config(text: str) -> Config:
    """
    Parse and validate the YAML text of a vapor.conf.

    An empty document or a missing section gives the defaults.

    @raise ConfigError: on the first bad key or value.
    """
    document = _mapping("", _load_yaml(text), SECTIONS)
    values: Dict[str, Any] = {
        "console": _parse_console(document.get("console")),
        "server": _parse_server(document.get("server")),
        "auth": _parse_auth(document.get("auth")),
        "tokens": _parse_tokens(document.get("tokens")),
        "logging": _parse_logging(document.get("logging")),
        "audit": _section("audit", document.get("audit"), AuditConfig, {"file": _parse_audit_file}),
        "recording": _parse_recording(document.get("recording")),
    }
    if document.get("hypervisors") is not None:
        values["hypervisors"] = _list_of(_parse_hypervisor, allow_empty=False)(
            "hypervisors", document["hypervisors"]
        )
    config = Config(**values)
    check_config(config)
    return config


def check_config(config: Config) -> None:
    """
    Checks that involve more than one key.

    @raise ConfigError: when keys contradict each other.
    """
    if config.server.workers > 1 and config.tokens.backend == "memory":
        raise ConfigError(
            f"server.workers: {config.server.workers} needs tokens.backend: redis"
            " (expected 1 with the memory backend: tokens and connection limits"
            " must be shared between worker processes, use redis)"
        )
    if config.console.enable_tls and not any(is_ssl_endpoint(s) for s in config.server.listen):
        raise ConfigError(
            "console.enable_tls: True needs an ssl: endpoint in server.listen"
            " (expected e.g. ssl:8443:privateKey=key.pem:certKey=cert.pem, or enable_tls: false)"
        )


def with_listen(config: Config, listen: Sequence[str], key: str = "--listen") -> Config:
    """
    C{config} with C{server.listen} replaced by C{listen} (the command
    line's C{--listen}), validated like the file's.
    """
    if not listen:
        return config
    endpoints = tuple(parse_endpoint(f"{key}[{i}]", s) for i, s in enumerate(listen))
    new = dataclasses.replace(config, server=dataclasses.replace(config.server, listen=endpoints))
    check_config(new)
    return new


def load_config(path: str) -> Config:
    """
    Read and parse the file at C{path}.

    @raise ConfigError: when it cannot be read or is not valid; the
        message starts with the path when the file cannot be read.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(f"{path}: cannot read the config file ({reason})") from None
    return parse_config(text)
