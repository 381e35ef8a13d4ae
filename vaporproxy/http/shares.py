"""
Share links (SPEC.md "Share links"): a person who may control a VM's
console (or an admin) makes a link that lets whoever holds it open that
console, in a mode no greater than the creator's, up to C{max_uses} times
until it expires or is revoked.

- C{POST …/{id}/console/shares} C{{"mode", "ttl", "max_uses"}} (defaults
  view, 15m, 1) → 201 C{{share_id, url, expires_at, mode, max_uses}}; the
  URL is the bundled page with the secret in its fragment.
- C{GET …/{id}/console/shares}: the VM's live shares (an admin sees all, a
  creator its own), never a secret.
- C{DELETE …/{id}/console/shares/{share_id}}: revoke, closing the consoles
  opened through it (4010).
- Console info with C{Authorization: Share SECRET} spends one use.

The share store (memory or Redis) keeps only the secret's SHA-256.
"""

from __future__ import annotations

import json
from fnmatch import fnmatchcase
from typing import Any, Dict, Optional
from urllib.parse import quote

from twisted.logger import Logger
from twisted.web.iweb import IRequest

from vaporproxy.config import parse_duration
from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.http.principal import Principal
from vaporproxy.http.console_info import key_allows
from vaporproxy.interfaces import SHARE_KEY_PREFIX
from vaporproxy.timestamps import iso_utc

__all__ = ["SHARE_SCHEME", "ShareRoutes", "creator_allows", "share_secret"]

log = Logger(namespace="vaporproxy.web.ConsoleAPI")

SHARE_SCHEME = b"share "
#: The longest a share may live, and the most uses it may have.
MAX_TTL = 7 * 86400.0
MAX_USES = 10000


def share_secret(header: Optional[bytes]) -> Optional[str]:
    """The secret of an C{Authorization: Share …} header, or C{None}."""
    if header is None or header[:6].lower() != SHARE_SCHEME:
        return None
    return header[6:].strip().decode("ascii", "replace")


def _body(request: IRequest) -> Dict[str, Any]:
    raw = request.content.read() if request.content is not None else b""
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise ConsoleError(ErrorCode.BAD_REQUEST, "The body is not JSON")
    if not isinstance(body, dict) or set(body) - {"mode", "ttl", "max_uses"}:
        raise ConsoleError(ErrorCode.BAD_REQUEST, "The body takes mode, ttl and max_uses only")
    return body


def creator_allows(auth: Any, user: str, vm: Any) -> bool:
    """
    Whether C{user} may still control C{vm} under the running C{auth}
    config: one of its API keys allows the VM in control mode (or is an
    admin's), or JWTs are accepted (a JWT user's VMs are its token's claims).
    """
    if auth.jwt is not None:
        return True
    return any(
        key.user == user
        and (key.admin or (key.access == "control" and any(
            fnmatchcase(name, p) for p in key.vms for name in (vm.uuid, vm.name) if name)))
        for key in auth.api_keys
    )  # fmt: skip


class ShareRoutes:
    """
    @param shares: the share store.
    @param locator: finds the VM of an id.
    @param terminate_share: closes the consoles opened through a share;
        answers how many.
    @param audit: the audit trail, or C{None}.
    """

    def __init__(self, shares: Any, locator: Any, terminate_share: Any, audit: Any = None,
                 creator_allows: Any = None):  # fmt: skip
        """
        @param creator_allows: C{(user, vm) -> bool}: whether the share's
            creator still may control the VM (a key removed or narrowed on
            SIGHUP takes its shares with it).
        """
        self._creator_allows = creator_allows
        self._shares = shares
        self._locator = locator
        self._terminate_share = terminate_share
        self._audit = audit

    async def _vm(self, key: Principal, vm_id: str) -> Any:
        vm = await self._locator.locate(vm_id)
        if not (key.admin or key_allows(key, vm.uuid, vm.name)):
            raise ConsoleError(ErrorCode.UNAUTHORIZED, http_status=403)
        return vm

    async def create(self, request: IRequest, key: Principal, vm_id: str) -> Dict[str, Any]:
        vm = await self._vm(key, vm_id)
        if key.access != "control" and not key.admin:
            raise ConsoleError(ErrorCode.UNAUTHORIZED, "A view-only credential cannot share consoles", http_status=403)
        body = _body(request)
        mode = body.get("mode", "view")
        if mode not in ("view", "control"):
            raise ConsoleError(ErrorCode.BAD_REQUEST, "mode must be view or control")
        try:
            ttl = parse_duration("ttl", body.get("ttl", "15m"))
        except ValueError as e:
            raise ConsoleError(ErrorCode.BAD_REQUEST, str(e))
        max_uses = body.get("max_uses", 1)
        if not isinstance(max_uses, int) or isinstance(max_uses, bool) or not 1 <= max_uses <= MAX_USES:
            raise ConsoleError(ErrorCode.BAD_REQUEST, f"max_uses must be a whole number from 1 to {MAX_USES}")
        if ttl > MAX_TTL:
            raise ConsoleError(ErrorCode.BAD_REQUEST, "ttl must be at most 7d")
        secret, share = await self._shares.create(
            vm_uuid=vm.uuid, vm_name=vm.name, mode=mode, creator=key.user, ttl=ttl, max_uses=max_uses
        )
        log.info("{user} shared the console of {vm_uuid} ({mode}, {uses} uses): share {share_id}",
                 user=key.user, vm_uuid=vm.uuid, mode=mode, uses=max_uses, share_id=share.share_id)  # fmt: skip
        if self._audit is not None:
            self._audit.share_created(share_id=share.share_id, by=key.user, vm_uuid=vm.uuid, vm_name=vm.name,
                                      mode=mode, max_uses=max_uses, expires_at=iso_utc(share.expires_at))  # fmt: skip
        request.setResponseCode(201)
        return {
            "share_id": share.share_id,
            "url": f"/console/{quote(vm_id, safe='')}#share={secret}",
            "expires_at": iso_utc(share.expires_at),
            "mode": mode,
            "max_uses": max_uses,
        }

    async def list(self, key: Principal, vm_id: str) -> Dict[str, Any]:
        vm = await self._vm(key, vm_id)
        shares = await self._shares.list(vm.uuid)
        mine = [s for s in shares if key.admin or s.creator == key.user]
        return {"shares": [s.public(iso_utc) for s in mine]}

    async def revoke(self, key: Principal, vm_id: str, share_id: str) -> Dict[str, Any]:
        vm = await self._vm(key, vm_id)
        share = await self._shares.get(share_id)
        if share is None or share.vm_uuid != vm.uuid:
            raise ConsoleError(ErrorCode.NOT_FOUND, "No such share")
        if not (key.admin or share.creator == key.user):
            raise ConsoleError(ErrorCode.UNAUTHORIZED, http_status=403)
        await self._shares.revoke(share_id)
        closed = self._terminate_share(share_id)
        log.info("{user} revoked share {share_id} of {vm_uuid}; {closed} console(s) closed",
                 user=key.user, share_id=share_id, vm_uuid=vm.uuid, closed=closed)  # fmt: skip
        if self._audit is not None:
            self._audit.share_revoked(share_id=share_id, by=key.user, vm_uuid=vm.uuid, consoles_closed=closed)
        return {"revoked": share_id, "consoles_closed": closed}

    async def principal(self, secret: str, vm_id: str) -> Principal:
        """
        The caller a share secret stands for, for console info of C{vm_id};
        spends one use.

        @raise ConsoleError: INVALID_TOKEN / TOKEN_EXPIRED /
            TOKEN_ALREADY_USED from the store; INVALID_TOKEN when the share
            is for another VM (the use is spent all the same: no probing).
        """
        share = await self._shares.use(secret)
        vm = await self._locator.locate(vm_id)
        if vm.uuid != share.vm_uuid:
            raise ConsoleError(ErrorCode.INVALID_TOKEN, "Invalid share link")
        if self._creator_allows is not None and not self._creator_allows(share.creator, vm):
            log.info("share {share_id} refused: its creator {user} may no longer control {vm_uuid}",
                     share_id=share.share_id, user=share.creator, vm_uuid=vm.uuid)  # fmt: skip
            raise ConsoleError(ErrorCode.INVALID_TOKEN, "Share link revoked")
        return Principal(
            user=share.creator,
            vms=(share.vm_uuid,),
            method="share",
            key_id=SHARE_KEY_PREFIX + share.share_id,
            access=share.mode,
        )
