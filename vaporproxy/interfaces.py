"""
The contracts between vaporproxy's pieces: value types and zope interfaces.

Every external system (token storage, libvirt, admission limits) sits
behind one of these interfaces, with an in-memory implementation, so the
bridge and the HTTP API never know whether Redis or libvirt is real.

All methods that may wait return a L{Deferred}.  Failures that a client may
see are L{vaporproxy.errors.ConsoleError}s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Tuple

from twisted.internet.defer import Deferred  # noqa: F401 (named in the annotations)
from zope.interface import Attribute, Interface

# ---------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------

CONSOLE_TYPES = ("vnc", "spice")


@dataclass(frozen=True)
class Graphics:
    """
    One graphics device of a domain, as parsed from its XML.

    @ivar type: C{"vnc"} or C{"spice"}.
    @ivar index: position among the domain's graphics devices of the same
        type (0, 1, ...): the C{?display=N} of the API.
    @ivar port: the plain-text port, or C{None} when there is none or it is
        not assigned yet (autoport on a stopped domain, C{-1}).
    @ivar tls_port: SPICE C{tlsPort}, or C{None}.
    @ivar listen: the listen address (attribute or C{<listen>} child), or
        C{None} when none is given.
    @ivar password: the C{passwd} attribute, or C{None}.  Only present when
        the XML was fetched with C{VIR_DOMAIN_XML_SECURE}.
    @ivar autoport: whether C{autoport='yes'}.
    @ivar listen_type: C{"address"} (TCP; also libvirt's C{network}),
        C{"socket"} (a UNIX socket, see C{socket}) or C{"none"} (no
        listener: only libvirt can hand out a connection).
    @ivar socket: the UNIX socket path of a C{socket} listener, or C{None}
        (not known yet, or not a socket listener).
    @ivar default_mode: SPICE C{defaultMode}: C{"any"}, C{"secure"} (TLS)
        or C{"insecure"} (plain).
    @ivar channel_modes: SPICE C{<channel name= mode=>} pairs, in order.
    @ivar password_valid_to: POSIX time of C{passwdValidTo} (UTC), or
        C{None} when the password does not expire.
    @ivar device: position among all the domain's C{<graphics>} elements
        (libvirt's C{idx} of C{virDomainOpenGraphicsFD}).
    """

    type: str
    index: int
    port: Optional[int]
    tls_port: Optional[int] = None
    listen: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)
    autoport: bool = False
    listen_type: str = "address"
    socket: Optional[str] = None
    default_mode: str = "any"
    channel_modes: Tuple[Tuple[str, str], ...] = ()
    password_valid_to: Optional[float] = None
    device: int = 0

    @property
    def has_password(self) -> bool:
        return self.password is not None and self.password != ""


@dataclass(frozen=True)
class VMConsoles:
    """
    What a locator knows of one domain.

    @ivar uuid: the domain UUID (canonical lower-case string).
    @ivar name: the domain name.
    @ivar running: whether the domain is active (a console can be dialled).
    @ivar graphics: every graphics device, in document order.
    @ivar hypervisor: the hypervisor URI the domain was found on.
    @ivar console_host: the configured address to dial for consoles that
        listen on a wildcard address (0.0.0.0 / ::), or C{None}.
    @ivar local: whether the proxy runs on the VM's host (its UNIX-socket
        consoles can be dialled).
    @ivar spice_tls: whether the hypervisor has C{spice_tls} settings (its
        TLS-only SPICE consoles can be dialled).
    @ivar open_graphics: whether every console of the hypervisor is opened
        through libvirt (C{virDomainOpenGraphicsFD}), listener or not.
    """

    uuid: str
    name: str
    running: bool
    graphics: Tuple[Graphics, ...]
    hypervisor: str = ""
    console_host: Optional[str] = None
    local: bool = False
    spice_tls: bool = False
    open_graphics: bool = False


#: The C{Grant.key_id} of a token minted through a share link: this prefix,
#: then the share's id.
SHARE_KEY_PREFIX = "share:"


@dataclass(frozen=True)
class Grant:
    """
    What a token grants: one console of one VM to one user.

    @ivar vm_ref: the id the client used in the URL (UUID or name).
    @ivar vm_uuid: the domain UUID.
    @ivar console_type: C{"vnc"} or C{"spice"}.
    @ivar display: index among the graphics devices of that type.
    @ivar user: the user the token was issued to.
    @ivar client_ip: the client address the token is bound to, or C{None}
        (C{console.bind_client_ip} off).
    @ivar issued_at: POSIX time of issue (from the injected clock).
    @ivar expires_at: POSIX time of expiry.
    @ivar key_id: the identity of the credential that asked for it
        (L{vaporproxy.http.principal.key_id_of}): per-credential token limits,
        and revocation when a SIGHUP removes or narrows that credential.
    @ivar vm_name: the domain name (the key's patterns may name it).
    @ivar mode: C{"control"} or C{"view"}: what the console lets the
        browser do (the proxy enforces it; SPEC.md "Access modes").
    """

    vm_ref: str
    vm_uuid: str
    console_type: str
    display: int
    user: str
    client_ip: Optional[str] = None
    issued_at: float = 0.0
    expires_at: float = 0.0
    key_id: Optional[str] = None
    vm_name: Optional[str] = None
    #: "control" or "view" (view-only: the relay drops the browser's input).
    mode: str = "control"

    def matches_vm(self, vm_ref: str) -> bool:
        return vm_ref in (self.vm_ref, self.vm_uuid)

    @property
    def share_id(self) -> Optional[str]:
        """The share link that minted this token (its C{key_id} is C{share:<id>}), if any."""
        key_id = self.key_id
        if key_id is not None and key_id.startswith(SHARE_KEY_PREFIX):
            return key_id[len(SHARE_KEY_PREFIX) :]
        return None


@dataclass(frozen=True)
class IssuedToken:
    """
    A freshly issued token.  C{token} is the only copy of the secret: the
    store keeps only its SHA-256.
    """

    token: str
    grant: Grant

    @property
    def expires_at(self) -> float:
        return self.grant.expires_at


@dataclass(frozen=True)
class Redemption:
    """
    The result of presenting a token on a WebSocket.

    @ivar grant: what the token grants.
    @ivar first: C{True} for the one presentation that consumed the token.
    @ivar spice_session_id: for a token that was already consumed by the
        main channel of a live SPICE console whose session id is known: that
        session id.  The bridge admits such a WebSocket only if its SPICE
        link message carries this id (DESIGN.md rule 7).  C{None} otherwise.
    """

    grant: Grant
    first: bool
    spice_session_id: Optional[int] = None


@dataclass(frozen=True)
class Outcome:
    """
    The one outcome recorded for a console when it ends.

    @ivar error: the L{ErrorCode} name that ended it, or C{None} for a
        normal close.
    @ivar reason: a short, log-safe description (e.g. "client closed",
        "backend closed", "idle timeout").
    """

    console_id: str
    vm_uuid: Optional[str]
    console_type: Optional[str]
    user: Optional[str]
    bytes_sent: int  # proxy -> browser
    bytes_received: int  # browser -> proxy
    started_at: float
    duration_s: float
    error: Optional[str]
    reason: str


# ---------------------------------------------------------------------------
# Interfaces
# ---------------------------------------------------------------------------


class ITokenStore(Interface):
    """
    Issues and redeems one-time console tokens.

    Tokens are 256-bit values from L{secrets}, written as 64 lower-case hex
    characters.  Only their SHA-256 is stored.  Expiry comes from the
    store's injected clock and its C{token_ttl}.
    """

    def issue(grant: Grant) -> "Deferred[IssuedToken]":
        """
        Mint a token for C{grant}.  The store fills in C{issued_at} and
        C{expires_at} (the given values are ignored).
        """

    def redeem(token: str, vm_ref: str, client_ip: Optional[str]) -> "Deferred[Redemption]":
        """
        Present C{token} for the VM named C{vm_ref} from C{client_ip}.

        Atomic: of many racing presentations of a fresh token exactly one
        gets C{Redemption(first=True)}.  Fails with C{ConsoleError} of
        INVALID_TOKEN (malformed, never issued, other VM, other client
        address), TOKEN_EXPIRED or TOKEN_ALREADY_USED.  A consumed token
        with a live SPICE session attached (see L{attach_spice_session})
        does not fail: it gives C{Redemption(first=False,
        spice_session_id=...)}.  Store unreachable: SERVICE_UNAVAILABLE.
        """

    def attach_spice_session(token: str, session_id: int) -> "Deferred[None]":
        """
        Record that the console opened with C{token} (its main channel) was
        given SPICE session C{session_id} by the VM.  The record lives until
        L{detach_spice_session}, even past the token's expiry.
        """

    def detach_spice_session(token: str) -> "Deferred[None]":
        """
        The SPICE console opened with C{token} has ended: no further
        channel may join it.  Idempotent.
        """

    def count() -> "Deferred[int]":
        """
        The number of outstanding tokens (issued, not yet used, not expired).
        """

    def purge() -> "Deferred[int]":
        """
        Remove expired tokens (used or not); answer how many were removed.
        Used tokens are kept until their expiry so that replays say
        TOKEN_ALREADY_USED.
        """

    def check() -> "Deferred[None]":
        """
        Succeed if the store is usable (for /readyz); fail otherwise.
        """


class ILease(Interface):
    """
    One admitted console's slot.
    """

    console_id = Attribute("The console id the lease was acquired for.")
    vm_uuid = Attribute("The VM the lease counts against.")

    def release() -> None:
        """
        Give the slot back.  Idempotent: only the first call has effect.
        """


class ILimiter(Interface):
    """
    Per-VM and total admission of consoles.
    """

    def acquire(vm_uuid: str, console_id: str, user: Optional[str] = None, client: Optional[str] = None) -> "Deferred[ILease]":
        """
        Admit one console of C{vm_uuid} (of C{user}, from client address
        C{client}) or fail with C{ConsoleError(MAX_CONNECTIONS_REACHED)}.
        """

    def set_limits(max_per_vm: int, max_total: int, max_per_user: Optional[int] = None,
                   max_per_client: Optional[int] = None) -> None:
        """
        Change the limits (SIGHUP reload).  Live leases are kept; a
        per-user or per-client cap of C{None} is kept as it was (0:
        unlimited).
        """

    def stats() -> "Deferred[Mapping]":
        """
        C{{"total_connections": int, "connections_per_vm": {uuid: int}}}.
        """


class IConsoleLocator(Interface):
    """
    Finds a VM's graphics consoles.
    """

    def locate(vm_ref: str) -> "Deferred[VMConsoles]":
        """
        Look up C{vm_ref} (a UUID or a name) on the configured hypervisors,
        in order.  Fails with C{ConsoleError(VM_NOT_FOUND)} when no
        hypervisor knows it, or C{ConsoleError(INTERNAL_ERROR)} (client-safe
        message, detail only in the log) when a hypervisor cannot be
        reached.
        """

    def check() -> "Deferred[Mapping[str, str]]":
        """
        For /readyz: C{{uri: "ok" | short error}} for every hypervisor.
        """


class IOutcomeObserver(Interface):
    """
    Told about console lifecycle events (metrics, logging).
    """

    def console_opened(console_type: str) -> None:
        """A console started relaying."""

    def console_closed(outcome: Outcome) -> None:
        """A console ended; called exactly once per console."""

    def token_issued() -> None:
        """A token was issued."""

    def view_only_opened() -> None:
        """A view-only console started relaying (once per console)."""

    def recording_started() -> None:
        """A console's recording began."""


class IProtocolGuard(Interface):
    """
    A sans-IO guard for one console WebSocket: it performs the security
    handshake with the VM on the browser's behalf (L{vaporproxy.guards.rfb.RFBGuard},
    L{vaporproxy.guards.spice.SpiceGuard}).  Each input returns the typed
    outputs it produced (L{vaporproxy.guards.kit}); a guard made with an
    L{IGuardSink} also delivers each one to it.  Once it hands out
    C{Established} (the sink's C{established()}) the bridge relays raw bytes
    and never calls the guard again.
    """

    def start() -> None:
        """The WebSocket is open and the token redeemed."""

    def client_data(data: bytes) -> None:
        """Bytes from the browser, in order, in any fragmentation."""

    def server_connected() -> None:
        """The TCP connection to the VM is up."""

    def server_data(data: bytes) -> None:
        """Bytes from the VM (plaintext after C{sink.start_tls})."""

    def server_lost(reason: Any) -> None:
        """
        Optional: the VM connection closed during the handshake (a
        L{Failure}); lets the guard log why (e.g. a TLS verification error).
        """

    def close() -> None:
        """
        Optional: the bridge is done with the guard (the handshake is over
        or failed, or the console ended) and will not call it again; the
        guard lets go of what it holds (its parsers refer back to it).
        """


class IGuardSink(Interface):
    """
    What a guard may ask of the bridge: one method per typed output
    (L{vaporproxy.guards.kit.SINK_METHODS}).
    """

    def send_to_client(data: bytes) -> None:
        """Write bytes to the browser."""

    def send_to_server(data: bytes) -> None:
        """Write bytes to the VM."""

    def admit(is_main: bool) -> None:
        """
        SPICE: the browser's link message was read and is acceptable; the
        bridge takes a slot (main channel only) and dials the VM.  For VNC
        the bridge dials right after C{start()}.
        """

    def spice_session(session_id: int) -> None:
        """SPICE main channel: the VM assigned this session id."""

    def start_tls(creator: Any) -> None:
        """
        VNC VeNCrypt: start TLS towards the VM on the same connection with
        this L{IOpenSSLClientConnectionCreator}.
        """

    def established() -> None:
        """The handshake is over; everything received has been forwarded."""

    def fail(error: Any, reason: str) -> None:
        """End the console with this L{ConsoleError}; C{reason} is log-only."""


class IRelayStage(Interface):
    """
    One stage of a relaying console's byte path (L{vaporproxy.relay.pipeline}).

    While the handshake runs, the protocol guard is the only stage; once it
    is C{established}, the console's stages (C{stages_for(grant, policy)})
    are spliced in, in order, browser to VM for C{to_vm} and VM to browser
    for C{to_browser}.  With no stage the bytes go straight, at no cost.

    A stage sees the bytes of one direction as they come (message payloads
    towards the VM, socket reads towards the browser) and answers the bytes
    that go on: the same (pass), other bytes, C{b""} (drop, or hold for a
    later call), and it may keep a copy.  It never holds more than
    C{buffer_size} bytes: it drops, or fails the console, rather than grow.
    It does no I/O of its own and never blocks.
    """

    def to_vm(data: bytes) -> bytes:
        """Bytes from the browser towards the VM; answer what goes on."""

    def to_browser(data: bytes) -> bytes:
        """Bytes from the VM towards the browser; answer what goes on."""

    def close() -> None:
        """The console ended: let go of what is held (nothing more comes)."""
