"""
Tests for L{vaporproxy.vm.hosts}: the allowed_hosts policy with a fake
resolver.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.interfaces import IHostnameResolver, IHostResolution, IResolutionReceiver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.vm.hosts import LIBVIRT_HANDOFF, HostPolicy, parse_address, parse_allowed


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str):
        self.name = name

    def cancel(self) -> None:
        pass


@implementer(IHostnameResolver)
class FakeResolver:
    """
    Resolves names from a table, synchronously, or later when C{hold} is
    set; records every name asked.
    """

    def __init__(self, table: Dict[str, Sequence[str]]):
        self.table = table
        self.asked: List[str] = []
        self.hold = False
        self.held: List[tuple] = []

    def resolveHostName(self, receiver: IResolutionReceiver, hostName: str, portNumber: int = 0,
                        addressTypes: Optional[Sequence[type]] = None, transportSemantics: str = "TCP") -> _Resolution:
        self.asked.append(hostName)
        resolution = _Resolution(hostName)
        receiver.resolutionBegan(resolution)
        if self.hold:
            self.held.append((receiver, hostName, portNumber))
        else:
            self._answer(receiver, hostName, portNumber)
        return resolution

    def _answer(self, receiver: IResolutionReceiver, hostName: str, port: int) -> None:
        for address in self.table.get(hostName, ()):
            kind = IPv6Address if ":" in address else IPv4Address
            receiver.addressResolved(kind("TCP", address, port))
        receiver.resolutionComplete()

    def release(self) -> None:
        held, self.held = self.held, []
        for args in held:
            self._answer(*args)


TABLE = {
    "localhost": ["127.0.0.1", "::1"],
    "kvm1.internal": ["10.0.0.11"],
    "kvm2.internal": ["192.168.7.4", "10.0.0.12"],
    "dual.internal": ["2001:db8::12", "10.20.0.1"],
    "evil.example": ["203.0.113.66"],
    "mapped.internal": ["::ffff:10.0.0.77"],
    "console-vip": ["10.9.9.9"],
}


class HostPolicyTests(SynchronousTestCase):
    """
    Tests for L{HostPolicy}.
    """

    def setUp(self) -> None:
        self.resolver = FakeResolver(TABLE)

    def policy(self, *allowed: str) -> HostPolicy:
        return HostPolicy(allowed, self.resolver)

    def resolved(self, policy: HostPolicy, host: str) -> str:
        return self.successResultOf(policy.resolve(host))

    def refused(self, policy: HostPolicy, host: str, code: ErrorCode = ErrorCode.UNAUTHORIZED) -> ConsoleError:
        error = self.failureResultOf(policy.resolve(host), ConsoleError).value
        self.assertIs(error.code, code)
        return error

    def test_ipv4Literal(self) -> None:
        """
        When the target is an allowed IPv4 literal, it is answered without
        any name lookup.
        """
        self.assertEqual(self.resolved(self.policy("127.0.0.1"), "127.0.0.1"), "127.0.0.1")
        self.assertEqual(self.resolver.asked, [])

    def test_ipv6Literal(self) -> None:
        """
        When the target is an allowed IPv6 literal (bracketed or not), its
        canonical form is answered.
        """
        policy = self.policy("::1", "2001:db8::/32")
        self.assertEqual(self.resolved(policy, "[::1]"), "::1")
        self.assertEqual(self.resolved(policy, "2001:DB8:0::7"), "2001:db8::7")
        self.assertEqual(self.resolver.asked, [])

    def test_cidr(self) -> None:
        """
        When the target is inside an allowed CIDR, it is answered; outside,
        refused.
        """
        policy = self.policy("192.168.1.0/24")
        self.assertEqual(self.resolved(policy, "192.168.1.77"), "192.168.1.77")
        self.refused(policy, "192.168.2.1")

    def test_nameResolvedAndAddressChecked(self) -> None:
        """
        When the target is a name, the first of its addresses that is
        allowed is answered.
        """
        self.assertEqual(self.resolved(self.policy("10.0.0.0/8"), "kvm2.internal"), "10.0.0.12")

    def test_allowedNameIsResolvedForTheCheck(self) -> None:
        """
        When an allowed entry is a name, an address literal that the name
        resolves to is allowed.
        """
        policy = self.policy("kvm1.internal")
        self.assertEqual(self.resolved(policy, "10.0.0.11"), "10.0.0.11")
        self.assertIn("kvm1.internal", self.resolver.asked)

    def test_allowedNameMatchesOtherName(self) -> None:
        """
        When the target is another name that resolves to an allowed name's
        address, its address is answered.
        """
        policy = self.policy("console-vip")
        self.resolver.table["alias.internal"] = ["10.9.9.9"]
        self.assertEqual(self.resolved(policy, "alias.internal"), "10.9.9.9")

    def test_sameNameCaseInsensitive(self) -> None:
        """
        When the target is an allowed name in another case, with a trailing
        dot, its resolved address is answered.
        """
        self.assertEqual(self.resolved(self.policy("KVM1.internal"), "kvm1.INTERNAL."), "10.0.0.11")

    def test_localhostDefault(self) -> None:
        """
        When allowed_hosts is the default, localhost and both loopback
        addresses are allowed and other hosts are not.
        """
        policy = self.policy("localhost", "127.0.0.1", "::1")
        self.assertEqual(self.resolved(policy, "localhost"), "127.0.0.1")
        self.assertEqual(self.resolved(policy, "::1"), "::1")
        self.refused(policy, "10.0.0.11")

    def test_refusedNeverNamesHost(self) -> None:
        """
        When a host is refused, the client message does not name it, the
        status is 403, and the log does.
        """
        events: List[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        error = self.refused(self.policy("10.0.0.0/8"), "evil.example")
        self.assertEqual(error.message, "Console host is not allowed")
        self.assertEqual(error.http_status, 403)
        self.assertNotIn("evil", error.to_json())
        self.assertNotIn("203.0.113", error.to_json())
        self.assertTrue(any(e.get("host") == "evil.example" for e in events))

    def test_unresolvable(self) -> None:
        """
        When the name does not resolve, CONNECTION_FAILED.
        """
        self.refused(self.policy("10.0.0.0/8"), "nowhere.internal", ErrorCode.CONNECTION_FAILED)

    def test_ipv4MappedTarget(self) -> None:
        """
        When the target is an IPv4-mapped IPv6 address, it is checked and
        answered as IPv4.
        """
        policy = self.policy("10.0.0.0/8")
        self.assertEqual(self.resolved(policy, "::ffff:10.1.2.3"), "10.1.2.3")
        self.assertEqual(self.resolved(policy, "mapped.internal"), "10.0.0.77")
        self.refused(policy, "::ffff:203.0.113.1")

    def test_ipv4MappedAllowedEntry(self) -> None:
        """
        When an allowed entry is written as an IPv4-mapped address or CIDR,
        the plain IPv4 target matches.
        """
        self.assertEqual(self.resolved(self.policy("::ffff:10.0.0.5"), "10.0.0.5"), "10.0.0.5")
        self.assertEqual(self.resolved(self.policy("::ffff:10.0.0.0/104"), "10.3.3.3"), "10.3.3.3")

    def test_mappedDoesNotWidenIPv6(self) -> None:
        """
        When only an IPv6 network is allowed, an IPv4 address does not pass
        through its mapped form.
        """
        self.refused(self.policy("2001:db8::/32"), "10.0.0.1")

    def test_dualStackPicksAllowedFamily(self) -> None:
        """
        When a name has IPv6 and IPv4 addresses and only IPv4 is allowed,
        the IPv4 address is answered.
        """
        self.assertEqual(self.resolved(self.policy("10.20.0.0/16"), "dual.internal"), "10.20.0.1")

    def test_refusalBeforeConnect(self) -> None:
        """
        When the name's answer arrives later, nothing is answered until it
        does, and then a refusal.
        """
        self.resolver.hold = True
        d = self.policy("10.0.0.0/8").resolve("evil.example")
        self.assertNoResult(d)
        self.resolver.release()
        self.assertIs(self.failureResultOf(d, ConsoleError).value.code, ErrorCode.UNAUTHORIZED)

    def test_setAllowed(self) -> None:
        """
        When the allowed entries are replaced, the new ones apply at once.
        """
        policy = self.policy("127.0.0.1")
        self.refused(policy, "10.0.0.11")
        policy.set_allowed(["10.0.0.0/8"])
        self.assertEqual(self.resolved(policy, "10.0.0.11"), "10.0.0.11")
        self.refused(policy, "127.0.0.1")

    def test_allowedLiteralRememberedUntilReload(self) -> None:
        """
        An allowed literal's answer is remembered per text (normalised the
        same way every time) and forgotten when the allowed entries change.
        """
        policy = self.policy("127.0.0.1")
        for _ in range(2):
            self.assertEqual(self.resolved(policy, "127.0.0.1"), "127.0.0.1")
            self.assertEqual(self.resolved(policy, "[::ffff:127.0.0.1]"), "127.0.0.1")
        policy.set_allowed(["10.0.0.0/8"])
        self.refused(policy, "127.0.0.1")
        self.refused(policy, "[::ffff:127.0.0.1]")

    def test_allowedLiteralsBounded(self) -> None:
        """
        However many allowed literals are seen, at most 1,024 answers are
        kept.
        """
        policy = self.policy("10.0.0.0/8")
        for i in range(3000):
            host = f"10.0.{i // 256}.{i % 256}"
            self.assertEqual(self.resolved(policy, host), host)
        self.assertLessEqual(len(policy._allowed_literals), 1024)

    def test_setAllowedBadEntryKeepsOld(self) -> None:
        """
        When a reload has a bad entry, ValueError is raised and the old
        policy stays.
        """
        policy = self.policy("127.0.0.1")
        self.assertRaises(ValueError, policy.set_allowed, ["10.0.0.0/33"])
        self.assertEqual(self.resolved(policy, "127.0.0.1"), "127.0.0.1")

    def test_emptyAllowedRefusesAll(self) -> None:
        """
        When nothing is allowed, every host is refused.
        """
        self.refused(self.policy(), "127.0.0.1")

    def test_emptyHost(self) -> None:
        """
        When the host is empty, it is refused.
        """
        self.refused(self.policy("0.0.0.0/0"), "")

    def test_allowedNameUnresolvableIgnored(self) -> None:
        """
        When an allowed name does not resolve, it allows nothing and the
        other entries still apply.
        """
        policy = self.policy("gone.internal", "kvm1.internal")
        self.assertEqual(self.resolved(policy, "10.0.0.11"), "10.0.0.11")
        self.refused(policy, "10.0.0.12")

    def test_resultIsDeferred(self) -> None:
        """
        When resolve is called, it answers a Deferred.
        """
        self.assertIsInstance(self.policy("127.0.0.1").resolve("127.0.0.1"), Deferred)


class ParseTests(SynchronousTestCase):
    """
    Tests for L{parse_allowed} and L{parse_address}.
    """

    def test_split(self) -> None:
        """
        When entries mix names, addresses and CIDRs, they are split into
        networks and lower-case names.
        """
        networks, names = parse_allowed(["Localhost", "127.0.0.1", "192.168.1.0/24", "::1", "fd00::/8"])
        self.assertEqual([str(n) for n in networks], ["127.0.0.1/32", "192.168.1.0/24", "::1/128", "fd00::/8"])
        self.assertEqual(names, ("localhost",))

    def test_nonStrictCIDR(self) -> None:
        """
        When a CIDR has host bits set, it is accepted as its network.
        """
        networks, _ = parse_allowed(["192.168.1.9/24"])
        self.assertEqual(str(networks[0]), "192.168.1.0/24")

    def test_bad(self) -> None:
        """
        When an entry is empty, a bad CIDR or not a host name, ValueError
        names it.
        """
        for bad in ["", "  ", "10.0.0.0/40", "not a host", "user@host"]:
            error = self.assertRaises(ValueError, parse_allowed, [bad])
            self.assertIn(repr(bad), str(error))

    def test_parseAddress(self) -> None:
        """
        When text is an address it is parsed and normalised; otherwise None.
        """
        self.assertEqual(str(parse_address("::ffff:1.2.3.4")), "1.2.3.4")
        self.assertEqual(str(parse_address("[fe80::1]")), "fe80::1")
        self.assertIsNone(parse_address("kvm1"))


class NameCacheTests(SynchronousTestCase):
    """
    Tests for the name resolution cache of L{HostPolicy}.
    """

    def setUp(self) -> None:
        self.resolver = FakeResolver(dict(TABLE))
        self.clock = Clock()

    def policy(self, *allowed: str, ttl: float = 5.0) -> HostPolicy:
        return HostPolicy(allowed, self.resolver, clock=self.clock, name_ttl=ttl)

    def test_allowedNameResolvedOncePerTTL(self) -> None:
        """
        When address literals are checked against an allowed name again and
        again within the TTL, the name is resolved once; after the TTL it
        is resolved again.
        """
        policy = self.policy("kvm2.internal")
        for _ in range(3):
            self.assertEqual(self.successResultOf(policy.resolve("10.0.0.12")), "10.0.0.12")
        self.assertEqual(self.resolver.asked, ["kvm2.internal"])
        self.clock.advance(5.0)
        self.successResultOf(policy.resolve("10.0.0.12"))
        self.assertEqual(self.resolver.asked, ["kvm2.internal", "kvm2.internal"])

    def test_newAddressesSeenAfterTTL(self) -> None:
        """
        When an allowed name moves to another address, the old address is
        allowed until the TTL ends and refused after it, and the new one is
        allowed from then on.
        """
        policy = self.policy("kvm1.internal")
        self.successResultOf(policy.resolve("10.0.0.11"))
        self.resolver.table["kvm1.internal"] = ["10.0.0.99"]
        self.clock.advance(4.9)
        self.successResultOf(policy.resolve("10.0.0.11"))
        self.clock.advance(0.1)
        error = self.failureResultOf(policy.resolve("10.0.0.11"), ConsoleError).value
        self.assertIs(error.code, ErrorCode.UNAUTHORIZED)
        self.assertEqual(self.successResultOf(policy.resolve("10.0.0.99")), "10.0.0.99")

    def test_targetNameCachedAndChecked(self) -> None:
        """
        When a target name is resolved from the cache, its address is still
        checked against the allowed entries.
        """
        policy = self.policy("10.0.0.0/8")
        self.assertEqual(self.successResultOf(policy.resolve("kvm1.internal")), "10.0.0.11")
        self.successResultOf(policy.resolve("kvm1.internal"))
        self.assertEqual(self.resolver.asked, ["kvm1.internal"])
        policy.set_allowed(["192.168.0.0/16"])
        self.failureResultOf(policy.resolve("kvm1.internal"), ConsoleError)

    def test_emptyAnswerNotCached(self) -> None:
        """
        When a name does not resolve, the next check asks again (and sees it
        once it resolves).
        """
        policy = self.policy("10.0.0.0/8")
        error = self.failureResultOf(policy.resolve("new.internal"), ConsoleError).value
        self.assertIs(error.code, ErrorCode.CONNECTION_FAILED)
        self.resolver.table["new.internal"] = ["10.1.1.1"]
        self.assertEqual(self.successResultOf(policy.resolve("new.internal")), "10.1.1.1")
        self.assertEqual(self.resolver.asked, ["new.internal", "new.internal"])

    def test_concurrentLookupsShared(self) -> None:
        """
        When several checks need a name whose lookup is in flight, one
        lookup answers them all.
        """
        policy = self.policy("kvm2.internal")
        self.resolver.hold = True
        ds = [policy.resolve("10.0.0.12") for _ in range(3)]
        for d in ds:
            self.assertNoResult(d)
        self.assertEqual(self.resolver.asked, ["kvm2.internal"])
        self.resolver.release()
        self.assertEqual([self.successResultOf(d) for d in ds], ["10.0.0.12"] * 3)

    def test_setAllowedDropsCache(self) -> None:
        """
        When the allowed entries are reloaded, cached resolutions are
        dropped.
        """
        policy = self.policy("kvm1.internal")
        self.successResultOf(policy.resolve("10.0.0.11"))
        policy.set_allowed(["kvm1.internal"])
        self.successResultOf(policy.resolve("10.0.0.11"))
        self.assertEqual(self.resolver.asked, ["kvm1.internal", "kvm1.internal"])

    def test_zeroTTLTurnsCacheOff(self) -> None:
        """
        When name_ttl is 0, every check resolves the name.
        """
        policy = self.policy("kvm1.internal", ttl=0)
        self.successResultOf(policy.resolve("10.0.0.11"))
        self.successResultOf(policy.resolve("10.0.0.11"))
        self.assertEqual(self.resolver.asked, ["kvm1.internal", "kvm1.internal"])

    def test_allowedLiteralNoLookupSynchronous(self) -> None:
        """
        When the target is an allowed address literal, the answer has
        already fired and nothing is resolved.
        """
        d = self.policy("127.0.0.1", "localhost").resolve("127.0.0.1")
        self.assertEqual(self.successResultOf(d), "127.0.0.1")
        self.assertEqual(self.resolver.asked, [])


class SocketPolicyTests(SynchronousTestCase):
    """
    Tests for UNIX-socket consoles under L{HostPolicy}: allowed when the
    socket, links resolved, lies under an allowed directory.
    """

    def setUp(self) -> None:
        self.base = os.path.realpath(self.mktemp())
        self.vms = os.path.join(self.base, "vms")
        os.makedirs(self.vms)
        self.policy = HostPolicy(["127.0.0.1", self.vms + "/"], FakeResolver(TABLE))

    def test_underDirectory(self) -> None:
        """
        When the socket lies under an allowed directory, its path is the answer.
        """
        path = os.path.join(self.vms, "domain-1", "vnc.sock")
        self.assertEqual(self.successResultOf(self.policy.resolve(path)), path)

    def test_outside(self) -> None:
        """
        When the socket lies elsewhere, or escapes through '..' or a symbolic link, it is refused with 403.
        """
        link = os.path.join(self.vms, "link")
        os.symlink("/run", link)
        for path in ("/run/redis.sock", self.vms + "/../x.sock", link + "/x.sock", self.vms + "x/a.sock"):
            error = self.failureResultOf(self.policy.resolve(path), ConsoleError).value
            self.assertIs(error.code, ErrorCode.UNAUTHORIZED)
            self.assertEqual(error.http_status, 403)

    def test_noDirectories(self) -> None:
        """
        When allowed_hosts has no directory, every socket is refused.
        """
        policy = HostPolicy(["127.0.0.1"], FakeResolver(TABLE))
        self.failureResultOf(policy.resolve(os.path.join(self.vms, "a.sock")), ConsoleError)

    def test_libvirtHandOff(self) -> None:
        """
        When the console has no listener (libvirt hands it over), there is no address to check and the marker is the answer.
        """
        self.assertEqual(self.successResultOf(self.policy.resolve(LIBVIRT_HANDOFF)), LIBVIRT_HANDOFF)
