"""
The wheel works alone: built from the sources, installed into a fresh venv
from the lock, started from outside the checkout, it serves the console page
and every script the page loads (noVNC and spice-html5 vendored inside it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile

from twisted.trial.unittest import SkipTest, TestCase

from tests.integration import wheel_fixture
from tests.integration.wheel_fixture import CHECKOUT, InstalledProxy, build_wheel, crawl, fetch, run, source_copy

API_KEY = "wheel-test-key-4f1c9a"
#: What the console page must load from the vendored copies.
MUST_LOAD = ("/static/app/console.js", "/static/novnc/core/rfb.js", "/static/spice-html5/main.js")


def config_text(port: int) -> str:
    """
    A minimal vapor.conf: one loopback listener, one key, libvirt's test driver.
    """
    return json.dumps(
        {
            "server": {"listen": [f"tcp:{port}:interface=127.0.0.1"]},
            "auth": {"api_keys": [{"user": "op", "sha256": hashlib.sha256(API_KEY.encode()).hexdigest(), "vms": ["*"]}]},
            "hypervisors": [{"uri": "test:///default"}],
            "tokens": {"backend": "memory"},
        }
    )


def require_sources() -> None:
    if not os.path.isfile(os.path.join(CHECKOUT, "node_modules", "@novnc", "novnc", "core", "rfb.js")):
        raise SkipTest("node_modules/@novnc/novnc is missing (npm ci)")
    if not os.path.isdir("/usr/share/spice-html5"):
        raise SkipTest("Debian's spice-html5 is not installed")


class WheelBuildTests(TestCase):
    timeout = 600

    def setUp(self) -> None:
        require_sources()
        self.directory = tempfile.mkdtemp(prefix="vapor-build-")
        self.addCleanup(shutil.rmtree, self.directory, True)

    def test_wheelCarriesClientLibraries(self) -> None:
        """
        When the wheel is built, it carries noVNC's and spice-html5's served files and licences, and no tests.
        """
        with zipfile.ZipFile(wheel_fixture.installed().wheel) as z:
            names = set(z.namelist())
        vendor = "vaporproxy/static/vendor/"
        for name in (
            "novnc/core/rfb.js", "novnc/core/util/browser.js", "novnc/vendor/pako/lib/zlib/inflate.js",
            "novnc/LICENSE.txt", "novnc/vendor/pako/LICENSE", "spice-html5/main.js",
            "spice-html5/thirdparty/rsa.js", "spice-html5/copyright",
        ):  # fmt: skip
            self.assertIn(vendor + name, names)
        self.assertIn("twisted/plugins/vaporproxy_plugin.py", names)
        self.assertIn("vaporproxy/static_dirs.py", names)
        self.assertNotIn(vendor + "novnc/package.json", names)
        self.assertEqual([n for n in names if n.startswith(("tests/", "bench/"))], [])

    def test_sdistBuildsWheelAlone(self) -> None:
        """
        When a wheel is built from the sdist, where no node_modules exists, it still carries noVNC.
        """
        source = source_copy(self.directory)
        run([wheel_fixture.sys.executable, "setup.py", "-q", "sdist", "-d", os.path.join(self.directory, "sdist")], cwd=source)
        (sdist,) = os.listdir(os.path.join(self.directory, "sdist"))
        wheel = build_wheel(os.path.join(self.directory, "sdist", sdist), os.path.join(self.directory, "dist"))
        with zipfile.ZipFile(wheel) as z:
            names = set(z.namelist())
        self.assertIn("vaporproxy/static/vendor/novnc/core/rfb.js", names)
        self.assertIn("vaporproxy/static/vendor/novnc/LICENSE.txt", names)

    def test_missingNoVNCStopsBuild(self) -> None:
        """
        When noVNC is nowhere to be found, the build fails with a message that says how to get it.
        """
        if os.path.isdir("/usr/share/novnc"):
            raise SkipTest("Debian's novnc is installed; the build would use it")
        source = source_copy(self.directory)
        os.unlink(os.path.join(source, "node_modules"))
        e = self.assertRaises(RuntimeError, build_wheel, source, os.path.join(self.directory, "dist"))
        self.assertIn("vaporproxy build: cannot vendor novnc", str(e))
        self.assertIn("npm ci", str(e))


class InstalledWheelTests(TestCase):
    timeout = 600

    def setUp(self) -> None:
        require_sources()
        self.wheel = wheel_fixture.installed()
        self.proxy = InstalledProxy(self.wheel, config_text).start()
        self.addCleanup(self.proxy.stop)

    def test_runsFromVenv(self) -> None:
        """
        When the proxy runs from the venv, vaporproxy is imported from the venv, not the checkout.
        """
        package = self.wheel.package_dir()
        self.assertTrue(package.startswith(self.wheel.venv + os.sep), package)
        self.assertTrue(os.path.isfile(os.path.join(package, "static", "vendor", "novnc", "core", "rfb.js")))

    def test_consolePageLoadsEveryScript(self) -> None:
        """
        When the console page is fetched, it and every script it loads, transitively, answer 200.
        """
        statuses = crawl(self.proxy.base_url + "/console/test")
        failed = {path: status for path, status in statuses.items() if status != 200}
        self.assertEqual(failed, {}, self.proxy.log_tail())
        for path in MUST_LOAD:
            self.assertIn(path, statuses)
        self.assertGreater(len([p for p in statuses if p.startswith("/static/novnc/")]), 20)
        self.assertGreater(len([p for p in statuses if p.startswith("/static/spice-html5/")]), 20)

    def test_servesVendoredCopy(self) -> None:
        """
        When rfb.js is served, its bytes are the vendored copy inside the installed package.
        """
        status, body = fetch(self.proxy.base_url + "/static/novnc/core/rfb.js")
        self.assertEqual(status, 200)
        with open(os.path.join(self.wheel.package_dir(), "static", "vendor", "novnc", "core", "rfb.js"), "rb") as f:
            self.assertEqual(body, f.read())

    def test_consoleInfoAnswers(self) -> None:
        """
        When the API is asked without a key, the installed proxy answers the JSON error.
        """
        status, body = fetch(self.proxy.base_url + "/api/v1/virtualization/virtualmachines/test/console")
        self.assertEqual(status, 401)
        self.assertEqual(json.loads(body)["code"], "UNAUTHORIZED")
