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
from typing import Any, Dict, Sequence

import yaml

from vaporproxy.config.types import (
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
    AuditConfig,
    RecordingConfig,
    Config,
)
from vaporproxy.config.values import (
    HIDDEN,
    LOG_LEVELS,
    LOG_FORMATS,
    TOKEN_BACKENDS,
    ACCESS_MODES,
    JWT_ALGORITHMS,
    show,
    parse_duration,
    parse_size,
    parse_int,
    parse_bool,
    parse_choice,
    parse_str,
    parse_optional_str,
    parse_list,
    is_host_name,
    parse_host,
    parse_network,
    parse_allowed_host,
    is_ssl_endpoint,
    parse_endpoint,
    parse_origin,
    parse_redis_url,
    parse_host_port,
    parse_libvirt_uri,
    _mapping,
    _section,
    _list_of,
)
from vaporproxy.config.sections import (
    _parse_console,
    parse_clipboard,
    _parse_server,
    api_key_id,
    _parse_auth,
    _parse_hypervisor,
    _parse_tokens,
    _parse_logging,
    _parse_recording,
    _parse_audit_file,
    parse_log_level,
)

__all__ = [
    "ACCESS_MODES",
    "ApiKey",
    "AuditConfig",
    "AuthConfig",
    "ClipboardConfig",
    "Config",
    "ConfigError",
    "ConsoleConfig",
    "HIDDEN",
    "HypervisorConfig",
    "JWTConfig",
    "JWT_ALGORITHMS",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "LoggingConfig",
    "RecordingConfig",
    "RedisSentinelConfig",
    "SECTIONS",
    "ServerConfig",
    "SpiceTLSConfig",
    "StepUpPolicy",
    "TOKEN_BACKENDS",
    "TokensConfig",
    "VncTLSConfig",
    "api_key_id",
    "check_config",
    "is_host_name",
    "is_ssl_endpoint",
    "load_config",
    "parse_allowed_host",
    "parse_bool",
    "parse_choice",
    "parse_clipboard",
    "parse_config",
    "parse_duration",
    "parse_endpoint",
    "parse_host",
    "parse_host_port",
    "parse_int",
    "parse_libvirt_uri",
    "parse_list",
    "parse_log_level",
    "parse_network",
    "parse_optional_str",
    "parse_origin",
    "parse_redis_url",
    "parse_size",
    "parse_str",
    "show",
    "with_listen",
]


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
