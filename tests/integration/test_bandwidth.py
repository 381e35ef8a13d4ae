"""
Bandwidth policy on the real reactor (issue 9): a VM that streams without
end, a console limited by C{console.max_bandwidth}.  The browser receives
at the limit (within 10 %), the VM is paused rather than the proxy
buffering, and the proxy's buffers stay within a few C{buffer_size}.
"""

from __future__ import annotations

import time
from dataclasses import replace

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from tests.integration.test_backpressure import BUFFER, sleep, streaming_vm
from tests.integration.test_bridge_loopback import Proxy
from tests.ws.test_stages import Metrics
from vaporproxy.config import ConsoleConfig
from vaporproxy.relay.fastwrite import write_buffered
from vaporproxy.relay.planner import StagePlanner

RATE = 2 * 1024 * 1024  # bytes a second


class BandwidthTests(TestCase):
    timeout = 30

    async def _limited(self) -> None:
        vm_port, streamers = streaming_vm(self)
        console = ConsoleConfig(buffer_size=BUFFER, connection_timeout=5, max_bandwidth=RATE)
        proxy = Proxy(self, vm_port, console)
        metrics = Metrics()
        proxy.factory.planner = StagePlanner(replace(proxy.factory.config, console=console), reactor, metrics)
        _, factory = await proxy.open_client()
        await sleep(0.5)  # past the first burst
        [record] = proxy.registry.consoles()
        bridge = record.owner
        start_bytes, start = sum(map(len, factory.received)), time.monotonic()
        buffered = []
        for _ in range(30):
            await sleep(0.1)
            buffered.append(write_buffered(bridge.transport) + write_buffered(bridge._backend.transport))
        rate = (sum(map(len, factory.received)) - start_bytes) / (time.monotonic() - start)
        print(f"\n  throttled console: {rate / 1024 / 1024:.3f} MiB/s for a 2 MiB/s limit;"
              f" proxy buffers at most {max(buffered) // 1024} KiB")
        self.assertLess(abs(rate / RATE - 1), 0.10, f"{rate / 1024 / 1024:.2f} MiB/s for a 2 MiB/s limit")
        self.assertLessEqual(max(buffered), 3 * BUFFER + 65536, buffered)
        self.assertGreater(streamers[0].pauses, 0)
        self.assertGreater(metrics.throttled_s, 1.0)
        for transport in (bridge.transport, bridge._backend.transport):
            transport.abortConnection()
        await sleep(0.1)

    def test_rateHeld(self) -> None:
        """
        When a console has max_bandwidth, the browser receives at that rate within 10 % while the proxy's buffers stay bounded.
        """
        return Deferred.fromCoroutine(self._limited())
