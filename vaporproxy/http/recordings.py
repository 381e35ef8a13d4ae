"""
The recordings admin API and the playback page (SPEC.md "Recording and
playback"):

- C{GET /api/v1/console/recordings[?vm=…&user=…&since=ISO8601]}
- C{GET /api/v1/console/recordings/{id}}, C{…/{id}/data}, C{DELETE …/{id}}
- C{GET /console/recordings/{id}}: the page that plays one in the browser.

The console API's routes call these handlers; every one but the page is
admin-only (the page itself holds nothing: its script asks the API with
the key from the URL fragment).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Callable, Dict, List, Optional

from twisted.internet.defer import Deferred
from twisted.web.iweb import IRequest
from twisted.web.static import File

from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.recordings.recorder import recording_path
from vaporproxy.recordings.store import is_recording_id

__all__ = ["RecordingsAPI", "filter_recordings"]

#: The fields a recording is answered with (SPEC.md), and whether its file
#: holds the whole console (C{complete}: C{None} while it is written) and
#: why not (C{dropped}: the disk trouble that gave it up; the console went on).
PUBLIC_FIELDS = (
    "id", "vm_id", "vm_name", "type", "user", "started_at", "ended_at", "duration_s", "bytes", "outcome", "size",
    "complete", "dropped",
)  # fmt: skip


def _since(text: Optional[str]) -> Optional[float]:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConsoleError(ErrorCode.BAD_REQUEST, "Parameter since must be an ISO 8601 time")
    if moment.tzinfo is None:
        raise ConsoleError(ErrorCode.BAD_REQUEST, "Parameter since needs a time zone (e.g. Z)")
    return moment.timestamp()


def filter_recordings(
    recordings: List[Dict[str, Any]], vm: Optional[str], user: Optional[str], since: Optional[str]
) -> List[Dict[str, Any]]:
    """The public fields of the recordings that match every given filter."""
    after = _since(since)
    kept = []
    for meta in recordings:
        if vm is not None and vm not in (meta.get("vm_id"), meta.get("vm_name")):
            continue
        if user is not None and meta.get("user") != user:
            continue
        if after is not None and (meta.get("started_at_s") or 0) < after:
            continue
        kept.append({name: meta.get(name) for name in PUBLIC_FIELDS})
    return kept


class RecordingsAPI:
    """
    @param store: the L{vaporproxy.recordings.store.RecordingStore}.
    @param require_admin: raises L{ConsoleError} unless the request carries
        an admin credential.
    @param respond: C{(request, body, status) -> bytes}: the API's JSON answer.
    @param arg: C{(request, name) -> Optional[str]}: one query parameter.
    """

    def __init__(
        self,
        store: Any,
        require_admin: Callable[[IRequest], Any],
        respond: Callable[..., bytes],
        arg: Callable[[IRequest, bytes], Optional[str]],
    ):
        self._store = store
        self._require_admin = require_admin
        self._respond = respond
        self._arg = arg

    def _answer(self, request: IRequest, work: Any) -> Deferred:
        async def run() -> bytes:
            try:
                self._require_admin(request)
                return await work()
            except ConsoleError as e:
                return self._respond(request, e.to_dict(), e.http_status)

        return Deferred.fromCoroutine(run())

    async def _find(self, recording_id: str) -> Dict[str, Any]:
        for meta in await self._store.list():
            if meta["id"] == recording_id:
                return meta
        raise ConsoleError(ErrorCode.NOT_FOUND, "No such recording")

    def list(self, request: IRequest) -> Deferred:
        async def work() -> bytes:
            found = filter_recordings(
                await self._store.list(),
                self._arg(request, b"vm"),
                self._arg(request, b"user"),
                self._arg(request, b"since"),
            )
            return self._respond(request, {"recordings": found}, 200)

        return self._answer(request, work)

    def one(self, request: IRequest, recording_id: str) -> Deferred:
        async def work() -> bytes:
            meta = await self._find(recording_id)
            return self._respond(request, {name: meta.get(name) for name in PUBLIC_FIELDS}, 200)

        return self._answer(request, work)

    def data(self, request: IRequest, recording_id: str) -> Any:
        """
        The recording file, streamed from disk by twisted.web's C{File}
        (range requests work: the player can fetch a file still growing).
        """
        try:
            self._require_admin(request)
            if not is_recording_id(recording_id):
                raise ConsoleError(ErrorCode.NOT_FOUND, "No such recording")
        except ConsoleError as e:
            return self._respond(request, e.to_dict(), e.http_status)
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        return File(recording_path(self._store.directory, recording_id), defaultType="application/octet-stream")

    def delete(self, request: IRequest, recording_id: str) -> Deferred:
        async def work() -> bytes:
            if recording_id in self._store.live:
                raise ConsoleError(ErrorCode.BAD_REQUEST, "The recording's console is still open")
            if not await self._store.delete(recording_id):
                raise ConsoleError(ErrorCode.NOT_FOUND, "No such recording")
            return self._respond(request, {"deleted": recording_id}, 200)

        return self._answer(request, work)


class NoRecordings:
    """
    The recordings routes of a server where C{recording} is not
    configured: every one answers 404.
    """

    def _off(self, *args: Any) -> Any:
        raise ConsoleError(ErrorCode.NOT_FOUND, "Recording is not enabled on this server")

    list = one = delete = data = _off
