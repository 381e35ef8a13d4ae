"""
The guards' place in the layout (DESIGN.md): of the project's own modules a
guard imports only the other guards (the kit above all), the errors, the
configuration and the TLS settings it is given (L{vaporproxy.tls}, a value),
so it stays sans-IO and usable without the bridge.
"""

from __future__ import annotations

import ast
import os
from typing import List

from twisted.trial.unittest import SynchronousTestCase

import vaporproxy.guards

ALLOWED = ("vaporproxy.guards", "vaporproxy.errors", "vaporproxy.config", "vaporproxy.tls")


def project_imports(path: str) -> List[str]:
    """
    The C{vaporproxy} modules the file at C{path} imports, at any depth.
    """
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found: List[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    return [name for name in found if name.split(".")[0] == "vaporproxy"]


class GuardImportsTests(SynchronousTestCase):
    """
    What the guards may import.
    """

    def test_only_guards_errors_config(self) -> None:
        """
        When every module of vaporproxy/guards is read, its project imports
        are only guards, errors, config and tls, and none is relative.
        """
        folder = os.path.dirname(vaporproxy.guards.__file__)
        modules = sorted(name for name in os.listdir(folder) if name.endswith(".py"))
        self.assertIn("kit.py", modules)
        for name in modules:
            path = os.path.join(folder, name)
            for imported in project_imports(path):
                self.assertTrue(
                    any(imported == allowed or imported.startswith(allowed + ".") for allowed in ALLOWED),
                    f"{name} imports {imported}",
                )
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), path)
            relative = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level]
            self.assertEqual(relative, [], name)

    def test_kit_imports_no_protocol(self) -> None:
        """
        When the kit is read, it imports no guard: the protocols build on
        it, not the other way round.
        """
        path = os.path.join(os.path.dirname(vaporproxy.guards.__file__), "kit.py")
        self.assertEqual([m for m in project_imports(path) if m.startswith("vaporproxy.guards")], [])
