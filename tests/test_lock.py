"""
Tests for requirements.lock: it pins, with hashes, a set that satisfies the
compatible ranges of requirements.txt and requirements-test.txt.
"""

from __future__ import annotations

import os
import re
from typing import Dict, List, Tuple

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from twisted.trial.unittest import SynchronousTestCase

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Libraries whose internals vaporproxy uses: a major release may break it.
BOUNDED = ("twisted", "autobahn", "klein", "txredisapi")
_PIN = re.compile(r"^([A-Za-z0-9._-]+)==(\S+)")
_HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")


def read_lock() -> Dict[str, Tuple[Version, List[str]]]:
    """
    The lock's pins: canonical name -> (version, sha256 hashes).
    """
    pins: Dict[str, Tuple[Version, List[str]]] = {}
    current = None
    with open(os.path.join(CHECKOUT, "requirements.lock")) as f:
        for line in f:
            pin = _PIN.match(line)
            if pin:
                current = canonicalize_name(pin.group(1))
                pins[current] = (Version(pin.group(2)), [])
            for digest in _HASH.findall(line):
                pins[current][1].append(digest)
    return pins


def ranges(name: str) -> List[Requirement]:
    with open(os.path.join(CHECKOUT, name)) as f:
        return [Requirement(line) for line in f.read().splitlines() if line.strip() and not line.startswith("#")]


class LockTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.pins = read_lock()
        self.ranges = ranges("requirements.txt") + ranges("requirements-test.txt")

    def test_pinsSatisfyRanges(self) -> None:
        """
        When a range is declared in requirements*.txt, the lock pins a version inside it.
        """
        outside = {
            str(req): str(self.pins.get(canonicalize_name(req.name), ("missing",))[0])
            for req in self.ranges
            if canonicalize_name(req.name) not in self.pins
            or self.pins[canonicalize_name(req.name)][0] not in req.specifier
        }
        self.assertEqual(outside, {})

    def test_everyPinHashed(self) -> None:
        """
        When pip installs with --require-hashes, every pinned package has at least one sha256.
        """
        self.assertGreater(len(self.pins), len(self.ranges))
        self.assertEqual([name for name, (_, hashes) in self.pins.items() if not hashes], [])

    def test_internalsBounded(self) -> None:
        """
        When a library's internals are used, its range has an upper bound.
        """
        bounded = {
            canonicalize_name(req.name): any(spec.operator in ("<", "<=", "~=", "==") for spec in req.specifier)
            for req in self.ranges
        }
        self.assertEqual({name: bounded.get(name) for name in BOUNDED}, {name: True for name in BOUNDED})
