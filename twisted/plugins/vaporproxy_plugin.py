"""
The C{twistd vaporproxy} plugin.  C{ServiceMaker} imports C{vaporproxy.tap}
only when the sub-command runs, so C{twistd --help} stays fast.
"""

from twisted.application.service import ServiceMaker

vaporproxy = ServiceMaker(
    "vaporproxy",
    "vaporproxy.tap",
    "A WebSocket console gateway (VNC and SPICE) for libvirt VMs",
    "vaporproxy",
)
