"""
The protocol guard's side of a console WebSocket (L{IGuardSink}): what the
guard may ask while it handshakes (bytes to either side, VeNCrypt's TLS,
SPICE's admission and session), and its ending, C{established} (the
relay's stages are spliced in) or C{fail}.  The guard is the only stage of
the byte path until then.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from vaporproxy.console.registry import ConsoleRecord
from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.relay.flow import Flow
from vaporproxy.relay.pipeline import build
from vaporproxy.relay.fastwrite import direct_writer, send_now

__all__ = ["MAX_SPICE_CHANNELS", "GuardSink"]

log = Logger(namespace="vaporproxy.bridge")

#: The most WebSockets (channels, the main one included) one SPICE console
#: may have in this process: spice-html5 opens 4 (6 with sound), usbredir
#: adds more.  Later channels join without a lease, so without this cap one
#: token could open any number of VM connections while its console lives.
#: Channels of a console whose main channel is in another process are
#: capped the same way, per token and session, in this process.
MAX_SPICE_CHANNELS = 16

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
        if self._finished:
            return
        if not isBinary:
            self._end(ConsoleError(ErrorCode.BAD_REQUEST, "Console streams are binary"), "text message")
            return
        self.bytes_received += len(payload)
        self.last_activity = self._seconds()
        if self._guard is None:
            self._held.append(payload)
            self._held_size += len(payload)
            if self._held_size > self._console.buffer_size:
                self._end(
                    ConsoleError(ErrorCode.BAD_REQUEST, "Too much data before the console was ready"),
                    "setup buffer overflow",
                )
            return
        self._guard_call("client_data", payload)

    def _feed_held(self) -> None:
        held, self._held, self._held_size = self._held, [], 0
        for chunk in held:
            if self._finished:
                return
            self._guard_call("client_data", chunk)

    def _drop_guard(self) -> None:
        """
        Done with the guard: tell it (C{close}, when it has one) so that it
        stops its parsers, and forget it.
        """
        guard, self._guard = self._guard, None
        close = getattr(guard, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                log.failure("console {console_id}: guard close failed", console_id=self.console_id)

    def _guard_call(self, method: str, *args: Any) -> None:
        if self._finished or self._guard is None:
            return
        try:
            getattr(self._guard, method)(*args)
        except ConsoleError as e:
            self._forget_located()
            self._end(e, f"guard refused: {e.code.name}")
        except Exception:
            log.failure("console {console_id}: guard error", console_id=self.console_id)
            self._end(ConsoleError(ErrorCode.INTERNAL_ERROR), "guard error")

    def send_to_client(self, data: bytes) -> None:
        if self._finished or not data:
            return
        self.bytes_sent += len(data)
        copy = self._handshake_copy
        if copy is not None:
            copy.append(data)
        self._send_binary(data)

    def send_to_server(self, data: bytes) -> None:
        if self._finished or not data:
            return
        if self._backend is None:
            self._to_server.append(data)
        elif self._backend_direct is not None:
            send_now(self._backend_direct, (data,))
        else:
            self._backend.transport.write(data)

    def start_tls(self, creator: Any) -> None:
        """
        VeNCrypt: TLS on the VM connection from here on (the guard sends
        nothing more until the VM has spoken inside it).
        """
        if self._finished or self._backend is None:
            return
        # From now on every byte to the VM goes through the TLS layer.
        self._backend_direct = None
        self._backend.transport.startTLS(creator)

    def admit(self, is_main: bool) -> None:
        """
        SPICE: the link message was read; the main channel takes a lease,
        a later channel joins its console; then dial.
        """
        if self._finished or self._redemption is None:
            return
        if is_main != self._redemption.first:
            # The SPICE guard's code for a link that does not match the
            # token's use (a second main channel, a first use not main).
            self._end(ConsoleError(ErrorCode.TOKEN_ALREADY_USED), "spice channel does not match the token's use")
            return
        if self._redemption.grant.mode == "view" and getattr(self._guard, "channel_type", None) == SPICE_CHANNEL_INPUTS:
            self._end(
                ConsoleError(ErrorCode.UNAUTHORIZED, "A view-only console has no input channel"),
                "view-only console: inputs channel refused",
            )
            return
        self._pause_reading()
        if is_main:
            d = Deferred.fromCoroutine(self._admit_and_dial())
            d.addErrback(self._setup_failed)
        elif self._channel_cap_reached():
            self._end(
                ConsoleError(ErrorCode.MAX_CONNECTIONS_REACHED, "Too many channels for this console"),
                f"spice console already has {MAX_SPICE_CHANNELS} channels",
            )
        else:
            self._join()
            self._dial()

    def _channel_cap_reached(self) -> bool:
        """
        Whether the SPICE console this later channel would join already has
        L{MAX_SPICE_CHANNELS} channels in this process.
        """
        session_id = self._redemption.spice_session_id  # type: ignore[union-attr]
        if session_id is None:
            return False
        vm_uuid = self._redemption.grant.vm_uuid  # type: ignore[union-attr]
        return self.factory.registry.spice_channels(vm_uuid, session_id) >= MAX_SPICE_CHANNELS

    async def _admit_and_dial(self) -> None:
        if await self._admit_owner():
            self._dial()

    def _join(self) -> None:
        grant = self._redemption.grant  # type: ignore[union-attr]
        session_id = self._redemption.spice_session_id  # type: ignore[union-attr]
        record = None
        if session_id is not None:
            record = self.factory.registry.find_spice(grant.vm_uuid, session_id)
        if record is not None:
            record.join(self)
            self._record = record
        else:
            # The main channel lives on another node: this channel stands
            # for the console here (without a lease: limits count consoles).
            self._record = ConsoleRecord(
                self.console_id, grant.vm_uuid, grant.console_type, grant.user, self._started_at, self
            )
            self._record.spice_session_id = session_id
            self._record.remote = True
            self.factory.registry.add(self._record)

    def spice_session(self, session_id: int) -> None:
        if self._finished or self._record is None or self._token is None:
            return
        self._record.spice_session_id = session_id
        self._spice_attached = True
        d = self.factory.token_store.attach_spice_session(self._token, session_id)
        d.addErrback(self._log_store_error, "attach_spice_session")

    def established(self, client_rest: bytes = b"") -> None:
        """
        The guard's handshake is over: relay raw bytes with flow control,
        through the console's stages when it has any (then C{client_rest},
        what the browser sent that the guard held back, goes through them
        first).
        """
        if self._finished or self._backend is None:
            return
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
        if client_rest:
            self._relay_data(client_rest)
            if self._finished:
                return
        self._resume_reading()
        if self._record is not None and self._record.owner is self:
            idle = self._console.idle_timeout
            if idle > 0:
                self._idle_timer = self._reactor.callLater(idle, self._idle_check)
            if self._record.remote:
                return  # a channel of a console counted by another process
            try:
                self.factory.observer.console_opened(self._console_type or "unknown")
            except Exception:
                log.failure("observer.console_opened failed")
            self._audit_opened()

    def fail(self, error: ConsoleError, reason: str) -> None:
        self._forget_located()
        self._end(error, f"guard: {reason}")

    def _forget_located(self) -> None:
        """
        The VM did not answer as located (connection failed, or its console
        failed the guard's handshake): drop the locator's cached lookup of
        it (C{invalidate}, when the locator has one), so that the next
        console asks the hypervisor again.
        """
        if self._located_forgotten or self._redemption is None:
            return
        self._located_forgotten = True
        invalidate = getattr(self.factory.locator, "invalidate", None)
        if invalidate is None:
            return
        try:
            invalidate(self._redemption.grant.vm_uuid)
        except Exception:
            log.failure("console {console_id}: locator invalidate failed", console_id=self.console_id)
