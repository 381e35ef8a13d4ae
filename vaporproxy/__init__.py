"""
vaporproxy: a browser console gateway for libvirt virtual machines.
"""

__version__ = "0.1.0"
