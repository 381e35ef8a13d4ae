"""
Where the console page's client libraries (noVNC, spice-html5) are, and how a
build copies them into the package.

The lookup order is: the environment (C{VAPOR_NOVNC_DIR},
C{VAPOR_SPICE_HTML5_DIR}); the copy a wheel vendors inside the package
(C{vaporproxy/static/vendor/…}); then the checkout's C{node_modules} and
Debian's C{/usr/share}.  A build uses the same order to find what to vendor.

Standard library only: C{setup.py} loads this file by path, before any of the
project's dependencies are installed.
"""

from __future__ import annotations

import glob
import os
import shutil
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
#: Where a wheel carries its copies (one directory per library).
VENDOR_DIR = os.path.join(PACKAGE_DIR, "static", "vendor")


@dataclass(frozen=True)
class ClientLibrary:
    """
    One browser library the console page loads from C{/static/<name>/}.
    """

    name: str
    env: str
    #: Installed copies outside the package, in order.
    places: Tuple[str, ...]
    #: Glob patterns (relative to the library's directory) of the files served.
    served: Tuple[str, ...]
    #: Glob patterns of the licence files shipped next to them.
    licences: Tuple[str, ...]
    hint: str


LIBRARIES: Tuple[ClientLibrary, ...] = (
    ClientLibrary(
        name="novnc",
        env="VAPOR_NOVNC_DIR",
        places=(os.path.join(os.path.dirname(PACKAGE_DIR), "node_modules", "@novnc", "novnc"), "/usr/share/novnc"),
        served=("core/**/*.js", "vendor/**/*.js"),
        licences=("LICENSE.txt", "AUTHORS", "docs/LICENSE.*", "vendor/*/LICENSE*", "copyright"),
        hint="run 'npm ci' in the checkout (node_modules/@novnc/novnc) or set VAPOR_NOVNC_DIR",
    ),
    ClientLibrary(
        name="spice-html5",
        env="VAPOR_SPICE_HTML5_DIR",
        places=("/usr/share/spice-html5",),
        served=("*.js", "thirdparty/*.js"),
        licences=("COPYING", "copyright"),
        hint="install Debian's spice-html5 package (/usr/share/spice-html5) or set VAPOR_SPICE_HTML5_DIR",
    ),
)


class VendorError(Exception):
    """
    A build cannot vendor a library: its files or its licence are missing.
    """


def candidates(library: ClientLibrary, environ: Mapping[str, str], vendor_dir: str = VENDOR_DIR) -> List[str]:
    """
    The directories to try for C{library}, in order.
    """
    return [p for p in (environ.get(library.env), os.path.join(vendor_dir, library.name), *library.places) if p]


def find(library: ClientLibrary, environ: Mapping[str, str], vendor_dir: str = VENDOR_DIR) -> Optional[str]:
    """
    The first existing directory of L{candidates}, or L{None}.
    """
    for path in candidates(library, environ, vendor_dir):
        if os.path.isdir(path):
            return path
    return None


def static_dirs(
    environ: Mapping[str, str], libraries: Sequence[ClientLibrary] = LIBRARIES, vendor_dir: str = VENDOR_DIR
) -> Dict[str, str]:
    """
    The C{/static/<name>/} directories found on this machine, by name.
    """
    found = {}
    for library in libraries:
        path = find(library, environ, vendor_dir)
        if path is not None:
            found[library.name] = path
    return found


def _matches(root: str, patterns: Sequence[str]) -> List[str]:
    """
    The files under C{root} matching C{patterns}, relative to C{root}.
    """
    names = set()
    for pattern in patterns:
        for path in glob.glob(os.path.join(root, pattern), recursive=True):
            if os.path.isfile(path):
                names.add(os.path.relpath(path, root))
    return sorted(names)


def licence_files(library: ClientLibrary, source: str) -> Dict[str, str]:
    """
    The licence files for C{source}: relative name -> absolute path.  A Debian
    copy (C{/usr/share/<pkg>}) has its licence in C{/usr/share/doc/<pkg>/copyright}.
    """
    found = {name: os.path.join(source, name) for name in _matches(source, library.licences)}
    parent, package = os.path.split(os.path.normpath(source))
    debian = os.path.join("/usr/share/doc", package, "copyright")
    if parent == "/usr/share" and os.path.isfile(debian):
        found.setdefault("copyright", debian)
    return found


def vendor(
    library: ClientLibrary, environ: Mapping[str, str], destination: str, vendor_dir: str = VENDOR_DIR
) -> Tuple[str, int]:
    """
    Copy C{library}'s served files and licences into C{destination}; answer
    the source directory and the number of files copied.
    """
    source = find(library, environ, vendor_dir)
    if source is None:
        tried = ", ".join(candidates(library, environ, vendor_dir))
        raise VendorError(f"cannot vendor {library.name}: none of {tried} exists; {library.hint}")
    served = _matches(source, library.served)
    licences = licence_files(library, source)
    if not served:
        raise VendorError(f"cannot vendor {library.name}: {source} has no {' or '.join(library.served)}; {library.hint}")
    if not licences:
        raise VendorError(f"cannot vendor {library.name}: no licence file ({', '.join(library.licences)}) in {source}")
    copies = {name: os.path.join(source, name) for name in served}
    copies.update(licences)
    if os.path.realpath(source) == os.path.realpath(destination):
        return source, len(copies)
    # A fresh copy: nothing left over from an earlier build of another version.
    shutil.rmtree(destination, ignore_errors=True)
    for name, path in copies.items():
        target = os.path.join(destination, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(path, target)
    return source, len(copies)


def vendor_all(environ: Mapping[str, str], destination: str) -> List[Tuple[str, str, int]]:
    """
    Vendor every library under C{destination}/<name>; answer (name, source, count) each.
    """
    done = []
    for library in LIBRARIES:
        source, count = vendor(library, environ, os.path.join(destination, library.name))
        done.append((library.name, source, count))
    return done
