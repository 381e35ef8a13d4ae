"""
What a console's browser may send to its VM, and the error of a browser
stream a filter cannot frame.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["InputPolicy", "PolicyViolation"]


class PolicyViolation(Exception):
    """The browser sent what a filter cannot frame (fail closed: 4012 BAD_REQUEST)."""


@dataclass(frozen=True)
class InputPolicy:
    """What a console's browser may send to the VM (view-only, clipboard to the VM)."""

    view_only: bool = False
    clipboard_to_vm: bool = True
    clipboard_max: int = 64 * 1024

    @property
    def filters(self) -> bool:
        """Whether any message can be dropped (else no filter is needed)."""
        return self.view_only or not self.clipboard_to_vm or self.clipboard_max < 2**31
