"""
A console's set-up, as the session's outputs carried out and the answers
turned into its inputs: the token redeemed, the VM located and its host
checked, a slot taken (or the token given back when there is none, SPEC.md
"Hostile clients"), the console registered, the guard started, the VM
dialled (L{vaporproxy.relay.backend.dial}) and its connection's events.

Each store call answers a Deferred whose result becomes the session's next
input (L{SetupPath._answer}); a failure anywhere on the way (carrying out
that input's outputs included) becomes L{SetupFailed}.  What arrives after the console ended is the session's to
ignore (or to give back, for a lease).
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure

from vaporproxy.console import events as ev
from vaporproxy.console.events import BACKEND_LOST, REQUIRE_TLS_MESSAGE
from vaporproxy.console.registry import ConsoleRecord
from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.relay.backend import BackendProtocol, dial
from vaporproxy.relay.fastwrite import direct_writer, high_water
from vaporproxy.vm.target import console_target, dial_host, select_console

__all__ = ["REQUIRE_TLS_MESSAGE", "SetupPath"]

log = Logger(namespace="vaporproxy.bridge")


def _then(d: Any, callback: Any, errback: Any) -> None:
    """
    C{d.addCallbacks(callback, errback)}, or C{callback(result)} at once
    when C{d} already has its (successful) result: the in-memory stores
    answer so, and four Deferred callback runs per console were a share of
    its set-up cost (issue 8).  The callbacks here never raise (each
    turns a failure into the session's input).  A store's Deferred that
    fired and is not paused has run whatever it held (C{d.callbacks},
    deprecated in Twisted 25.5, is not read: its warning cost 12 k
    instructions per console).
    """
    if d.called and not d.paused:
        result = d.result
        if not isinstance(result, Failure):
            callback(result)
            return
    d.addCallbacks(callback, errback)


class SetupPath:
    """
    The set-up of L{vaporproxy.ws.channel.ConsoleWebSocketProtocol} (a part
    of that class: it uses the console's attributes).
    """

    #: The VM, its chosen console and the host to dial, once located.
    _located: Any = None
    #: The located console is SPICE (its guard knows the channel's type).
    _spice = False

    # -- redeem, locate, check the host --------------------------------------

    def _redeem(self, output: ev.Redeem) -> None:
        d = self.factory.token_store.redeem(output.token, self._vm_ref, self._client_ip)
        _then(d, self._redeemed, self._setup_failed)

    def _redeemed(self, redemption: Any) -> None:
        self._answer(ev.Redeemed(redemption))

    def _locate(self, output: ev.Locate) -> None:
        self._redemption = redemption = output.redemption
        grant = redemption.grant
        self._console_type = grant.console_type
        d = self.factory.locator.locate(grant.vm_uuid)
        _then(d, self._vm_found, self._setup_failed)

    def _vm_found(self, vm: Any) -> None:
        self._answer(ev.VmFound(vm))

    def _check_host(self, output: ev.CheckHost) -> None:
        vm = output.vm
        grant = self._redemption.grant
        graphics = select_console(vm, grant.console_type, grant.display)
        host = dial_host(vm, graphics)
        self._located = (vm, graphics, host)
        d = self.factory.host_policy.resolve(host)
        _then(d, self._host_allowed, self._setup_failed)

    def _host_allowed(self, address: Any) -> None:
        vm, graphics, host = self._located
        try:
            # (Not kept: the session holds it until the dial.)
            target = console_target(vm, graphics, host, address, self.factory.locator)
        except Exception:
            self._setup_failed(Failure())
            return
        self._spice = spice = graphics.type != "vnc"
        self._answer(ev.Located(target, spice))

    def _answer(self, event: Any) -> None:
        """
        A store's answer, as the session's input: whatever fails while its
        outputs are carried out fails the set-up (one callback per store
        call, no errback of its own behind it).
        """
        try:
            self._input(event)
        except Exception:
            self._setup_failed(Failure())

    def _setup_failed(self, failure: Failure) -> None:
        if failure.check(ConsoleError):
            self._input(ev.SetupFailed(failure.value))
        elif failure.check(CancelledError):
            self._input(ev.SetupFailed(ConsoleError(ErrorCode.CONNECTION_FAILED), "setup cancelled"))
        else:
            log.failure("console {console_id} setup failed", failure, console_id=self.console_id)
            self._input(ev.SetupFailed(ConsoleError(ErrorCode.INTERNAL_ERROR), "internal error during setup"))

    # -- admission -----------------------------------------------------------

    def _acquire(self, output: ev.Acquire) -> None:
        grant = self._redemption.grant
        d = self.factory.limiter.acquire(output.vm_uuid, self.console_id, user=grant.user, client=self._client_ip)
        _then(d, self._admitted, self._setup_failed)

    def _admitted(self, lease: Any) -> None:
        self._answer(ev.Admitted(lease))

    def _unredeem(self, output: ev.Unredeem) -> None:
        """
        Refused for lack of a slot (4007): the token is not spent, the
        browser may retry until it expires (SPEC.md "Hostile clients"), with
        a store that can give a redemption back (C{unredeem}).
        """
        unredeem = getattr(self.factory.token_store, "unredeem", None)
        if unredeem is None:
            return
        d = unredeem(output.token)
        d.addErrback(self._log_store_error, "unredeem")

    def _register(self, _: Any) -> None:
        """Admitted: this WebSocket is a console of this process."""
        grant = self._redemption.grant
        record = self._record = ConsoleRecord(
            self.console_id, grant.vm_uuid, grant.console_type, grant.user, self._started_at, self
        )
        record.vm_name, record.mode, record.client = grant.vm_name, grant.mode, self._client_ip
        record.share_id = grant.share_id
        self.factory.registry.add(record)

    def _join(self, output: ev.JoinConsole) -> None:
        """SPICE: a later channel joins its console (or stands for it here)."""
        grant = self._redemption.grant
        session_id = self._redemption.spice_session_id
        record = None
        if output.here and session_id is not None:
            record = self.factory.registry.find_spice(grant.vm_uuid, session_id)
        if record is not None:
            record.join(self)
            self._record = record
            return
        # The main channel lives on another node: this channel stands for
        # the console here (without a lease: limits count consoles).
        record = self._record = ConsoleRecord(
            self.console_id, grant.vm_uuid, grant.console_type, grant.user, self._started_at, self
        )
        record.spice_session_id = session_id
        record.remote = True
        self.factory.registry.add(record)

    # -- the guard -----------------------------------------------------------

    def _start_guard(self, _: Any) -> None:
        """
        VNC (admitted): the guard greets the browser now, before the dial.
        SPICE (not yet admitted): the guard reads the link message first.
        """
        factory = self.factory
        vm, graphics, host = self._located
        self._located = None  # (read here last)
        if graphics.type == "vnc":
            vnc_tls = factory.vnc_tls.get(vm.hypervisor)
            if vnc_tls is None:
                self._guard = factory.vnc_guard(self, graphics.password)
            else:
                self._guard = factory.vnc_guard(self, graphics.password, tls=vnc_tls.for_host(host))
            self._guard_call("start")
            if self._guard is None:
                return  # it refused: the console ended (the 101 leaves with the close)
            # The 101 and the guard's greeting leave now, before the dial.
            self.uncork()
            self._feed_held()
            return
        redemption = self._redemption
        expected = None if redemption.first else redemption.spice_session_id
        planner = getattr(factory, "planner", None)
        hold = planner is not None and planner.holds_spice_input(redemption.grant)
        held = {"hold_after_ticket": True} if hold else {}
        self._guard = factory.spice_guard(self, graphics.password, expected, **held)
        self._guard_call("start")
        if self._guard is None:
            return  # it refused: the console ended
        self._feed_held()
        if self._guard is not None and self._connecting is None and self._backend is None:
            # The link message is needed before admission.
            self._resume_reading()

    def _pause_for_admission(self, _: Any) -> None:
        self._pause_reading()

    # -- the VM connection ---------------------------------------------------

    def _dial(self, output: ev.Dial) -> None:
        # The connection timer (connectionMade) ends the console at the
        # deadline, the dial included; the connector needs a timeout of its
        # own only without one (one timer fewer per console).
        timeout: Optional[int] = None
        if self._connect_timer is None:
            remaining = self._console.connection_timeout - (self._seconds() - self._started_at)
            timeout = max(1, int(remaining + 0.999))
        # The host policy's answer (an address literal, or a socket path);
        # plain or TLS as the SPICE channel the guard has read says.
        target = output.target
        tls = self.factory.spice_tls.get(target.hypervisor)
        channel = getattr(self._guard, "channel_type", None) if self._spice else None
        self._connecting = dial(self._reactor, target, self, timeout, tls, channel)

    def dial_failed(self, failure: Failure) -> None:
        self._connecting = None
        self._input(ev.BackendFailed(failure.type.__name__))

    def backend_connected(self, backend: BackendProtocol) -> None:
        self._connecting = None
        self._input(ev.BackendConnected(backend))

    def _use_backend(self, output: ev.UseBackend) -> None:
        backend = self._backend = output.backend
        self._backend_direct = direct_writer(backend.transport)
        high_water(backend.transport, self._console.buffer_size)
        if self._to_server is not None:
            backend.transport.writeSequence(self._to_server)
            self._to_server = None
        self._resume_reading()
        self._guard_call("server_connected")

    def _drop_backend(self, output: ev.DropBackend) -> None:
        """The VM answered after the console ended."""
        output.backend.transport.abortConnection()

    def backend_setup_data(self, data: bytes) -> None:
        self._guard_call("server_data", data)

    def backend_lost(self, backend: BackendProtocol, reason: Optional[Failure] = None) -> None:
        guard = self._guard
        if guard is not None and getattr(guard, "server_lost", None) is not None:
            # The RFB guard fails with why (e.g. the TLS handshake failed):
            # its failure, not the generic one, then ends the console.
            self._guard_call("server_lost", reason)
        self._input(BACKEND_LOST)
