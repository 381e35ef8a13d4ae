"""
Tests for L{vaporproxy.http.console_info}'s pieces (the route itself is
tested through the API in L{tests.http.test_api}).
"""

from __future__ import annotations

import itertools
from fnmatch import fnmatchcase

from twisted.trial.unittest import SynchronousTestCase

from vaporproxy.http.console_info import key_allows
from vaporproxy.http.principal import Principal


class KeyAllowsTests(SynchronousTestCase):
    def test_sameAsEveryPattern(self) -> None:
        """
        For keys with and without C{*}, and names empty, missing or not,
        a VM is allowed exactly when one pattern matches one non-empty name.
        """
        patterns = [(), ("*",), ("web-*",), ("web-*", "*"), ("db-1",), ("*-1", "x")]
        names = [("web-1", "uuid"), ("", None), (None, "db-1"), ("db-1",), (), ("",), ("\n",)]
        for vms, given in itertools.product(patterns, names):
            expected = any(fnmatchcase(name, pattern) for pattern in vms for name in given if name)
            self.assertEqual(key_allows(Principal(user="u", vms=vms), *given), expected, (vms, given))
