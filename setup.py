from pathlib import Path

from setuptools import find_packages, setup


def requirements(name):
    lines = (Path(__file__).parent / name).read_text().splitlines()
    return [line for line in lines if line and not line.startswith("#")]


setup(
    name="vaporproxy",
    version="0.1.0",
    description="A browser console gateway (VNC and SPICE over WebSocket) for libvirt VMs",
    packages=find_packages(exclude=["tests", "tests.*"]) + ["twisted.plugins"],
    package_data={"vaporproxy": ["static/*", "static/**/*"]},
    include_package_data=True,
    python_requires=">=3.11",
    install_requires=requirements("requirements.txt"),
    extras_require={
        "test": requirements("requirements-test.txt"),
        "bench": ["websockify==0.13.0", "numpy"],
    },
)
