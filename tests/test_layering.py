"""
The package's layers (DESIGN.md: imports only point down the table's "may
import" column), read from every module's imports at any depth:

- C{http/} imports nothing of C{ws/}: the console WebSocket is the bridge's;
- C{console/} and C{guards/} import no Autobahn and no Twisted transport
  (they are sans-IO); C{relay/} no Autobahn (it owns the VM's TCP side);
- C{stores/} and C{vm/} know nothing of HTTP or WebSockets;
- the ground floor (config, errors, interfaces, timestamps) imports no
  sub-package.

(The guards' own finer rule is in L{tests.guards.test_imports}.)
"""

from __future__ import annotations

import ast
import os
from typing import Dict, List

from twisted.trial.unittest import SynchronousTestCase

import vaporproxy

ROOT = os.path.dirname(os.path.abspath(vaporproxy.__file__))

#: Modules that are transports or WebSocket machinery.  (twisted.internet.ssl
#: is allowed: VeNCrypt's guard builds TLS settings, a value, from it.)
TRANSPORTS = (
    "autobahn", "twisted.internet.tcp", "twisted.internet.protocol", "twisted.protocols.tls", "twisted.web",
)  # fmt: skip


def imports_of(path: str) -> List[str]:
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    names: List[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def package_imports(package: str) -> Dict[str, List[str]]:
    """Module path -> what it imports, for every module of C{package}."""
    found = {}
    for folder, _, files in os.walk(os.path.join(ROOT, *package.split(".")[1:])):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                found[os.path.relpath(path, ROOT)] = imports_of(path)
    return found


class LayeringTests(SynchronousTestCase):
    def assertNoImport(self, package: str, forbidden: tuple) -> None:
        bad = {
            module: [n for n in names if n.startswith(forbidden)]
            for module, names in package_imports(package).items()
        }
        self.assertEqual({m: n for m, n in bad.items() if n}, {}, f"{package} imports what it may not")

    def test_httpImportsNoWs(self) -> None:
        """When http/ is read, none of its modules imports vaporproxy.ws."""
        self.assertNoImport("vaporproxy.http", ("vaporproxy.ws",))

    def test_sansIOPackagesImportNoTransport(self) -> None:
        """When console/ and guards/ are read, none imports Autobahn or a Twisted transport; relay/ no Autobahn."""
        for package in ("vaporproxy.console", "vaporproxy.guards"):
            self.assertNoImport(package, TRANSPORTS)
        self.assertNoImport("vaporproxy.relay", ("autobahn", "vaporproxy.ws", "vaporproxy.http"))

    def test_storesAndVmKnowNoWeb(self) -> None:
        """When stores/ and vm/ are read, none imports http/, ws/ or the WebSocket libraries."""
        for package in ("vaporproxy.stores", "vaporproxy.vm"):
            self.assertNoImport(package, ("vaporproxy.http", "vaporproxy.ws", "autobahn", "klein", "twisted.web"))

    def test_groundFloor(self) -> None:
        """When the ground-floor modules are read, none imports a sub-package of the product (config only its own)."""
        for name in ("errors.py", "interfaces.py", "timestamps.py"):
            names = imports_of(os.path.join(ROOT, name))
            upward = [n for n in names if n.startswith("vaporproxy.") and n.count(".") >= 2]
            self.assertEqual(upward, [], name)
        for module, names in package_imports("vaporproxy.config").items():
            upward = [n for n in names if n.startswith("vaporproxy.") and not n.startswith("vaporproxy.config")]
            self.assertEqual(upward, [], module)
