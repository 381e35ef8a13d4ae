"""
vapor.conf: parsing and validation.

C{parse_config(text) -> Config}: a frozen value.  Unknown keys and bad
values raise L{ConfigError} whose message names the key, the value and what
was expected.  (Shapes fixed here; parsing is being written.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple


class ConfigError(ValueError):
    """
    A bad configuration; C{str(e)} is one line naming the key.
    """


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


@dataclass(frozen=True)
class ServerConfig:
    listen: Tuple[str, ...] = ("tcp:8080:interface=127.0.0.1",)
    allowed_origins: Tuple[str, ...] = ()
    trusted_proxies: Tuple[str, ...] = ()
    workers: int = 1


@dataclass(frozen=True)
class ApiKey:
    user: str
    sha256: str = field(repr=False)  # lower-case hex SHA-256 of the key
    vms: Tuple[str, ...] = ("*",)
    admin: bool = False


@dataclass(frozen=True)
class JWTConfig:
    algorithms: Tuple[str, ...]
    key_file: str
    issuer: Optional[str] = None
    audience: Optional[str] = None
    require_mfa: bool = False


@dataclass(frozen=True)
class AuthConfig:
    api_keys: Tuple[ApiKey, ...] = ()
    jwt: Optional[JWTConfig] = None


@dataclass(frozen=True)
class HypervisorConfig:
    uri: str
    console_host: Optional[str] = None


@dataclass(frozen=True)
class TokensConfig:
    backend: str = "memory"  # or "redis"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_timeout: float = 2.0  # seconds, every Redis call
    lease_ttl: float = 15.0  # seconds a Redis lease lives without renewal


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    format: str = "text"


@dataclass(frozen=True)
class Config:
    console: ConsoleConfig = ConsoleConfig()
    server: ServerConfig = ServerConfig()
    auth: AuthConfig = AuthConfig()
    hypervisors: Tuple[HypervisorConfig, ...] = (HypervisorConfig("qemu:///system"),)
    tokens: TokensConfig = TokensConfig()
    logging: LoggingConfig = LoggingConfig()


def parse_config(text: str) -> Config:
    raise NotImplementedError("being written")
