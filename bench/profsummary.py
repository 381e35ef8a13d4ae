"""
Summarise a py-spy raw (collapsed stacks) profile: the functions with the
most self time and the most inclusive time.

    python3 bench/profsummary.py bench/results/profiles/vaporproxy-down1.txt [N]
"""

from __future__ import annotations

import collections
import re
import sys


def frame_name(frame: str) -> str:
    """
    'func (path/to/module.py:123)' -> 'func (module.py)'.
    """
    m = re.match(r"(.*?) \((.*?)(?::\d+)?\)$", frame)
    if not m:
        return frame
    path = m.group(2)
    parts = path.split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{m.group(1)} ({short})"


def summarise(path: str, top: int = 25) -> str:
    self_t: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, count = line.rpartition(" ")
            n = int(count)
            frames = [frame_name(x) for x in stack.split(";") if x]
            total += n
            if frames:
                self_t[frames[-1]] += n
            for fr in set(frames):
                incl[fr] += n
    out = [f"{path}: {total} samples", "self:"]
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in self_t.most_common(top)]
    out.append("inclusive:")
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in incl.most_common(top)]
    return "\n".join(out)


if __name__ == "__main__":
    print(summarise(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 25))
