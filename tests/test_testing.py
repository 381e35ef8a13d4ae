"""
Tests for L{vaporproxy.testing}: the fakes shipped for users' own tests.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.interfaces import IConsoleLocator, ILimiter, ITokenStore, VMConsoles
from vaporproxy.testing import FakeConsoleLocator, MemoryLimiter, MemoryTokenStore

VM = VMConsoles(uuid="0b5c6d3e-0000-4000-8000-000000000001", name="web-1", running=True, graphics=())


class FakeConsoleLocatorTests(SynchronousTestCase):
    def test_interfaces(self) -> None:
        """When the shipped fakes are checked, they provide the interfaces they stand in for."""
        self.assertTrue(verifyObject(IConsoleLocator, FakeConsoleLocator()))
        self.assertTrue(verifyObject(ITokenStore, MemoryTokenStore(Clock(), 60)))
        self.assertTrue(verifyObject(ILimiter, MemoryLimiter(1, 1)))

    def test_byUuidAndName(self) -> None:
        """When a VM is added, it is found by its UUID and by its name."""
        locator = FakeConsoleLocator([VM])
        self.assertIs(self.successResultOf(locator.locate(VM.uuid)), VM)
        self.assertIs(self.successResultOf(locator.locate("web-1")), VM)
        self.assertEqual(locator.lookups, 2)

    def test_unknown(self) -> None:
        """When the VM is unknown or removed, the lookup fails with VM_NOT_FOUND."""
        locator = FakeConsoleLocator([VM])
        locator.remove("web-1")
        error = self.failureResultOf(locator.locate(VM.uuid), ConsoleError).value
        self.assertIs(error.code, ErrorCode.VM_NOT_FOUND)

    def test_broken(self) -> None:
        """When the fake hypervisor is broken, lookups fail with INTERNAL_ERROR and check reports it."""
        locator = FakeConsoleLocator([VM])
        locator.broken = "unreachable"
        error = self.failureResultOf(locator.locate(VM.uuid), ConsoleError).value
        self.assertIs(error.code, ErrorCode.INTERNAL_ERROR)
        self.assertEqual(self.successResultOf(locator.check()), {"fake:///": "unreachable"})
