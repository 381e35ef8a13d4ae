"""
How the HTTP API answers: a JSON body (L{json_answer}), a
L{ConsoleError} as C{{"type": "error", "code": …, "error": …}} with its
status and headers (L{error_answer}), and what the API's error handlers
answer for a failure (L{failure_answer} and the handlers' own functions).

Every route and both fast routes answer through these, so an error looks
the same whichever way the request came in; tracebacks go to the log only.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from vaporproxy.errors import ConsoleError, ErrorCode, error_body
from vaporproxy.http.routing import relative_redirect
from vaporproxy.http.site import JSON_CONTENT_TYPE

log = Logger(namespace="vaporproxy.web.ConsoleAPI")


def json_answer(request: IRequest, body: Any, status: int = 200) -> bytes:
    """C{body} as JSON with C{status}, never cached nor sniffed."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON_CONTENT_TYPE)
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-content-type-options", b"nosniff")
    return json.dumps(body).encode("utf-8")


def error_answer(request: IRequest, error: ConsoleError) -> bytes:
    """C{error}'s JSON body and status, with its challenge and C{Retry-After}."""
    if error.challenge is not None:
        request.setHeader(b"www-authenticate", error.challenge.encode("ascii", "replace"))
    elif error.code is ErrorCode.UNAUTHORIZED and error.http_status == 401:
        request.setHeader(b"www-authenticate", b'Bearer realm="vaporproxy"')
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        request.setHeader(b"retry-after", b"%d" % retry_after)
    return json_answer(request, error.to_dict(), error.http_status)


def console_error_answer(request: IRequest, failure: Failure) -> bytes:
    """The answer to a L{ConsoleError} a handler raised."""
    error = failure.value
    log.debug("answered {code}: {message}", code=error.code.name, message=error.message)
    return error_answer(request, error)


def not_found_answer(request: IRequest) -> bytes:
    """A JSON 404."""
    return json_answer(request, error_body(ErrorCode.NOT_FOUND, "Not found"), 404)


def method_not_allowed_answer(request: IRequest, failure: Failure) -> bytes:
    """A JSON 405 with C{Allow} (werkzeug's C{MethodNotAllowed} in C{failure})."""
    allowed = failure.value.valid_methods or ()
    if allowed:
        request.setHeader(b"allow", ", ".join(sorted(allowed)).encode("ascii"))
    return json_answer(request, error_body(ErrorCode.METHOD_NOT_ALLOWED, "Method not allowed"), 405)


def unexpected_answer(request: IRequest, failure: Failure) -> Any:
    """
    Werkzeug's redirects with a path-only Location, its other HTTP answers
    as it gives them (C{failure} itself), anything else a logged 500.
    """
    from werkzeug.exceptions import HTTPException
    from werkzeug.routing import RequestRedirect

    if failure.check(RequestRedirect):
        return json_answer(request, *relative_redirect(request, failure.value))
    if failure.check(HTTPException):
        return failure  # werkzeug's own answer
    log.failure("unexpected error answering {method} {path}", failure, method=request.method, path=request.path)
    return error_answer(request, ConsoleError(ErrorCode.INTERNAL_ERROR))


def failure_answer(request: IRequest, failure: Failure) -> Any:
    """The answer the API's error handlers give to C{failure}."""
    if failure.check(ConsoleError):
        return console_error_answer(request, failure)
    return unexpected_answer(request, failure)
