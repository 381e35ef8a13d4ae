"""
Running the browser drivers beside this module (C{driver.mjs},
C{admin_driver.mjs}, C{playback_driver.mjs}) from a trial test: C{node}
with the spec as JSON, the report being the last JSON line it prints.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Optional

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue

from tests.support import REPO

HERE = os.path.dirname(os.path.abspath(__file__))


def driver_path(name: str) -> str:
    """The path of driver C{name} (e.g. C{"admin_driver.mjs"})."""
    return os.path.join(HERE, name)


def report_of(out: str) -> Optional[Dict[str, Any]]:
    """A driver's report: the last JSON line of its output C{out}, or C{None}."""
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


async def run_browser_driver(name: str, spec: Mapping[str, Any]) -> Dict[str, Any]:
    """
    Run driver C{name} with C{spec} (in the checkout, with only C{PATH} and
    C{HOME} from this environment); answer its report.

    @raise AssertionError: when it fails or prints no report (with the
        tails of what it printed).
    """
    out, err, code = await getProcessOutputAndValue(
        "node", [driver_path(name), json.dumps(spec)],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root")},
        path=REPO, reactor=reactor,
    )  # fmt: skip
    text = out.decode("utf-8", "replace")
    report = report_of(text)
    if code != 0 or report is None:
        raise AssertionError(f"{name} failed (exit {code}): {text[-2000:]} {err.decode('utf-8', 'replace')[-2000:]}")
    return report
