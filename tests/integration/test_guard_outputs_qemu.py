"""
The guards without a sink against a real QEMU: the typed outputs their
inputs return are enough to drive a VNC and a SPICE handshake, as a console
session machine will (the outputs are dispatched here, one at a time, in
order, by a small driver; the guard never sees a sink).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Deque, List

from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from tests.integration.qemu_fixture import start_qemu
from tests.integration.test_guards_qemu import (
    SPICE_PASSWORD,
    VNC_PASSWORD,
    LoopSink,
    novnc_browser,
    spice_browser,
    spice_link,
)
from vaporproxy.guards.kit import Admit, Established, Output, SendToClient, SpiceSessionAssigned, deliver
from vaporproxy.guards.rfb import RFBGuard
from vaporproxy.guards.spice import SpiceGuard


class OutputDriver:
    """
    Stands where the bridge calls its guard: each input goes to a guard made
    without a sink, and the outputs it returns are dispatched (here: by
    L{deliver} to the test's L{LoopSink}) in order, those of an input given
    during a dispatch after the ones already waiting.

    @ivar outputs: every output, in the order it was dispatched.
    """

    def __init__(self, guard: Any, loop: LoopSink):
        self._guard = guard
        self._loop = loop
        self._waiting: Deque[Output] = deque()
        self._dispatching = False
        self.outputs: List[Output] = []

    def _dispatch(self, outputs: List[Output]) -> None:
        self._waiting.extend(outputs)
        if self._dispatching:
            return
        self._dispatching = True
        try:
            while self._waiting:
                output = self._waiting.popleft()
                self.outputs.append(output)
                deliver(self._loop, output)
        finally:
            self._dispatching = False

    def start(self) -> None:
        self._dispatch(self._guard.start())

    def client_data(self, data: bytes) -> None:
        self._dispatch(self._guard.client_data(data))

    def server_connected(self) -> None:
        self._dispatch(self._guard.server_connected())

    def server_data(self, data: bytes) -> None:
        self._dispatch(self._guard.server_data(data))

    def kinds(self) -> List[str]:
        """The outputs' class names, data outputs left out."""
        return [type(o).__name__ for o in self.outputs if not type(o).__name__.startswith("SendTo")]


class GuardOutputsQemuTests(TestCase):
    """
    RFB and SPICE handshakes with QEMU driven by typed outputs only.
    """

    timeout = 30

    def setUp(self) -> None:
        self.qemu = start_qemu(self, vnc_password=VNC_PASSWORD, spice_password=SPICE_PASSWORD)

    async def _vnc(self) -> None:
        loop = LoopSink(self.qemu.vnc_port, novnc_browser())
        driver = OutputDriver(RFBGuard(None, VNC_PASSWORD), loop)
        loop.guard = driver
        self.addCleanup(loop.close)
        driver.start()
        loop.dial()
        self.assertEqual(await loop.done, "established")
        self.assertEqual(driver.outputs[0], SendToClient(b"RFB 003.008\n"))
        self.assertEqual(driver.outputs[-1], Established())
        self.assertEqual(driver.kinds(), ["Established"])

    def test_vnc_auth(self) -> Deferred:
        """
        When QEMU asks for VNC authentication, the outputs alone carry the
        handshake through to Established.
        """
        return Deferred.fromCoroutine(self._vnc())

    def _channel(self, expected: Any, channel_type: int, connection_id: int) -> "tuple[LoopSink, OutputDriver]":
        loop = LoopSink(self.qemu.spice_port, spice_browser("what-the-browser-typed"))
        driver = OutputDriver(SpiceGuard(None, SPICE_PASSWORD, expected), loop)
        loop.guard = driver
        self.addCleanup(loop.close)
        driver.start()
        driver.client_data(spice_link(channel_type, connection_id))
        return loop, driver

    async def _spice(self) -> None:
        main, main_driver = self._channel(None, 1, 0)
        self.assertEqual(await main.done, "established")
        self.assertEqual(main_driver.kinds(), ["Admit", "SpiceSessionAssigned", "Established"])
        self.assertEqual(main_driver.outputs[0], Admit(True))
        session = [o for o in main_driver.outputs if isinstance(o, SpiceSessionAssigned)][0]
        self.assertNotEqual(session.session_id, 0)
        display, display_driver = self._channel(session.session_id, 2, session.session_id)
        self.assertEqual(await display.done, "established")
        self.assertEqual(display_driver.kinds(), ["Admit", "Established"])
        self.assertEqual(display_driver.outputs[0], Admit(False))

    def test_spice_main_and_display(self) -> Deferred:
        """
        When the main channel links, its outputs admit it and assign the
        session id QEMU gave; a display channel naming that session is then
        admitted and established, from outputs alone.
        """
        return Deferred.fromCoroutine(self._spice())
