from setuptools import find_packages, setup

setup(
    name="vaporproxy",
    version="0.1.0",
    description="A browser console gateway (VNC and SPICE over WebSocket) for libvirt VMs",
    packages=find_packages(exclude=["tests", "tests.*"]) + ["twisted.plugins"],
    package_data={"vaporproxy": ["static/*", "static/**/*"]},
    include_package_data=True,
    python_requires=">=3.11",
    install_requires=[
        "twisted[tls]>=24.7",
        "autobahn>=24.4",
        "klein>=24.8",
        "txredisapi>=1.4.10",
        "libvirt-python>=9.0",
        "lxml>=5",
        "pyyaml>=6",
        "cryptography>=42",
        "prometheus_client>=0.20",
    ],
    extras_require={
        "test": ["treq", "websocket-client", "vncdotool"],
        "bench": ["websockify==0.13.0", "numpy"],
    },
)
