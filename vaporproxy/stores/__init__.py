"""
Tokens and limits: memory and Redis implementations of the store interfaces.
"""
