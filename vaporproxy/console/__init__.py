"""
Consoles: the live-console registry, one console's outcome record and
(DESIGN.md) its I/O-free lifecycle.  Nothing here imports Autobahn or a
Twisted transport (tests/test_layering.py).
"""
