"""
Tests for the config keys of issue #11 (hostile clients).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from vaporproxy.config import ConfigError, parse_config


class HostileKeysTests(SynchronousTestCase):
    """
    server.request_timeout, max_pending_*, metrics_local; auth.mint_*,
    max_outstanding_tokens; console.max_connections_per_user/client.
    """

    def test_defaults(self) -> None:
        """When nothing is set, the defaults are safe on a 1024-descriptor process."""
        config = parse_config("")
        server, auth, console = config.server, config.auth, config.console
        self.assertEqual((server.request_timeout, server.max_pending_connections, server.max_pending_per_client,
                          server.metrics_local), (30.0, 512, 128, False))  # fmt: skip
        self.assertEqual((auth.max_outstanding_tokens, auth.mint_rate, auth.mint_burst), (100, 10.0, 50))
        self.assertEqual((console.max_connections_per_user, console.max_connections_per_client), (0, 0))

    def test_values(self) -> None:
        """When the keys are set, they are parsed (durations, rates with /s, 0 for unlimited)."""
        config = parse_config(
            "server: {request_timeout: 5s, max_pending_connections: 64, max_pending_per_client: 0, metrics_local: true}\n"
            "auth: {max_outstanding_tokens: 0, mint_rate: 2.5/s, mint_burst: 5}\n"
            "console: {max_connections_per_user: 3, max_connections_per_client: 0}\n"
        )
        self.assertEqual((config.server.request_timeout, config.server.max_pending_connections,
                          config.server.max_pending_per_client, config.server.metrics_local), (5.0, 64, 0, True))  # fmt: skip
        self.assertEqual((config.auth.max_outstanding_tokens, config.auth.mint_rate, config.auth.mint_burst), (0, 2.5, 5))
        self.assertEqual(config.console.max_connections_per_user, 3)

    def test_bad_values(self) -> None:
        """When a value is out of range, the error names the key."""
        for text, key in (("auth: {mint_rate: fast}", "auth.mint_rate"),
                          ("auth: {mint_rate: -1}", "auth.mint_rate"),
                          ("auth: {mint_burst: 0}", "auth.mint_burst"),
                          ("server: {max_pending_connections: 0}", "server.max_pending_connections"),
                          ("console: {max_connections_per_user: -1}", "console.max_connections_per_user")):  # fmt: skip
            error = self.assertRaises(ConfigError, parse_config, text)
            self.assertTrue(str(error).startswith(key + ":"), str(error))
