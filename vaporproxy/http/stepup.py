"""
Step-up authentication for chosen VMs (SPEC.md "Step-up authentication").

C{auth.policies} is a list of C{{vms, require_mfa, max_auth_age,
acr_values}}; the first entry whose C{vms} patterns (C{fnmatch}, like API
keys') match the VM's name or UUID applies.  For such a VM, console info
needs a JWT whose C{amr} holds an MFA method and, with C{max_auth_age},
whose C{auth_time} is at most that old; an API key alone is refused.

The refusal is 401 C{MFA_REQUIRED} with RFC 9470's challenge::

    WWW-Authenticate: Bearer error="insufficient_user_authentication",
        error_description="…", max_age=600, acr_values="…"

so an identity provider's client knows to re-authenticate the user with a
second factor and come back.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Optional, Sequence

from vaporproxy.config import StepUpPolicy

__all__ = ["StepUpRefusal", "check_step_up", "policy_for"]

#: C{amr} values (RFC 8176) that count as multi-factor.
MFA_AMR_VALUES = frozenset({"mfa", "otp", "hwk", "sc", "swk", "pop"})


@dataclass(frozen=True)
class StepUpRefusal:
    """Why a caller must authenticate again, and the challenge to send."""

    description: str
    max_age: Optional[int]
    acr_values: Optional[str]

    def challenge(self) -> str:
        """The C{WWW-Authenticate} value (RFC 9470 section 3)."""
        parts = [
            'Bearer error="insufficient_user_authentication"',
            f'error_description="{_quoted(self.description)}"',
        ]
        if self.max_age is not None:
            parts.append(f"max_age={self.max_age}")
        if self.acr_values:
            parts.append(f'acr_values="{_quoted(self.acr_values)}"')
        return ", ".join(parts)


def _quoted(text: str) -> str:
    return "".join(c for c in text if c.isprintable() and c not in '"\\')


def policy_for(policies: Sequence[StepUpPolicy], *names: Optional[str]) -> Optional[StepUpPolicy]:
    """The first policy whose patterns match one of the VM's C{names}."""
    for policy in policies:
        if any(fnmatchcase(name, pattern) for pattern in policy.vms for name in names if name):
            return policy
    return None


def check_step_up(
    policy: Optional[StepUpPolicy], *, method: str, amr: Any, auth_time: Any, now: float
) -> Optional[StepUpRefusal]:
    """
    C{None} when the caller may open the console, else the refusal.

    @param method: C{"jwt"} or C{"api_key"} (or C{"share"}).
    @param amr: the JWT's C{amr} claim (a list of strings), if any.
    @param auth_time: the JWT's C{auth_time} claim (POSIX seconds), if any.
    """
    if policy is None or not (policy.require_mfa or policy.max_auth_age is not None):
        return None
    max_age = None if policy.max_auth_age is None else int(policy.max_auth_age)

    def refuse(why: str) -> StepUpRefusal:
        return StepUpRefusal(why, max_age, policy.acr_values)

    if method != "jwt":
        return refuse("this VM needs a multi-factor sign-in (a token from the identity provider)")
    if policy.require_mfa and not (
        isinstance(amr, (list, tuple)) and any(isinstance(v, str) and v in MFA_AMR_VALUES for v in amr)
    ):
        return refuse("this VM needs a multi-factor sign-in")
    if policy.max_auth_age is not None:
        if not isinstance(auth_time, (int, float)) or isinstance(auth_time, bool):
            return refuse("this VM needs a recent sign-in (auth_time missing)")
        if now - auth_time > policy.max_auth_age:
            return refuse("this VM needs a recent sign-in")
    return None
