"""
Sans-IO protocol handshakes (RFB, VeNCrypt, SPICE) the proxy performs for the
browser: bytes and events in, typed outputs out.  C{kit} holds what they are
made of (L{vaporproxy.guards.kit.StepReader}, the outputs, their delivery to
a sink); C{rfb}, C{vencrypt} and C{spice} are the protocols.
"""
