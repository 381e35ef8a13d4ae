"""
One console's lifecycle and the registry of live consoles (no I/O).
"""
