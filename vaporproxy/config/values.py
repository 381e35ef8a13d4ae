"""
One config value each: durations, sizes, hosts, endpoints, URLs...; every
parser takes the dotted key (for its error message) and the raw value.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple
from urllib.parse import urlsplit


from vaporproxy.config.types import (  # noqa: F401
    ConfigError,
)


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
