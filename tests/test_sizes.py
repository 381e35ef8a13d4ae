"""
The size rule (DESIGN.md "Size", issue 8): no module of vaporproxy/ over
~500 lines, no class over ~300, no function over ~60, read from the AST.
"""

from __future__ import annotations

import ast
import os
from typing import Dict, Iterator, Tuple

from twisted.trial.unittest import SynchronousTestCase

import vaporproxy

PACKAGE = os.path.dirname(os.path.abspath(vaporproxy.__file__))

MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 300
MAX_FUNCTION_LINES = 60

#: Known offenders, if one is ever let in while it is split: only these may
#: be over budget, and each must still be (an entry whose code is back
#: within budget fails the test until it is taken off).  Empty: none.
ALLOWED_OVER: Dict[str, str] = {}


def measure(package: str = PACKAGE) -> Iterator[Tuple[str, str, int, int]]:
    """
    (kind, name, lines, limit) of every module, class and function under
    C{package}; a name is C{vaporproxy/path.py}, with C{:Name} for a class
    or function (nested ones by their own name).
    """
    top = os.path.dirname(package)
    for folder, _dirs, files in os.walk(package):
        for file_name in sorted(files):
            if not file_name.endswith(".py"):
                continue
            path = os.path.join(folder, file_name)
            module = os.path.relpath(path, top).replace(os.sep, "/")
            with open(path, encoding="utf-8") as f:
                source = f.read()
            yield "module", module, source.count("\n"), MAX_MODULE_LINES
            for node in ast.walk(ast.parse(source, path)):
                if isinstance(node, ast.ClassDef):
                    kind, limit = "class", MAX_CLASS_LINES
                elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    kind, limit = "function", MAX_FUNCTION_LINES
                else:
                    continue
                assert node.end_lineno is not None
                yield kind, f"{module}:{node.name}", node.end_lineno - node.lineno + 1, limit


def over_budget(package: str = PACKAGE) -> Dict[str, Tuple[str, int, int]]:
    """Name -> (kind, lines, limit) of everything over its limit."""
    return {name: (kind, lines, limit) for kind, name, lines, limit in measure(package) if lines > limit}


class SizeTests(SynchronousTestCase):
    """
    The size rule over the package.
    """

    def test_nothingOverBudget(self) -> None:
        """
        When every module, class and function of vaporproxy/ is measured,
        none is over its limit unless it is on the allow-list.
        """
        found = over_budget()
        offenders = sorted(
            f"{kind} {name}: {lines} lines (limit {limit})"
            for name, (kind, lines, limit) in found.items()
            if name not in ALLOWED_OVER
        )
        self.assertEqual(offenders, [], "over the size rule (split by job):\n" + "\n".join(offenders))

    def test_allowListNotStale(self) -> None:
        """
        When an allow-listed item is measured, it exists, is of the kind
        listed and is still over its limit (else it leaves the list).
        """
        measured = {name: (kind, lines, limit) for kind, name, lines, limit in measure()}
        stale = []
        for name, kind in sorted(ALLOWED_OVER.items()):
            if name not in measured:
                stale.append(f"{name}: no such {kind}")
                continue
            found_kind, lines, limit = measured[name]
            if found_kind != kind or lines <= limit:
                stale.append(f"{name}: {found_kind} of {lines} lines (limit {limit}); take it off ALLOWED_OVER")
        self.assertEqual(stale, [], "stale allow-list entries:\n" + "\n".join(stale))

    def test_measuresWhatItShould(self) -> None:
        """
        When a package with a long module, class and function is measured,
        each is reported with its line count, and short ones are not.
        """
        root = self.mktemp()
        package = os.path.join(root, "vaporproxy")
        os.makedirs(package)
        body = "\n".join(f"    x{i} = {i}" for i in range(61))
        method = "\n".join(f"        y{i} = {i}" for i in range(10))
        with open(os.path.join(package, "big.py"), "w", encoding="utf-8") as f:
            f.write(f"def long():\n{body}\n\n\ndef short():\n    return 1\n\n\n")
            f.write("class Big:\n" + "".join(f"    def m{i}(self):\n{method}\n\n" for i in range(26)))
            f.write("\n" * 200)
        found = over_budget(package)
        self.assertEqual(
            {name: kind for name, (kind, _, _) in found.items()},
            {"vaporproxy/big.py": "module", "vaporproxy/big.py:long": "function", "vaporproxy/big.py:Big": "class"},
        )
        self.assertEqual(found["vaporproxy/big.py:long"][1], 62)
