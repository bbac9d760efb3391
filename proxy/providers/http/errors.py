"""What the upstream hop raises. The classes say how far a request got, because that decides
what a caller may do next: only a failed connect leaves the request unsent and so safe to send
to another upstream (an LLM call is not idempotent)."""

from __future__ import annotations


class UpstreamError(Exception):
    """The upstream could not be reached, or its connection broke before the answer ended."""


class UpstreamTimeout(UpstreamError, TimeoutError):
    """Connect, read (silence) or total timeout."""


class UpstreamConnectError(UpstreamError):
    """No connection could be made, so nothing was sent: the one failure after which the same
    request may safely go to another upstream."""


class UpstreamConnectTimeout(UpstreamConnectError, UpstreamTimeout):
    """The connection was not established in time (nothing was sent)."""
