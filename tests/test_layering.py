"""
The layering of C{vaporproxy/} (DESIGN.md's "may import" column, issue #8),
read from each module's syntax tree (nothing is imported).
"""

from __future__ import annotations

import ast
import os
from typing import Dict, Iterator, List, Set

from twisted.trial.unittest import SynchronousTestCase

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vaporproxy")

#: Twisted modules that are transports (sockets, TLS, protocol plumbing).
TRANSPORT_MODULES = (
    "twisted.internet.protocol",
    "twisted.internet.tcp",
    "twisted.internet.ssl",
    "twisted.internet.abstract",
    "twisted.protocols.tls",
)


def modules(sub: str) -> Iterator[str]:
    """The .py files of the sub-package C{sub}, relative to the package."""
    for root, _dirs, files in os.walk(os.path.join(PACKAGE, sub)):
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.relpath(os.path.join(root, name), PACKAGE)


def imports(relpath: str) -> Set[str]:
    """Every module C{relpath} imports, anywhere in its body (absolute names)."""
    with open(os.path.join(PACKAGE, relpath)) as f:
        tree = ast.parse(f.read(), relpath)
    package = "vaporproxy." + os.path.dirname(relpath).replace(os.sep, ".")
    found: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return found


def offending(sub: str, bad: "callable") -> Dict[str, List[str]]:  # type: ignore[valid-type]
    result = {}
    for relpath in modules(sub):
        wrong = sorted(name for name in imports(relpath) if bad(name))
        if wrong:
            result[relpath] = wrong
    return result


def under(name: str, prefixes: "tuple") -> bool:  # type: ignore[type-arg]
    return any(name == p or name.startswith(p + ".") for p in prefixes)


class LayeringTests(SynchronousTestCase):
    """
    Imports point down the layers.
    """

    def test_consoleIsTransportFree(self) -> None:
        """When console/ modules are read, none imports Autobahn, a Twisted transport module or the ws/ and relay/ layers."""
        self.assertEqual(
            offending("console", lambda n: under(n, ("autobahn", "vaporproxy.ws", "vaporproxy.relay") + TRANSPORT_MODULES)),
            {},
        )

    def test_guardsImportOnlyTheirKit(self) -> None:
        """When guards/ modules are read, the only vaporproxy modules they import are guards/ (their kit), errors, config and interfaces, and none imports Autobahn or a socket transport."""
        allowed = ("vaporproxy.guards", "vaporproxy.errors", "vaporproxy.config", "vaporproxy.interfaces")
        self.assertEqual(
            offending(
                "guards",
                lambda n: (n.startswith("vaporproxy") and not under(n, allowed))
                or under(n, ("autobahn", "twisted.internet.protocol", "twisted.internet.tcp", "twisted.internet.abstract")),
            ),
            {},
        )

    def test_httpImportsNoWebSocket(self) -> None:
        """When http/ modules are read, none imports anything of ws/ (the console WebSocket is handed over, not reached into)."""
        self.assertEqual(offending("http", lambda n: under(n, ("vaporproxy.ws",))), {})

    def test_finderSeesImports(self) -> None:
        """When a module is read, its imports are found, relative and nested ones included (the checks above can fail)."""
        found = imports(os.path.join("ws", "setup_path.py"))
        self.assertIn("vaporproxy.vm.libvirt", found)
        self.assertIn("vaporproxy.relay.backend.dial", found)
