"""Failures of calls to Label Studio; each message names the URL, the HTTP status and what to change."""

from __future__ import annotations

from model.errors import ConfigError, TaxomocoError

__all__ = [
    "LabelStudioAuthError",
    "LabelStudioError",
    "LabelStudioNotFound",
    "LabelStudioUnreachable",
    "NotSupportedByServer",
]


class LabelStudioError(TaxomocoError):
    """A call to Label Studio failed; the message names the URL, the status and the fix.

    Attributes:
        url: the URL that was called.
        status: the HTTP status, or None when no answer came.
    """

    def __init__(self, message: str, url: str = "", status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status


class LabelStudioUnreachable(LabelStudioError, ConfigError):
    """No HTTP answer from Label Studio (refused, timed out, DNS)."""


class LabelStudioAuthError(LabelStudioError, ConfigError):
    """Label Studio refused the API key (401) or its permissions (403)."""


class LabelStudioNotFound(LabelStudioError):
    """The project, task or endpoint does not exist on this server (404)."""


class NotSupportedByServer(LabelStudioError):
    """This Label Studio edition has no such API (e.g. comments in the Community edition)."""
