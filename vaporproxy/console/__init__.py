"""
Consoles: the live-console registry, one console's outcome record and
(DESIGN.md) its I/O-free lifecycle (session.py, with its inputs and
outputs in events.py), which the console WebSocket runs.  Nothing here imports Autobahn or a
Twisted transport (tests/test_layering.py).
"""
