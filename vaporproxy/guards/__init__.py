"""
Sans-IO protocol handshakes (RFB, VeNCrypt, SPICE) the proxy performs for the browser.
"""
