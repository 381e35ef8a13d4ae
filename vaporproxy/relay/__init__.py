"""
The byte path between the browser's WebSocket and the VM's socket.
"""
