"""
The WebSocket side: the Autobahn adapter, the frame parser/writer, the port switch.
"""
