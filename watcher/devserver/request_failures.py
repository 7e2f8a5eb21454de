"""How a request ends early: an HTTP error answer, or a client that went away."""

from __future__ import annotations

# --------------------------------------------------------------------------- request failures


class _RequestRejected(Exception):
    """Ends a request with an HTTP error answer; never escapes the handler."""

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class _ClientGone(Exception):
    """The client closed the connection before its request body was complete."""
