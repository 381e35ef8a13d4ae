"""
The HTTP side: the Klein console API, the Site, authentication, pure request helpers.
"""
