"""
The root resource of the HTTP API (L{Root}): console info, asked once per
console, skips Klein; everything else goes through it.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Coroutine, Dict, Tuple
from urllib.parse import urlsplit

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource


#: The console-info path as raw request bytes, for its fast route: a VM id of
#: printable ASCII without C{/} or C{%} (so that the raw bytes are exactly
#: what Klein would decode); anything else goes through Klein.
INFO_PATH_RE = re.compile(rb"^/api/v1/virtualization/virtualmachines/([!-$&-.0-~]+)/console$")

log = Logger(namespace="vaporproxy.web.ConsoleAPI")


class Root(Resource):
    """
    The root resource: console info (C{GET} of
    C{.../virtualmachines/{id}/console} with a plain VM id) goes straight
    to L{ConsoleAPI.render_console_info}, everything else to the Klein app.

    Skipping Klein's per-request URL map binding, matching and Deferred
    plumbing for it is a measurable part of a console's set-up cost
    (issue #3).  The answers, errors included, are the same as through
    Klein (tests compare both routes); an id with a percent-escape goes
    through Klein, which decodes it.  (The console WebSocket has its fast
    door at the listening port, L{vaporproxy.ws.switch}; what reaches
    twisted.web goes through Klein's route.)
    """

    isLeaf = True

    def __init__(self, api: Any, klein_resource: IResource):
        super().__init__()
        self._api = api
        self._klein = klein_resource

    def render(self, request: IRequest) -> Any:
        if request.method == b"GET":
            match = INFO_PATH_RE.match(request.path)
            if match is not None:
                return self._api.render_console_info(request, match.group(1).decode("ascii"))
        return self._klein.render(request)


def render_coroutine(request: IRequest, coro: Coroutine[Any, Any, bytes],
                     error_answer: Callable[[IRequest, Failure], bytes], log: Any) -> Any:  # fmt: skip
    """
    What a resource's C{render} returns for the answer C{coro} gives, as
    L{render_deferred} for C{Deferred.fromCoroutine(coro)}, but C{coro}
    is run here at once: when it finishes without waiting (every Deferred it
    awaited had fired, the usual console info: the VM's description
    cached, the token store in memory), its body (or C{error_answer}'s, for
    what it raised) is answered without Twisted's coroutine driver, a
    measurable share of a console's set-up cost (issue 8).  When it waits,
    the rest runs under that driver (L{_rest}).
    """
    try:
        waiting = coro.send(None)
    except StopIteration as done:
        return done.value
    except BaseException:
        return error_answer(request, Failure())
    return render_deferred(request, Deferred.fromCoroutine(_rest(coro, waiting)), error_answer, log)


async def _rest(coro: Coroutine[Any, Any, bytes], waiting: Any) -> bytes:
    """
    The rest of C{coro}, which waits for the Deferred C{waiting} (what a
    coroutine awaiting a Deferred yields): its result is sent in, its
    failure (a cancellation too) thrown in, until C{coro} returns.
    """
    while True:
        try:
            result = await waiting
        except BaseException as e:
            step, value = coro.throw, e
        else:
            step, value = coro.send, result
        try:
            waiting = step(value)
        except StopIteration as done:
            return done.value


def render_deferred(request: IRequest, d: Deferred, error_answer: Callable[[IRequest, Failure], bytes], log: Any) -> Any:
    """
    What a resource's C{render} returns for the answer C{d} will give: the
    body itself when C{d} has fired already, else C{NOT_DONE_YET} and the
    body written when it fires (with a Content-Length, as twisted.web frames
    a returned body).  Failures become C{error_answer}'s body; as Klein
    does, C{d} is cancelled when the client goes away first.
    """
    from twisted.web.server import NOT_DONE_YET

    if d.called:
        result: list = []
        d.addBoth(result.append)
        answer = result[0]
        return error_answer(request, answer) if isinstance(answer, Failure) else answer
    gone: list = []

    def lost(failure: Failure) -> None:
        gone.append(True)
        d.cancel()

    request.notifyFinish().addErrback(lost)

    def answered(body: Any) -> None:
        if gone:
            if isinstance(body, Failure) and not body.check(CancelledError):
                log.failure("console info failed after the client went away", body)
            return
        if isinstance(body, Failure):
            body = error_answer(request, body)
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
        request.finish()

    d.addBoth(answered)
    return NOT_DONE_YET


def relative_redirect(request: IRequest, redirect: Any) -> Tuple[Dict[str, str], int]:
    """
    Werkzeug's redirect (e.g. C{/console//x} to C{/console/x}) with a
    path-only Location (werkzeug's absolute URL would reflect the Host
    header the client sent, and a leading C{//} would make it another
    host's); answer the JSON body and the status.
    """
    target = urlsplit(redirect.new_url)
    location = "/" + target.path.lstrip("/") + (f"?{target.query}" if target.query else "")
    request.setHeader(b"location", location.encode("utf-8"))
    return {"location": location}, redirect.code
