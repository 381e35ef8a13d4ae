"""
The former console bridge, dissolved (issue #8): the names it exported,
from where they live now.
"""

from vaporproxy.console.registry import ConsoleRecord, ConsoleRegistry
from vaporproxy.relay.backend import BackendProtocol
from vaporproxy.ws.channel import MAX_SPICE_CHANNELS, ConsoleWebSocketProtocol
from vaporproxy.ws.factory import ConsoleBridgeFactory

__all__ = [
    "MAX_SPICE_CHANNELS",
    "BackendProtocol",
    "ConsoleBridgeFactory",
    "ConsoleRecord",
    "ConsoleRegistry",
    "ConsoleWebSocketProtocol",
]
