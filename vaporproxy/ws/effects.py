"""
The executor of a console's state machine (L{vaporproxy.console.session}):
L{Effects._input} hands an input to the console's session and carries out
the outputs it answers, in order, each by one method of the channel.

The outputs of one input are meant for the state that input produced: when
carrying one out ends the console (a nested input, e.g. the guard failing
as it starts), the rest of them are moot and are dropped.

The ending outputs live here (stop everything, give the lease back, record
the one outcome, close the browser's side); the set-up's are in
L{vaporproxy.ws.setup_path}, the relay's splice in L{vaporproxy.ws.guard_sink}.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

from twisted.logger import Logger

from vaporproxy.console import events as ev
from vaporproxy.console.outcome import build_outcome, record_outcome
from vaporproxy.console.registry import ConsoleRecord
from vaporproxy.errors import ConsoleError
from vaporproxy.ws.autobahn_compat import STATE_CONNECTING, STATE_OPEN

__all__ = ["Effects"]

log = Logger(namespace="vaporproxy.bridge")

#: Each output's method on the channel.
EFFECTS: Dict[type, str] = {
    ev.Redeem: "_redeem",
    ev.Locate: "_locate",
    ev.CheckHost: "_check_host",
    ev.Acquire: "_acquire",
    ev.Unredeem: "_unredeem",
    ev.Register: "_register",
    ev.StartGuard: "_start_guard",
    ev.PauseReading: "_pause_for_admission",
    ev.JoinConsole: "_join",
    ev.Dial: "_dial",
    ev.UseBackend: "_use_backend",
    ev.DropBackend: "_drop_backend",
    ev.SplicePipeline: "_splice",
    ev.StartIdleTimer: "_start_idle_timer",
    ev.ConsoleOpened: "_console_opened",
    ev.ForgetLocated: "_forget_located",
    ev.StopIO: "_stop_io",
    ev.ReleaseLease: "_release_lease",
    ev.RecordOutcome: "_end_console",
    ev.LeaveConsole: "_leave_console",
    ev.CloseClient: "_close_client",
}


def _cancel(call: Any) -> None:
    if call is not None and call.active():
        call.cancel()


class Effects:
    """
    The executor part of L{vaporproxy.ws.channel.ConsoleWebSocketProtocol}
    (a part of that class: it uses the console's attributes).
    """

    _session: Any = None
    #: Each output's method (a function of the class), by the output's type.
    _effects: Dict[type, Callable[[Any, Any], None]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._effects = {kind: getattr(cls, name) for kind, name in EFFECTS.items() if hasattr(cls, name)}

    def _input(self, event: Any) -> None:
        """Hand C{event} to the session; carry out what it answers."""
        session = self._session
        outputs = session.handle(event)
        if not outputs:
            return
        live = session.live
        effects = self._effects
        for output in outputs:
            effects[type(output)](self, output)
            if live and not session.live:
                return  # a nested input ended the console: the rest is moot

    # -- the ending ----------------------------------------------------------

    def _stop_io(self, _: Any) -> None:
        """
        Stop the timers, the guard, the dial, the relay and the backend;
        from now on the browser's bytes reach nobody.
        """
        self.relaying = False
        self._held = None
        _cancel(self._connect_timer)
        _cancel(self._idle_timer)
        self._connect_timer = self._idle_timer = None
        self._drop_guard()
        if self._connecting is not None:
            connecting, self._connecting = self._connecting, None
            try:
                connecting.stopConnecting()
            except Exception:
                pass  # connected or failed meanwhile
        if self._flow is not None:
            flow, self._flow = self._flow, None
            flow.stop()
        self._stop_stages()
        if self._pipeline is not None:
            pipeline, self._pipeline = self._pipeline, None
            pipeline.close()
        backend, self._backend = self._backend, None
        self._backend_direct = None
        if backend is not None:
            backend.transport.loseConnection()

    def _release_lease(self, output: ev.ReleaseLease) -> None:
        try:
            output.lease.release()
        except Exception:
            log.failure("console {console_id}: lease release failed", console_id=self.console_id)

    def _end_console(self, output: ev.RecordOutcome) -> None:
        """
        This WebSocket owns its console: unregister it, detach the SPICE
        session, record the one outcome, finish the recording, and end the
        channels that joined it.
        """
        error, reason = output.error, output.reason
        now = self._seconds() if self._started_at else 0.0
        record = self._record
        others: List[Any] = []
        sent, received = self.bytes_sent, self.bytes_received
        if record is not None:
            self.factory.registry.remove(record)
            others = [c for c in record.channels if c is not self]
            sent, received = record.bytes_sent, record.bytes_received
        if self._spice_attached and self._token is not None:
            self._spice_attached = False
            d = self.factory.token_store.detach_spice_session(self._token)
            d.addErrback(self._log_store_error, "detach_spice_session")
        self._record_outcome(error, reason, sent, received, now)
        self._finish_recording(record, error, sent)
        self._record = None
        for other in others:
            other.owner_ended(error, reason, output.code)

    def _leave_console(self, _: Any) -> None:
        """A joined SPICE channel ended: its bytes stay in its console's totals."""
        record, self._record = self._record, None
        if record is not None:
            record.leave(self)

    def _close_client(self, output: ev.CloseClient) -> None:
        """
        Tell the browser (the error as JSON then its 4000+n code, or the
        plain close code), or drop a WebSocket that never opened.
        """
        error, close_code = output.error, output.code
        if self.state == STATE_OPEN:
            if error is not None:
                self.sendMessage(error.to_json().encode("utf-8"), isBinary=False)
                self.sendClose(error.code.close_code, error.code.name)
            elif close_code is not None:
                # sendClose() refuses 1001 (an application may not "go
                # away"); the proxy shutting down is exactly that.  The
                # reason is log-only: the client gets the code alone.
                self.sendCloseFrame(code=close_code, isReply=False)
        elif self.state == STATE_CONNECTING and not self._in_on_connect and self.transport is not None:
            self.dropConnection(abort=True)
        self._resume_reading()

    def _record_outcome(
        self, error: Optional[ConsoleError], reason: str, sent: int, received: int, now: float
    ) -> None:
        grant = self._redemption.grant if self._redemption is not None else None
        outcome = build_outcome(self.console_id, grant, error, reason, sent, received, self._started_at, now)
        record: Optional[ConsoleRecord] = self._record
        counted_here = not (record is not None and record.remote)
        record_outcome(
            outcome,
            self.factory.observer,
            vm_ref=self._vm_ref,
            token=self._token,
            client_ip=self._client_ip,
            counted_here=counted_here,
        )
        if counted_here:
            self._audit_closed(outcome, sent, received)

    def _forget_located(self, _: Any) -> None:
        """
        The VM did not answer as located (connection failed, or its console
        failed the guard's handshake): drop the locator's cached lookup of
        it (C{invalidate}, when the locator has one), so that the next
        console asks the hypervisor again.
        """
        if self._redemption is None:
            return
        invalidate = getattr(self.factory.locator, "invalidate", None)
        if invalidate is None:
            return
        try:
            invalidate(self._redemption.grant.vm_uuid)
        except Exception:
            log.failure("console {console_id}: locator invalidate failed", console_id=self.console_id)

    # -- timers --------------------------------------------------------------

    def _start_idle_timer(self, output: ev.StartIdleTimer) -> None:
        self._idle_timer = self.factory.timers.callLater(output.delay, self._idle_fired)

    def _idle_fired(self) -> None:
        """The idle timer fired: how long has the console been silent?"""
        self._idle_timer = None
        last = self._record.last_activity if self._record is not None else self.last_activity
        self._input(ev.TimerFired("idle", self._seconds() - last))

    def _connection_timed_out(self) -> None:
        self._connect_timer = None
        self._input(CONNECT_TIMEOUT)


CONNECT_TIMEOUT = ev.TimerFired("connect")
