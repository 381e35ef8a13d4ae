"""
The project's one timestamp format (console records, C{expires_at}).
"""

from datetime import datetime, timezone
from typing import Optional, Tuple

__all__ = ["iso_utc"]


def iso_utc(posix: float) -> str:
    """
    A POSIX time as ISO 8601 UTC with a C{Z}, whole seconds (fractions
    dropped): C{2024-01-15T10:30:00Z}.  The one formatter of the project's
    times (console records here, C{expires_at} in the HTTP API).

    The last answer is kept: answers of the same second (every console
    info of that second, every console of a stats answer) cost one
    C{strftime}.
    """
    global _iso_last
    second = int(posix // 1)
    last = _iso_last
    if last[0] == second:
        return last[1]
    text = datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    # One tuple, replaced whole: a reader never sees a second with another
    # second's text.
    _iso_last = (second, text)
    return text


_iso_last: Tuple[Optional[int], str] = (None, "")
