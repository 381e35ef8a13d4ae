"""
Console info: the checks and the token behind
C{GET /api/v1/virtualization/virtualmachines/{id}/console}.
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase
from typing import Any, Dict, Optional, Tuple
from urllib.parse import quote

from twisted.logger import Logger
from twisted.web.iweb import IRequest

from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.http.principal import Principal
from vaporproxy.http.stepup import check_step_up, policy_for
from vaporproxy.interfaces import CONSOLE_TYPES, Grant
from vaporproxy.logs import debug_enabled
from vaporproxy.stores.tokens import token_log_id
from vaporproxy.timestamps import iso_utc
from vaporproxy.vm.target import dial_host, select_console

VM_PATH = "/api/v1/virtualization/virtualmachines"
PASSWORD_MASK = "********"
_DISPLAY_RE = re.compile(r"^[0-9]{1,4}$")

log = Logger(namespace="vaporproxy.web.ConsoleAPI")


_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def check_id(vm_id: str) -> str:
    """
    C{vm_id}, when it has no control character (NUL, CR, LF...): such an
    id names no VM and must not reach libvirt or a log line.

    @raise ConsoleError: BAD_REQUEST otherwise.
    """
    if _CONTROL_RE.search(vm_id):
        raise ConsoleError(ErrorCode.BAD_REQUEST, "VM id holds a control character")
    return vm_id


def key_allows(key: Principal, *names: str) -> bool:
    """
    Whether one of C{key}'s VM patterns matches one of C{names}.  (C{*},
    every VM, matches any name without a look at the names.)
    """
    vms = key.vms
    if "*" in vms and any(names):
        return True
    return any(fnmatchcase(name, pattern) for pattern in vms for name in names if name)


def query_arg(request: IRequest, name: bytes) -> Optional[str]:
    """
    The one value of query parameter C{name}, or C{None}.

    @raise ConsoleError: BAD_REQUEST when given twice or not UTF-8.
    """
    values = request.args.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise ConsoleError(ErrorCode.BAD_REQUEST, f"Parameter {name.decode()} given more than once")
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise ConsoleError(ErrorCode.BAD_REQUEST, f"Parameter {name.decode()} is not UTF-8")


def console_mode(request: IRequest, key: Principal) -> str:
    """
    The console mode for C{key}: what C{?mode=} asks for, or the most the
    credential has; a view-only credential asking for control is refused.

    @raise ConsoleError: BAD_REQUEST for an unknown mode, UNAUTHORIZED (403)
        for more than the credential has.
    """
    asked = query_arg(request, b"mode")
    if asked is None:
        return key.access
    if asked not in ("view", "control"):
        raise ConsoleError(ErrorCode.BAD_REQUEST, "Parameter mode must be view or control")
    if asked == "control" and key.access != "control":
        raise ConsoleError(ErrorCode.UNAUTHORIZED, "This credential may only view consoles", http_status=403)
    return asked


def console_params(request: IRequest) -> Tuple[Optional[str], Optional[int]]:
    """
    The C{type} and C{display} query parameters, checked.
    """
    console_type = query_arg(request, b"type")
    if console_type is not None and console_type not in CONSOLE_TYPES:
        raise ConsoleError(ErrorCode.BAD_REQUEST, "Parameter type must be vnc or spice")
    display_text = query_arg(request, b"display")
    display: Optional[int] = None
    if display_text is not None:
        if not _DISPLAY_RE.match(display_text):
            raise ConsoleError(ErrorCode.BAD_REQUEST, "Parameter display must be a non-negative integer")
        display = int(display_text)
    return console_type, display


class ConsoleIssuer:
    """
    Locates the VM, checks the key and the console host, and issues a
    one-time token.
    """

    def __init__(self, *, token_store: Any, locator: Any, host_policy: Any, metrics: Any, mint: Any,
                 clock: Any, policies: Tuple[Any, ...] = (), audit: Any = None):  # fmt: skip
        self._mint = mint
        self._audit = audit
        self._clock = clock
        #: C{auth.policies} (step-up), replaced on reload.
        self.policies = policies
        self._token_store = token_store
        self._locator = locator
        self._host_policy = host_policy
        self._metrics = metrics

    async def _locate(self, key: Principal, vm_id: str) -> Any:
        try:
            vm = await self._locator.locate(vm_id)
        except ConsoleError as e:
            if e.code is ErrorCode.VM_NOT_FOUND and not key_allows(key, vm_id):
                # Do not tell a key which VMs exist outside its reach.
                raise ConsoleError(ErrorCode.UNAUTHORIZED, http_status=403)
            raise
        if not key_allows(key, vm.uuid, vm.name):
            log.info("user {user} denied console of {vm_uuid}", user=key.user, vm_uuid=vm.uuid)
            raise ConsoleError(ErrorCode.UNAUTHORIZED, http_status=403)
        if self.policies:  # (without any, no VM needs a step-up)
            self._check_step_up(key, vm)
        return vm

    def _check_step_up(self, key: Principal, vm: Any) -> None:
        """
        @raise ConsoleError: MFA_REQUIRED with RFC 9470's challenge when a
            step-up policy covers the VM and the caller's sign-in does not
            meet it.
        """
        refusal = check_step_up(
            policy_for(self.policies, vm.name, vm.uuid),
            method=key.method,
            amr=key.amr,
            auth_time=key.auth_time,
            now=self._clock.seconds(),
        )
        if refusal is not None:
            log.info("user {user} needs a step-up sign-in for {vm_uuid}", user=key.user, vm_uuid=vm.uuid)
            error = ConsoleError(ErrorCode.MFA_REQUIRED, refusal.description)
            error.challenge = refusal.challenge()
            raise error

    async def answer(self, request: IRequest, key: Principal, vm_id: str, client: str, console: Any) -> Dict[str, Any]:
        """
        The console-info body of C{request} by C{key} from the address
        C{client}: its C{?type}, C{?display} and C{?mode}, the token bound
        to C{client} when C{console.bind_client_ip} (C{console}: the
        C{console} config section).
        """
        console_type, display = console_params(request)
        mode = console_mode(request, key)
        client_ip = client if console.bind_client_ip else None
        return await self.issue(key, vm_id, console_type, display, client_ip, console.enable_tls, client=client,
                                mode=mode)  # fmt: skip

    async def issue(self, key: Principal, vm_id: str, console_type: Optional[str], display: Optional[int],
                    client_ip: Optional[str], tls_enabled: bool, client: str = "",
                    mode: str = "control") -> Dict[str, Any]:  # fmt: skip
        """
        The console-info body for C{key} and C{vm_id}, with a fresh token.

        @param client_ip: the address the token is bound to, or C{None}.
        @param client: the caller's address (for the audit trail).
        """
        self._mint.take(key.key_id)
        vm = await self._locate(key, vm_id)
        graphics = select_console(vm, console_type, display)
        try:
            address = await self._host_policy.resolve(dial_host(vm, graphics))
        except ConsoleError as e:
            if e.code is ErrorCode.UNAUTHORIZED:
                log.warn("console host of {vm_uuid} is not in allowed_hosts", vm_uuid=vm.uuid)
                raise ConsoleError(ErrorCode.UNAUTHORIZED, e.message, http_status=403)
            raise
        grant = Grant(vm_ref=vm_id, vm_uuid=vm.uuid, console_type=graphics.type, display=graphics.index,
                      user=key.user, client_ip=client_ip, key_id=key.key_id, vm_name=vm.name,
                      mode=mode)  # fmt: skip
        issued = await self._mint.issue(self._token_store, grant)
        self._metrics.token_issued()
        expires_at = iso_utc(issued.expires_at)
        if self._audit is not None:
            self._audit.token_issued(user=key.user, vm_uuid=vm.uuid, vm_name=vm.name, client=client,
                                     console_type=graphics.type, mode=mode, expires_at=expires_at,
                                     via="jwt" if key.method == "jwt" else "key")  # fmt: skip
        # Debug: a console's info line is the bridge's "console ... closed"
        # (VM, user, token hash, client, outcome); the request itself is in
        # the access log.
        if debug_enabled():
            log.debug("issued {console_type} console token {token_hash} for {vm_uuid} to {user}",
                      console_type=graphics.type, token_hash=token_log_id(issued.token), vm_uuid=vm.uuid,
                      user=key.user)  # fmt: skip
        return {
            "type": graphics.type,
            "host": address,
            "port": graphics.port,
            "token": issued.token,
            "ws_path": f"{VM_PATH}/{quote(vm_id, safe='')}/console/ws",
            "expires_at": expires_at,
            "tls_enabled": tls_enabled,
            "password": PASSWORD_MASK if graphics.has_password else None,
            "mode": mode,
        }
