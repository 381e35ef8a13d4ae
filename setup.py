import importlib.util
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).parent


def requirements(name):
    lines = (HERE / name).read_text().splitlines()
    return [line for line in lines if line and not line.startswith("#")]


def static_dirs():
    """
    vaporproxy/static_dirs.py, loaded by path (stdlib only; the package's
    dependencies need not be installed to build it).
    """
    spec = importlib.util.spec_from_file_location("_vapor_static_dirs", HERE / "vaporproxy" / "static_dirs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def vendor_into(package_root):
    """
    Copy noVNC and spice-html5 (served files and licences) into
    <package_root>/vaporproxy/static/vendor; stop the build if one is missing.
    """
    module = static_dirs()
    destination = os.path.join(package_root, "vaporproxy", "static", "vendor")
    try:
        done = module.vendor_all(os.environ, destination)
    except module.VendorError as e:
        raise SystemExit(f"vaporproxy build: {e}") from None
    for name, source, count in done:
        print(f"vaporproxy build: vendored {name} from {source} ({count} files)")


class BuildPyVendoring(build_py):
    """
    build_py that also vendors the console page's client libraries.
    """

    def run(self):
        super().run()
        if not self.dry_run:
            vendor_into(self.build_lib)


class SdistVendoring(sdist):
    """
    sdist whose tree carries the vendored copies, so a wheel builds from it alone.
    """

    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        vendor_into(base_dir)


setup(
    name="vaporproxy",
    version="0.1.0",
    description="A browser console gateway (VNC and SPICE over WebSocket) for libvirt VMs",
    packages=find_packages(exclude=["tests", "tests.*", "bench", "bench.*"]) + ["twisted.plugins"],
    package_data={"vaporproxy": ["static/*", "static/**/*"]},
    include_package_data=True,
    python_requires=">=3.11",
    install_requires=requirements("requirements.txt"),
    extras_require={
        "test": requirements("requirements-test.txt"),
        "bench": ["websockify==0.13.0", "numpy"],
    },
    cmdclass={"build_py": BuildPyVendoring, "sdist": SdistVendoring},
)
