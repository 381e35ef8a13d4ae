"""
The WebSocket side: the Autobahn adapter of the console's session (and the
executor of its outputs), the frame parser/writer, the port switch.
"""
