"""
Tests for L{vaporproxy.http.stepup}: step-up policies and their challenge.
"""

from twisted.trial.unittest import SynchronousTestCase

from vaporproxy.config import StepUpPolicy
from vaporproxy.http.stepup import check_step_up, policy_for

NOW = 1_800_000_000.0
PROD = StepUpPolicy(vms=("prod-*",), require_mfa=True, max_auth_age=600.0, acr_values="urn:mfa")


class StepUpTests(SynchronousTestCase):
    def test_firstMatchWins(self):
        """
        When several policies match a VM, the first one applies; a VM no pattern matches has none.
        """
        other = StepUpPolicy(vms=("*",), require_mfa=False)
        self.assertIs(policy_for([PROD, other], "prod-db", "uuid"), PROD)
        self.assertIs(policy_for([PROD, other], "dev-db", "uuid"), other)
        self.assertIsNone(policy_for([PROD], "dev-db", "6f1b2a3c"))
        self.assertIs(policy_for([PROD], None, "prod-x"), PROD)

    def test_apiKeyRefused(self):
        """
        When an API key asks for a console of a step-up VM, it is refused with the RFC 9470 challenge.
        """
        refusal = check_step_up(PROD, method="api_key", amr=None, auth_time=None, now=NOW)
        self.assertEqual(
            refusal.challenge(),
            'Bearer error="insufficient_user_authentication", error_description="this VM needs a multi-factor'
            ' sign-in (a token from the identity provider)", max_age=600, acr_values="urn:mfa"',
        )

    def test_jwtWithoutMfa(self):
        """
        When a JWT's amr holds no MFA method, it is refused.
        """
        self.assertIsNotNone(check_step_up(PROD, method="jwt", amr=["pwd"], auth_time=NOW, now=NOW))
        self.assertIsNotNone(check_step_up(PROD, method="jwt", amr="mfa", auth_time=NOW, now=NOW))

    def test_oldSignIn(self):
        """
        When auth_time is older than max_auth_age, or missing, it is refused; a recent MFA sign-in passes.
        """
        self.assertIsNotNone(check_step_up(PROD, method="jwt", amr=["otp"], auth_time=NOW - 601, now=NOW))
        self.assertIsNotNone(check_step_up(PROD, method="jwt", amr=["otp"], auth_time=None, now=NOW))
        self.assertIsNone(check_step_up(PROD, method="jwt", amr=["pwd", "otp"], auth_time=NOW - 599, now=NOW))

    def test_noPolicyNoCheck(self):
        """
        When no policy matches, anything passes.
        """
        self.assertIsNone(check_step_up(None, method="api_key", amr=None, auth_time=None, now=NOW))

    def test_challengeQuoting(self):
        """
        When a description or acr value holds quotes or control characters, the header value stays one well-formed line.
        """
        policy = StepUpPolicy(vms=("*",), acr_values='a"b\r\nc')
        challenge = check_step_up(policy, method="api_key", amr=None, auth_time=None, now=NOW).challenge()
        self.assertNotIn("\n", challenge)
        self.assertIn('acr_values="abc"', challenge)
