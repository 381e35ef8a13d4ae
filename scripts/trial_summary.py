"""
Read trial's output and print one plain line: "trial: N passed, N failed, N skipped".

trial ends with "Ran N tests in Xs" and "PASSED (successes=N, skips=K)" or
"FAILED (failures=F, errors=E, successes=N, ...)".
"""

import re
import sys


def summarise(text: str) -> str:
    ran = re.findall(r"^Ran (\d+) tests?", text, re.M)
    verdict = re.findall(r"^(PASSED|FAILED) \((.*)\)\s*$", text, re.M)
    counts = {}
    if verdict:
        for key, value in re.findall(r"(\w+)=(\d+)", verdict[-1][1]):
            counts[key] = int(value)
    failed = counts.get("failures", 0) + counts.get("errors", 0) + counts.get("unexpectedSuccesses", 0)
    skipped = counts.get("skips", 0) + counts.get("expectedFailures", 0)
    passed = counts.get("successes", 0)
    if not ran:
        return "trial: 0 passed, 1 failed (trial did not finish)"
    return f"trial: {passed} passed, {failed} failed, {skipped} skipped"


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8", errors="replace") as f:
        print(summarise(f.read()))
