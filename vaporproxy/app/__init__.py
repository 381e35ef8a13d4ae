"""
Process services: worker processes, reload, shutdown.
"""
