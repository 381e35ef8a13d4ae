"""
The package's layers (DESIGN.md: imports only point down the table's "may
import" column), read from every module's imports at any depth:

- C{http/} imports nothing of C{ws/}: the console WebSocket is the bridge's;
- C{console/} and C{guards/} import no Autobahn and no Twisted transport
  (they are sans-IO); C{relay/} no Autobahn (it owns the VM's TCP side);
- C{stores/} and C{vm/} know nothing of HTTP or WebSockets;
- the ground floor (config, errors, interfaces, timestamps) imports no
  sub-package;
- and, over all of it, each room imports only the rooms of its "may
  import" column and the ground floor (L{MAY_IMPORT}); the crossings that
  remain are listed, with why, in L{KNOWN_CROSSINGS}, which fails when one
  of them is gone so that the list cannot go stale.

(The guards' own finer rule, only their kit, is in
L{tests.guards.test_imports}.)
"""

from __future__ import annotations

import ast
import os
from typing import Dict, List, Set, Tuple

from twisted.trial.unittest import SynchronousTestCase

import vaporproxy

ROOT = os.path.dirname(os.path.abspath(vaporproxy.__file__))

#: Modules that are transports or WebSocket machinery.  (twisted.internet.ssl
#: is allowed: VeNCrypt's guard builds TLS settings, a value, from it.)
TRANSPORTS = (
    "autobahn", "twisted.internet.tcp", "twisted.internet.protocol", "twisted.protocols.tls", "twisted.web",
    "twisted.internet.reactor", "twisted.internet.endpoints", "twisted.internet.unix", "twisted.internet.abstract",
    "twisted.protocols.policies",
)  # fmt: skip


#: The shared ground floor (DESIGN.md): any room may import it.
GROUND_FLOOR = frozenset({
    "config", "errors", "interfaces", "logs", "metrics", "testing", "timestamps", "filewriter", "static_dirs", "tls", "timers",
})  # fmt: skip

#: DESIGN.md's "may import" column: the rooms (besides the ground floor and
#: itself) each room may import.  (C{recordings/} and C{audit.py} are
#: leaf rooms below C{http/}: the API serves the recording files.)
MAY_IMPORT: Dict[str, Set[str]] = {
    "http": {"console", "stores", "vm", "recordings", "audit"},
    "ws": {"console", "relay"},
    "console": {"relay", "guards", "stores", "vm"},
    "relay": {"guards"},
    "guards": set(),
    "stores": set(),
    "vm": set(),
    "recordings": set(),
    "audit": set(),
}

#: Imports that cross the table today: (module, room it imports) -> why.
#: Each must still be there (take it off the list when it is fixed).
KNOWN_CROSSINGS: Dict[Tuple[str, str], str] = {
    ("ws/channel.py", "http"): "the request helpers (client IP, origin, TLS, path) live in http/request.py",
    ("ws/factory.py", "guards"): "the factory builds the guards (RFB, SPICE) and their TLS settings",
    ("ws/factory.py", "vm"): "spice_tls_by_uri comes from vm/dial.py",
    ("ws/setup_path.py", "vm"): "the set-up path selects the console and its dial host (vm/target.py)",
}


def _resolve(module_path: str, node: ast.ImportFrom) -> str:
    """The absolute module an C{ImportFrom} names, relative ones resolved."""
    if not node.level:
        return node.module or ""
    package = ["vaporproxy"] + module_path.split("/")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: str, with_names: bool = False) -> List[str]:
    """
    Every module C{path} imports, at any depth, relative ones resolved;
    C{with_names}: also C{module.name} for C{from module import name}
    (C{from twisted.internet import reactor}).
    """
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    module_path = os.path.relpath(path, ROOT).replace(os.sep, "/")
    names: List[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(module_path, node)
            names.append(module)
            if with_names:
                names.extend(f"{module}.{alias.name}" for alias in node.names)
    return names


def room_of(module: str) -> str:
    """The room of a C{vaporproxy.…} module name: its sub-package or top module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def crossings() -> Dict[Tuple[str, str], List[str]]:
    """(module path, room) -> the imports of that room the table does not allow."""
    found: Dict[Tuple[str, str], List[str]] = {}
    for room, allowed in MAY_IMPORT.items():
        where = f"vaporproxy.{room}"
        if not os.path.isdir(os.path.join(ROOT, room)):
            modules = {f"{room}.py": imports_of(os.path.join(ROOT, f"{room}.py"))}
        else:
            modules = package_imports(where)
        for module, names in modules.items():
            for name in names:
                if not name.startswith("vaporproxy."):
                    continue
                target = room_of(name)
                if target != room and target not in GROUND_FLOOR and target not in allowed:
                    found.setdefault((module.replace(os.sep, "/"), target), []).append(name)
    return found


def package_imports(package: str, with_names: bool = False) -> Dict[str, List[str]]:
    """Module path -> what it imports, for every module of C{package}."""
    found = {}
    for folder, _, files in os.walk(os.path.join(ROOT, *package.split(".")[1:])):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                found[os.path.relpath(path, ROOT)] = imports_of(path, with_names)
    return found


class LayeringTests(SynchronousTestCase):
    def assertNoImport(self, package: str, forbidden: tuple) -> None:
        bad = {
            module: [n for n in names if n.startswith(forbidden)]
            for module, names in package_imports(package, with_names=True).items()
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
        for name in ("errors.py", "interfaces.py", "timestamps.py", "tls.py"):
            names = imports_of(os.path.join(ROOT, name))
            upward = [n for n in names if n.startswith("vaporproxy.") and n.count(".") >= 2]
            self.assertEqual(upward, [], name)
        for module, names in package_imports("vaporproxy.config").items():
            upward = [n for n in names if n.startswith("vaporproxy.") and not n.startswith("vaporproxy.config")]
            self.assertEqual(upward, [], module)

    def test_onlyTheTablesArrows(self) -> None:
        """
        When every room's imports are read, each imports only the rooms of
        its "may import" column and the ground floor, or is a known
        crossing.
        """
        unknown = {key: names for key, names in crossings().items() if key not in KNOWN_CROSSINGS}
        self.assertEqual(unknown, {}, "imports against DESIGN.md's table")

    def test_knownCrossingsNotStale(self) -> None:
        """
        When the known crossings are checked, every one of them is still
        there (a fixed one leaves the list).
        """
        gone = sorted(set(KNOWN_CROSSINGS) - set(crossings()))
        self.assertEqual(gone, [], "fixed crossings: take them off KNOWN_CROSSINGS")

    def test_relativeImportsResolved(self) -> None:
        """
        When a module imports relatively, the import is read as the
        absolute module it names.
        """
        node = ast.parse("from ..ws import channel").body[0]
        self.assertEqual(_resolve("http/api.py", node), "vaporproxy.ws")  # type: ignore[arg-type]
        node = ast.parse("from .site import X").body[0]
        self.assertEqual(_resolve("http/api.py", node), "vaporproxy.http.site")  # type: ignore[arg-type]
