"""
The sections of vapor.conf, each from its raw mapping to its dataclass.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, Dict, Mapping, Optional, Tuple
from urllib.parse import urlsplit


from vaporproxy.config.types import (  # noqa: F401
    ConfigError,
    ClipboardConfig,
    ConsoleConfig,
    ServerConfig,
    ApiKey,
    JWTConfig,
    StepUpPolicy,
    AuthConfig,
    VncTLSConfig,
    SpiceTLSConfig,
    HypervisorConfig,
    RedisSentinelConfig,
    TokensConfig,
    LoggingConfig,
    RecordingConfig,
)
from vaporproxy.config.values import (  # noqa: F401
    HIDDEN,
    LOG_LEVELS,
    LOG_FORMATS,
    TOKEN_BACKENDS,
    ACCESS_MODES,
    JWT_ALGORITHMS,
    _SHA256_RE,
    _bad,
    _hidden,
    parse_duration,
    parse_size,
    parse_int,
    parse_bool,
    parse_choice,
    parse_str,
    parse_optional_str,
    parse_list,
    parse_host,
    parse_network,
    parse_allowed_host,
    parse_endpoint,
    parse_origin,
    parse_redis_url,
    parse_host_port,
    parse_libvirt_uri,
    _mapping,
    _fields,
    _section,
    _list_of,
)


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
