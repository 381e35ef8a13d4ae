"""
Tests for contrib/systemd/vaporproxy.service: systemd accepts it, its
command line is one twistd understands, and its sandbox and limits are the
documented ones.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
from typing import Dict, List

from twisted.scripts._twistd_unix import ServerOptions
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from vaporproxy.config import Config

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT = os.path.join(CHECKOUT, "contrib", "systemd", "vaporproxy.service")
INSTALLED_TWISTD = "/opt/vaporproxy/bin/twistd"
#: A console's worst case in descriptors: a SPICE console's 16 channels, a WebSocket and a TCP socket each.
FDS_PER_CONSOLE = 32


def service_settings() -> Dict[str, List[str]]:
    """
    The [Service] section: every value of each key, in order.
    """
    settings: Dict[str, List[str]] = {}
    section = None
    with open(UNIT) as f:
        for raw in f:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("["):
                section = line
            elif section == "[Service]":
                key, _, value = line.partition("=")
                settings.setdefault(key, []).append(value)
    return settings


class SystemdUnitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.settings = service_settings()

    def one(self, key: str) -> str:
        values = self.settings.get(key, [])
        self.assertEqual(len(values), 1, f"{key}: {values}")
        return values[0]

    def test_systemdAnalyzeVerify(self) -> None:
        """
        When systemd-analyze verifies the unit (twistd's path pointed at an executable), it reports nothing.
        """
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise SkipTest("systemd-analyze is not installed (apt-get install systemd)")
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        twistd = os.path.join(directory, "twistd")
        with open(twistd, "w") as f:
            f.write("#!/bin/sh\n")
        os.chmod(twistd, stat.S_IRWXU)
        with open(UNIT) as f:
            text = f.read()
        self.assertEqual(text.count("ExecStart=" + INSTALLED_TWISTD + " "), 1)
        unit = os.path.join(directory, "vaporproxy.service")
        with open(unit, "w") as f:
            f.write(text.replace("ExecStart=" + INSTALLED_TWISTD, "ExecStart=" + twistd))
        done = subprocess.run([analyze, "verify", unit], capture_output=True, text=True, timeout=60)
        self.assertEqual((done.returncode, done.stdout + done.stderr), (0, ""))

    def test_execStartParses(self) -> None:
        """
        When twistd parses the unit's command line (with the example vapor.conf), it runs vaporproxy in the foreground with no pid file.
        """
        argv = shlex.split(self.one("ExecStart"))
        self.assertEqual(argv[0], INSTALLED_TWISTD)
        self.assertEqual(argv[argv.index("--config") + 1], "/etc/vaporproxy/vapor.conf")
        argv[argv.index("--config") + 1] = os.path.join(CHECKOUT, "vapor.conf")
        options = ServerOptions()
        options.parseOptions(argv[1:])
        self.assertEqual((options["nodaemon"], options["pidfile"], options.subCommand), (True, "", "vaporproxy"))
        self.assertIsInstance(options.subOptions["parsed"], Config)

    def test_reloadSendsSighup(self) -> None:
        """
        When systemctl reload runs, SIGHUP goes to the main process.
        """
        self.assertEqual(self.one("ExecReload"), "/bin/kill -HUP $MAINPID")

    def test_stopDrains(self) -> None:
        """
        When the service stops, only the main process gets SIGTERM and it has longer than the workers' 30 s drain.
        """
        self.assertEqual(self.one("KillMode"), "mixed")
        self.assertEqual(self.one("KillSignal"), "SIGTERM")
        self.assertGreater(int(self.one("TimeoutStopSec").rstrip("s")), 30)

    def test_sandbox(self) -> None:
        """
        When the unit runs, it has no capabilities, no new privileges, a read-only system and only IP and Unix sockets.
        """
        expected = {
            "DynamicUser": "yes",
            "ProtectSystem": "strict",
            "NoNewPrivileges": "yes",
            "CapabilityBoundingSet": "",
            "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
            "StateDirectory": "vaporproxy",
            "ConfigurationDirectory": "vaporproxy",
            "SupplementaryGroups": "libvirt",
        }
        self.assertEqual({key: self.one(key) for key in expected}, expected)
        self.assertNotIn("AmbientCapabilities", self.settings)

    def test_descriptorsForDefaultCaps(self) -> None:
        """
        When every console allowed by the default max_total_connections is a full SPICE console, LimitNOFILE still covers it.
        """
        needed = Config().console.max_total_connections * FDS_PER_CONSOLE + 128
        self.assertGreaterEqual(int(self.one("LimitNOFILE")), needed)
