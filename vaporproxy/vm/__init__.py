"""
Finding a VM and its console: libvirt, domain XML, the allowed-hosts policy.
"""
