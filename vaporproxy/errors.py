"""
The error codes of the console API.

Every error a client can see is one of these codes.  Each code carries the
HTTP status used by the HTTP API and the WebSocket close code (4000-4999)
used on a console WebSocket.  The JSON body is the same on both:
``{"type": "error", "code": CODE, "error": message}``.

Messages given to clients are fixed, client-safe strings: never a
traceback, an internal host name, a password or a token.
"""

from __future__ import annotations

import enum
import json
from typing import Optional


class ErrorCode(enum.Enum):
    """
    An error code with its HTTP status, WebSocket close code and default
    client-facing message.
    """

    def __init__(self, http_status: int, close_code: int, default_message: str):
        self.http_status = http_status
        self.close_code = close_code
        self.default_message = default_message

    INVALID_TOKEN = (401, 4001, "Invalid or expired token")
    TOKEN_EXPIRED = (401, 4002, "Token has expired")
    TOKEN_ALREADY_USED = (401, 4003, "Token has already been used")
    VM_NOT_FOUND = (404, 4004, "Virtual machine not found")
    NO_CONSOLE_AVAILABLE = (409, 4005, "No console available for this virtual machine")
    CONNECTION_FAILED = (502, 4006, "Failed to connect to console server")
    MAX_CONNECTIONS_REACHED = (429, 4007, "Connection limit reached")
    UNAUTHORIZED = (401, 4008, "Unauthorized")
    INTERNAL_ERROR = (500, 4009, "Internal server error")
    SESSION_TERMINATED = (410, 4010, "Console session terminated")
    IDLE_TIMEOUT = (408, 4011, "Console closed after being idle")
    # Not in the original document; needed by SPEC.md ("bad parameters 400")
    # and by issue #4 (token store unreachable: 503, fail closed).
    BAD_REQUEST = (400, 4012, "Bad request")
    SERVICE_UNAVAILABLE = (503, 4013, "Service temporarily unavailable")
    # HTTP only: an unknown route, or a known route with the wrong method.
    NOT_FOUND = (404, 4014, "Not found")
    METHOD_NOT_ALLOWED = (405, 4015, "Method not allowed")
    # Issue #11: a credential past auth.mint_rate or auth.max_outstanding_tokens.
    MFA_REQUIRED = (401, 4016, "Multi-factor authentication required")
    RATE_LIMITED = (429, 4017, "Too many requests")

    @property
    def code(self) -> str:
        return self.name


#: WebSocket close code used when the proxy shuts down.
CLOSE_GOING_AWAY = 1001


class ConsoleError(Exception):
    """
    An error with a code that may be shown to a client.

    @ivar code: the L{ErrorCode}.
    @ivar message: a client-safe message.
    @ivar http_status: the HTTP status to answer with; usually
        C{code.http_status}, but e.g. UNAUTHORIZED is 403 for an
        authenticated caller that is not allowed.
    @ivar challenge: a C{WWW-Authenticate} value to answer with, or
        C{None} (MFA_REQUIRED carries RFC 9470's).
    """

    challenge: Optional[str] = None

    def __init__(
        self,
        code: ErrorCode,
        message: Optional[str] = None,
        http_status: Optional[int] = None,
    ):
        self.code = code
        self.message = message if message is not None else code.default_message
        self.http_status = http_status if http_status is not None else code.http_status
        super().__init__(code.name, self.message)

    def to_dict(self) -> dict:
        return error_body(self.code, self.message)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


def error_body(code: ErrorCode, message: Optional[str] = None) -> dict:
    """
    The JSON-ready body for an error.
    """
    return {
        "type": "error",
        "code": code.name,
        "error": message if message is not None else code.default_message,
    }
