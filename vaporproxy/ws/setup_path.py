"""
A console's set-up, from the opened WebSocket to the guard's handshake:
the token redeemed, the VM located and its host checked, a slot taken
(the token given back when there is none, SPEC.md "Hostile clients"), the
VM dialled (L{vaporproxy.relay.backend.dial}) and its connection's events.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure

from vaporproxy.console.registry import ConsoleRecord
from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.relay.backend import BackendProtocol, dial
from vaporproxy.relay.fastwrite import high_water
from vaporproxy.vm.target import console_target, dial_host, select_console
from vaporproxy.relay.fastwrite import direct_writer

__all__ = ["REQUIRE_TLS_MESSAGE", "SetupPath"]

log = Logger(namespace="vaporproxy.bridge")

#: What a console WebSocket in clear is told when C{console.enable_tls} is
#: on (UNAUTHORIZED, 4008).
REQUIRE_TLS_MESSAGE = "console connections require TLS"


class SetupPath:
    """
    The set-up of L{vaporproxy.ws.channel.ConsoleWebSocketProtocol} (a part
    of that class: it uses the console's attributes).
    """

    async def _setup(self) -> None:
        """
        Redeem the token, find and check the console, then start the guard
        (VNC: admit and dial at once; SPICE: wait for the guard's admit).
        """
        if self._console.enable_tls and not self._secure:
            # console.enable_tls: consoles only over TLS (the connection
            # itself, or a trusted proxy's X-Forwarded-Proto: https); the
            # token is not redeemed.
            raise ConsoleError(ErrorCode.UNAUTHORIZED, REQUIRE_TLS_MESSAGE)
        token = self._token
        if not token:
            raise ConsoleError(ErrorCode.INVALID_TOKEN)
        factory = self.factory
        redemption = await factory.token_store.redeem(token, self._vm_ref, self._client_ip)
        if self._finished:
            return
        self._redemption = redemption
        grant = redemption.grant
        self._console_type = grant.console_type
        vm = await factory.locator.locate(grant.vm_uuid)
        if self._finished:
            return
        graphics = select_console(vm, grant.console_type, grant.display)
        host = dial_host(vm, graphics)
        address = await factory.host_policy.resolve(host)
        if self._finished:
            return
        self._target = console_target(vm, graphics, host, address, factory.locator)
        if graphics.type == "vnc":
            if not await self._admit_owner():
                return
            vnc_tls = factory.vnc_tls.get(vm.hypervisor)
            if vnc_tls is None:
                self._guard = factory.vnc_guard(self, graphics.password)
            else:
                self._guard = factory.vnc_guard(self, graphics.password, tls=vnc_tls.for_host(host))
            self._guard_call("start")
            # The 101 and the guard's greeting leave now, before the dial.
            self.uncork()
            self._feed_held()
            self._dial()
        else:
            expected = None if redemption.first else redemption.spice_session_id
            planner = getattr(factory, "planner", None)
            hold = planner is not None and planner.holds_spice_input(grant)
            held = {"hold_after_ticket": True} if hold else {}
            self._guard = factory.spice_guard(self, graphics.password, expected, **held)
            self._guard_call("start")
            self._feed_held()
            if not self._finished and self._connecting is None and self._backend is None:
                # The link message is needed before admission.
                self._resume_reading()

    async def _admit_owner(self) -> bool:
        """
        Take a lease and register this WebSocket as a console; C{False} when
        the console ended meanwhile (the lease is then given back here).
        """
        grant = self._redemption.grant  # type: ignore[union-attr]
        try:
            lease = await self.factory.limiter.acquire(
                grant.vm_uuid, self.console_id, user=grant.user, client=self._client_ip
            )
        except ConsoleError as e:
            if e.code is ErrorCode.MAX_CONNECTIONS_REACHED:
                self._unspend()
            raise
        if self._finished:
            lease.release()
            return False
        self._lease = lease
        self._record = ConsoleRecord(
            self.console_id, grant.vm_uuid, grant.console_type, grant.user, self._started_at, self
        )
        self._record.vm_name, self._record.mode, self._record.client = grant.vm_name, grant.mode, self._client_ip
        self.factory.registry.add(self._record)
        return True

    def _unspend(self) -> None:
        """
        Refused for lack of a slot (4007): the token is not spent, the
        browser may retry until it expires (SPEC.md "Hostile clients"), with
        a store that can give a redemption back (C{unredeem}).
        """
        unredeem = getattr(self.factory.token_store, "unredeem", None)
        if unredeem is None or self._token is None or not self._redemption.first:  # type: ignore[union-attr]
            return
        d = unredeem(self._token)
        d.addErrback(self._log_store_error, "unredeem")

    def _setup_failed(self, failure: Failure) -> None:
        if failure.check(ConsoleError):
            error = failure.value
            self._end(error, f"setup failed: {error.code.name}")
        elif failure.check(CancelledError):
            self._end(ConsoleError(ErrorCode.CONNECTION_FAILED), "setup cancelled")
        else:
            log.failure("console {console_id} setup failed", failure, console_id=self.console_id)
            self._end(ConsoleError(ErrorCode.INTERNAL_ERROR), "internal error during setup")

    def _dial(self) -> None:
        if self._finished:
            return
        # The connection timer (connectionMade) ends the console at the
        # deadline, the dial included; the connector needs a timeout of its
        # own only without one (one timer fewer per console).
        timeout: Optional[int] = None
        if self._connect_timer is None:
            remaining = self._console.connection_timeout - (self._seconds() - self._started_at)
            timeout = max(1, int(remaining + 0.999))
        # The host policy's answer (an address literal, or a socket path);
        # plain or TLS as the SPICE channel the guard has read says.
        tls = self.factory.spice_tls.get(self._target.hypervisor)
        channel = getattr(self._guard, "channel_type", None)
        self._connecting = dial(self._reactor, self._target, self, timeout, tls, channel)

    def dial_failed(self, failure: Failure) -> None:
        self._connecting = None
        if self._finished:
            # Stopped by _end (or the console ended meanwhile).
            return
        self._end(
            ConsoleError(ErrorCode.CONNECTION_FAILED),
            f"backend connect failed: {failure.type.__name__}",
        )

    def backend_connected(self, backend: BackendProtocol) -> None:
        self._connecting = None
        if self._finished:
            backend.transport.abortConnection()
            return
        self._backend = backend
        self._backend_direct = direct_writer(backend.transport)
        high_water(backend.transport, self._console.buffer_size)
        if self._to_server:
            backend.transport.writeSequence(self._to_server)
            self._to_server = []
        self._resume_reading()
        self._guard_call("server_connected")

    def backend_setup_data(self, data: bytes) -> None:
        self._guard_call("server_data", data)

    def backend_lost(self, backend: BackendProtocol, reason: Optional[Failure] = None) -> None:
        if self._finished:
            return
        if self.relaying:
            self._end(None, "backend closed", 1000)
        else:
            if getattr(self._guard, "server_lost", None) is not None:
                # The RFB guard fails with why (e.g. the TLS handshake failed).
                self._guard_call("server_lost", reason)
            self._end(ConsoleError(ErrorCode.CONNECTION_FAILED), "backend closed during handshake")
