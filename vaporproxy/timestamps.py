"""
The project's one timestamp format (console records, C{expires_at}).
"""

from datetime import datetime, timezone
from typing import Dict

__all__ = ["iso_utc"]

#: Seconds kept by L{iso_utc}: more than a console set-up asks for
#: (now, and now + the token TTL), far fewer than a stats answer could.
_ISO_KEEP = 8


def iso_utc(posix: float) -> str:
    """
    A POSIX time as ISO 8601 UTC with a C{Z}, whole seconds (fractions
    dropped): C{2024-01-15T10:30:00Z}.  The one formatter of the project's
    times (console records here, C{expires_at} in the HTTP API).

    The answers of the last few seconds asked for are kept: a console
    set-up asks for two seconds in turn (C{expires_at}, a token's TTL
    ahead, and the audit trail's now), and a one-answer memory missed on
    every call (4 C{strftime} per console, about 3% of its set-up's
    instructions; bench/setupcost.py).
    """
    second = int(posix // 1)
    text = _iso_seen.get(second)
    if text is None:
        text = datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        if len(_iso_seen) >= _ISO_KEEP:
            # (Another thread may clear too: each get and set is atomic.)
            _iso_seen.clear()
        _iso_seen[second] = text
    return text


_iso_seen: Dict[int, str] = {}
