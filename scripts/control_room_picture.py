"""
Make docs/control-room.png, the operator's picture in the README, from a
real run: a session libvirtd with the demo VM, a proxy that records
consoles, a console opened by the bundled page in headless Chromium, and
the control room listing it (the same steps as
tests/e2e/test_control_room.py, which checks them).

    python3 scripts/control_room_picture.py [OUT.png]
"""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from tests.e2e.fixture import Environment, skip_reason  # noqa: E402
from tests.e2e.drivers import driver_path, report_of  # noqa: E402
from tests.e2e.test_control_room import control_room_spec  # noqa: E402


def main() -> int:
    out = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(REPO, "docs", "control-room.png"))
    reason = skip_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    env = Environment().start()
    try:
        proxy = env.proxy("picture", sections={"recording": {"enabled": True, "dir": os.path.join(env.workdir, "rec")}})
        result = subprocess.run(
            ["node", driver_path("admin_driver.mjs"), json.dumps(control_room_spec(env, proxy, screenshot=out))],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        report = report_of(result.stdout)
        if not report or not report.get("listed") or "fatal" in report:
            print(f"the control room did not list the console: {report}", file=sys.stderr)
            return 1
    finally:
        env.close()
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
