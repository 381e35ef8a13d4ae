"""
Tests for L{vaporproxy.static_dirs}: where the client libraries are found,
and what a build vendors.
"""

from __future__ import annotations

import os
from typing import Dict

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from vaporproxy import static_dirs
from vaporproxy.static_dirs import ClientLibrary, VendorError

#: A library laid out like noVNC's npm package, with files that are not served.
FILES: Dict[str, str] = {
    "core/rfb.js": "export default class RFB {}\n",
    "core/util/logging.js": "export function Debug() {}\n",
    "vendor/pako/lib/zlib/inflate.js": "export function inflate() {}\n",
    "vendor/pako/LICENSE": "MIT\n",
    "LICENSE.txt": "noVNC is MPL-2.0\n",
    "docs/API.md": "not served\n",
    "package.json": "{}\n",
}


def write_tree(root: str, files: Dict[str, str]) -> str:
    for name, text in files.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    return root


def tree(root: str) -> Dict[str, str]:
    found = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path) as f:
                found[os.path.relpath(path, root)] = f.read()
    return found


class StaticDirsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.base = self.mktemp()
        self.place = write_tree(os.path.join(self.base, "node_modules", "lib"), FILES)
        self.vendor_dir = os.path.join(self.base, "vendor")
        self.library = ClientLibrary(
            name="lib",
            env="VAPOR_TEST_LIB_DIR",
            places=(os.path.join(self.base, "absent"), self.place),
            served=("core/**/*.js", "vendor/**/*.js"),
            licences=("LICENSE.txt", "vendor/*/LICENSE*", "copyright"),
            hint="run npm ci",
        )

    def find(self, environ: Dict[str, str]) -> Dict[str, str]:
        return static_dirs.static_dirs(environ, [self.library], self.vendor_dir)

    def test_placeWhenNothingElse(self) -> None:
        """
        When neither the environment nor a vendored copy names the library, the first existing place is used.
        """
        self.assertEqual(self.find({}), {"lib": self.place})

    def test_vendoredBeforePlaces(self) -> None:
        """
        When the package carries a vendored copy, it is used before node_modules or /usr/share.
        """
        vendored = os.path.join(self.vendor_dir, "lib")
        os.makedirs(vendored)
        self.assertEqual(self.find({}), {"lib": vendored})

    def test_environmentFirst(self) -> None:
        """
        When the environment names a directory, it wins over a vendored copy.
        """
        os.makedirs(os.path.join(self.vendor_dir, "lib"))
        override = os.path.join(self.base, "override")
        os.makedirs(override)
        self.assertEqual(self.find({"VAPOR_TEST_LIB_DIR": override}), {"lib": override})

    def test_missingEnvironmentFallsThrough(self) -> None:
        """
        When the environment names a directory that does not exist, the next candidate is used.
        """
        self.assertEqual(self.find({"VAPOR_TEST_LIB_DIR": "/nonexistent/lib"}), {"lib": self.place})

    def test_nothingFound(self) -> None:
        """
        When no candidate exists, the library is absent from the answer.
        """
        library = ClientLibrary("lib", "VAPOR_TEST_LIB_DIR", ("/nonexistent/a",), ("*.js",), ("COPYING",), "")
        self.assertEqual(static_dirs.static_dirs({}, [library], self.vendor_dir), {})

    def test_realLibrariesUseEnvironment(self) -> None:
        """
        When VAPOR_NOVNC_DIR and VAPOR_SPICE_HTML5_DIR name directories, the shipped libraries resolve to them.
        """
        novnc = os.path.join(self.base, "novnc")
        spice = os.path.join(self.base, "spice")
        os.makedirs(novnc)
        os.makedirs(spice)
        found = static_dirs.static_dirs({"VAPOR_NOVNC_DIR": novnc, "VAPOR_SPICE_HTML5_DIR": spice})
        self.assertEqual(found, {"novnc": novnc, "spice-html5": spice})


class VendorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.base = self.mktemp()
        self.place = write_tree(os.path.join(self.base, "node_modules", "lib"), FILES)
        self.library = ClientLibrary(
            name="lib",
            env="VAPOR_TEST_LIB_DIR",
            places=(self.place,),
            served=("core/**/*.js", "vendor/**/*.js"),
            licences=("LICENSE.txt", "vendor/*/LICENSE*", "copyright"),
            hint="run npm ci",
        )
        self.destination = os.path.join(self.base, "build", "lib")

    def vendor(self, library: ClientLibrary) -> tuple:
        return static_dirs.vendor(library, {}, self.destination, os.path.join(self.base, "no-vendor"))

    def test_copiesServedFilesAndLicences(self) -> None:
        """
        When a build vendors a library, the served scripts and the licences are copied and nothing else.
        """
        source, count = self.vendor(self.library)
        self.assertEqual(source, self.place)
        expected = {name: FILES[name] for name in FILES if name not in ("docs/API.md", "package.json")}
        self.assertEqual(tree(self.destination), expected)
        self.assertEqual(count, len(expected))

    def test_replacesStaleCopy(self) -> None:
        """
        When the destination holds a file from an earlier build, it is gone after vendoring again.
        """
        write_tree(self.destination, {"core/removed-upstream.js": "old\n"})
        self.vendor(self.library)
        self.assertNotIn("core/removed-upstream.js", tree(self.destination))
        self.assertIn("core/rfb.js", tree(self.destination))

    def test_missingSourceNamesTheFix(self) -> None:
        """
        When no copy of the library exists, the build error names every place tried and the fix.
        """
        library = ClientLibrary("lib", "VAPOR_TEST_LIB_DIR", ("/nonexistent/lib",), ("*.js",), ("COPYING",), "run npm ci")
        e = self.assertRaises(VendorError, self.vendor, library)
        self.assertIn("cannot vendor lib", str(e))
        self.assertIn("/nonexistent/lib", str(e))
        self.assertIn("run npm ci", str(e))
        self.assertFalse(os.path.exists(self.destination))

    def test_missingLicenceStopsTheBuild(self) -> None:
        """
        When the library's directory has no licence file, the build stops rather than ship it unlicensed.
        """
        library = ClientLibrary("lib", "VAPOR_TEST_LIB_DIR", (self.place,), ("core/*.js",), ("COPYING",), "")
        e = self.assertRaises(VendorError, self.vendor, library)
        self.assertIn("no licence file", str(e))

    def test_nothingServedStopsTheBuild(self) -> None:
        """
        When the directory exists but holds none of the served files, the build stops.
        """
        library = ClientLibrary("lib", "VAPOR_TEST_LIB_DIR", (self.place,), ("dist/*.js",), ("LICENSE.txt",), "x")
        e = self.assertRaises(VendorError, self.vendor, library)
        self.assertIn("has no dist/*.js", str(e))

    def test_debianCopyright(self) -> None:
        """
        When spice-html5 comes from Debian's /usr/share, its licence is /usr/share/doc/spice-html5/copyright.
        """
        if not os.path.isfile("/usr/share/doc/spice-html5/copyright"):
            raise SkipTest("Debian's spice-html5 is not installed")
        spice = [lib for lib in static_dirs.LIBRARIES if lib.name == "spice-html5"][0]
        found = static_dirs.licence_files(spice, "/usr/share/spice-html5")
        self.assertEqual(found, {"copyright": "/usr/share/doc/spice-html5/copyright"})
