"""
The protocol guard's side of a console WebSocket (L{IGuardSink}): what the
guard may ask while it handshakes (bytes to either side, VeNCrypt's TLS),
and what it reports, turned into the session's inputs (SPICE's admission,
C{established}, C{fail}, a refusal raised by a guard call); and the
session's C{SplicePipeline}: the relay's stages replace the guard, which
was the only stage of the byte path until then.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from vaporproxy.console import events as ev
from vaporproxy.console.events import GUARD_CRASHED, MAX_SPICE_CHANNELS, SETUP_OVERFLOW, TEXT_MESSAGE
from vaporproxy.errors import ConsoleError
from vaporproxy.relay.fastwrite import direct_writer, send_now
from vaporproxy.relay.flow import Flow
from vaporproxy.relay.pipeline import build

__all__ = ["MAX_SPICE_CHANNELS", "GuardSink"]

log = Logger(namespace="vaporproxy.bridge")

#: SPICE's inputs channel (keyboard, mouse): refused on view-only consoles.
SPICE_CHANNEL_INPUTS = 3


def _cancel(call: Any) -> None:
    if call is not None and call.active():
        call.cancel()


class GuardSink:
    """
    The guard's sink of L{vaporproxy.ws.channel.ConsoleWebSocketProtocol}
    (a part of that class: it uses the console's attributes).
    """

    _guard: Any = None

    def _setup_message(self, payload: bytes, isBinary: bool) -> None:
        """
        The browser's message before relaying: for the guard, or held until
        the guard exists (at most C{buffer_size}); dropped once the console
        ended (nothing holds it then).
        """
        if not isBinary:
            self._input(TEXT_MESSAGE)
            return
        if self._guard is not None:
            self.bytes_received += len(payload)
            self.last_activity = self._seconds()
            self._guard_call("client_data", payload)
            return
        held = self._held
        if held is None:
            return
        self.bytes_received += len(payload)
        self.last_activity = self._seconds()
        held.append(payload)
        self._held_size += len(payload)
        if self._held_size > self._console.buffer_size:
            self._input(SETUP_OVERFLOW)

    def _feed_held(self) -> None:
        held = self._held
        if not held:
            return  # nothing held (or the console ended: nothing is, any more)
        self._held, self._held_size = [], 0
        for chunk in held:
            if self._guard is None:
                return
            self._guard_call("client_data", chunk)

    def _drop_guard(self) -> None:
        """
        Done with the guard: tell it (C{close}, when it has one) so that it
        stops its parsers, and forget it.
        """
        guard = self._guard
        if guard is None:
            return
        self._guard = None
        close = getattr(guard, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                log.failure("console {console_id}: guard close failed", console_id=self.console_id)

    def _guard_call(self, method: str, *args: Any) -> None:
        guard = self._guard
        if guard is None:
            return
        try:
            getattr(guard, method)(*args)
        except ConsoleError as e:
            self._input(ev.GuardRefused(e))
        except Exception:
            log.failure("console {console_id}: guard error", console_id=self.console_id)
            self._input(GUARD_CRASHED)

    def send_to_client(self, data: bytes) -> None:
        if not data:
            return
        self.bytes_sent += len(data)
        copy = self._handshake_copy
        if copy is not None:
            copy.append(data)
        self._send_binary(data)

    def send_to_server(self, data: bytes) -> None:
        if not data:
            return
        if self._backend is None:
            held = self._to_server
            if held is None:
                held = self._to_server = []
            held.append(data)
        elif self._backend_direct is not None:
            send_now(self._backend_direct, (data,))
        else:
            self._backend.transport.write(data)

    def start_tls(self, creator: Any) -> None:
        """
        VeNCrypt: TLS on the VM connection from here on (the guard sends
        nothing more until the VM has spoken inside it).
        """
        if self._backend is None:
            return
        # From now on every byte to the VM goes through the TLS layer.
        self._backend_direct = None
        self._backend.transport.startTLS(creator)

    def admit(self, is_main: bool) -> None:
        """
        SPICE: the link message was read; the session decides (the main
        channel takes a lease, a later channel joins its console).
        """
        if is_main:
            self._answer(ev.GuardAdmit(True))
            return
        grant = self._redemption.grant
        session_id = self._redemption.spice_session_id
        registry = self.factory.registry
        channels = 0 if session_id is None else registry.spice_channels(grant.vm_uuid, session_id)
        here = session_id is not None and registry.find_spice(grant.vm_uuid, session_id) is not None
        inputs = getattr(self._guard, "channel_type", None) == SPICE_CHANNEL_INPUTS
        self._answer(ev.GuardAdmit(False, inputs, channels, here))

    def spice_session(self, session_id: int) -> None:
        if self._record is None or self._token is None:
            return
        self._record.spice_session_id = session_id
        self._spice_attached = True
        d = self.factory.token_store.attach_spice_session(self._token, session_id)
        d.addErrback(self._log_store_error, "attach_spice_session")

    def established(self, client_rest: bytes = b"") -> None:
        """The guard's handshake is over (the session splices the relay)."""
        self._input(ev.GuardEstablished(client_rest))

    def fail(self, error: ConsoleError, reason: str) -> None:
        self._input(ev.GuardFailed(error, reason))

    def _splice(self, output: ev.SplicePipeline) -> None:
        """
        Relay raw bytes with flow control, through the console's stages
        when it has any (then C{client_rest}, what the browser sent that the
        guard held back, goes through them first).
        """
        if self._spice:
            self._note_spice_channel(self._guard)
        self._drop_guard()
        _cancel(self._connect_timer)
        self._connect_timer = None
        ws_transport = self.transport
        backend_transport = self._backend.transport
        self._flow = Flow(ws_transport, backend_transport, self._console.buffer_size)
        # The guard was the only stage; now the console's own, if any.
        grant = self._redemption.grant if self._redemption is not None else None
        self._pipeline = build(list(self.factory.stages_for(grant, self._console)) + self._policy_stages(grant))
        self._backend_write = backend_transport.write
        self._ws_direct = direct_writer(ws_transport)
        self._backend_direct = direct_writer(backend_transport)
        self.relaying = True
        if output.client_rest:
            self._relay_data(output.client_rest)
        self._resume_reading()

    def _console_opened(self, _: Any) -> None:
        """Count the console as opened: metrics and the audit trail."""
        try:
            self.factory.observer.console_opened(self._console_type or "unknown")
        except Exception:
            log.failure("observer.console_opened failed")
        self._audit_opened()
