"""
Relay stages (L{vaporproxy.interfaces.IRelayStage}): one file each.
"""
