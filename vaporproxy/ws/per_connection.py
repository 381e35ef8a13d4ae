"""
An attribute each connection makes on first use (L{PerConnection}), for
the per-connection objects a protocol class would otherwise make for every
connection whether used or not (L{vaporproxy.ws.autobahn_compat}).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

__all__ = ["PerConnection"]


class PerConnection:
    """
    An attribute of each connection made on first use: Autobahn makes
    these in every protocol's C{__init__} or C{_connectionMade} whether or
    not the connection ever uses them (a console's send queue, text
    validator, closed future, event results).  A non-data descriptor: once
    made (or assigned), the instance's own value is read as usual.
    """

    def __init__(self, make: Callable[[], Any]):
        self._make = make
        self._name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def __get__(self, instance: Any, owner: Optional[type] = None) -> Any:
        if instance is None:
            return self
        value = instance.__dict__[self._name] = self._make()
        return value
