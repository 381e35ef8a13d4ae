"""
Tests for L{MemoryTokenStore.unredeem}: a console refused with 4007 gives
its token's redemption back (SPEC.md "Hostile clients").
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.stores.test_tokens import GRANT, SPICE_GRANT
from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.stores.tokens import MemoryTokenStore


class UnredeemTests(SynchronousTestCase):
    """
    A redemption given back leaves the token as if never presented.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.store = MemoryTokenStore(self.clock, ttl=60)

    def issue(self, grant=GRANT) -> str:  # type: ignore[no-untyped-def]
        return self.successResultOf(self.store.issue(grant)).token

    def test_redeemAgain(self) -> None:
        """When a redemption is given back, the token redeems again as a first use, once."""
        token = self.issue()
        self.successResultOf(self.store.redeem(token, GRANT.vm_uuid, None))
        self.successResultOf(self.store.unredeem(token))
        self.assertTrue(self.successResultOf(self.store.redeem(token, GRANT.vm_uuid, None)).first)
        error = self.failureResultOf(self.store.redeem(token, GRANT.vm_uuid, None), ConsoleError).value
        self.assertIs(error.code, ErrorCode.TOKEN_ALREADY_USED)

    def test_expiryKept(self) -> None:
        """When a redemption is given back, the token still expires at its original time."""
        token = self.issue()
        self.successResultOf(self.store.redeem(token, GRANT.vm_uuid, None))
        self.successResultOf(self.store.unredeem(token))
        self.clock.advance(61)
        error = self.failureResultOf(self.store.redeem(token, GRANT.vm_uuid, None), ConsoleError).value
        self.assertIs(error.code, ErrorCode.TOKEN_EXPIRED)

    def test_spiceSessionKept(self) -> None:
        """When the token's console has a SPICE session, giving back does nothing, and an unknown token is ignored."""
        token = self.issue(SPICE_GRANT)
        self.successResultOf(self.store.redeem(token, SPICE_GRANT.vm_uuid, None))
        self.successResultOf(self.store.attach_spice_session(token, 7))
        self.successResultOf(self.store.unredeem(token))
        self.successResultOf(self.store.unredeem("not a token"))
        redemption = self.successResultOf(self.store.redeem(token, SPICE_GRANT.vm_uuid, None))
        self.assertEqual((redemption.first, redemption.spice_session_id), (False, 7))
