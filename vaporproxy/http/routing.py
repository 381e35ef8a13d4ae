"""
The root resource of the HTTP API (L{Root}): console info, asked once per
console, skips Klein; everything else goes through it.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, Tuple
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
