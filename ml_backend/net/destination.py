"""What the outbound gate (``ml_backend.net.gate``) is told and answers: where one kind of request may go
(:class:`Destination`), the credentials it attaches (:class:`AuthHeaders`), a read answer (:class:`GateResponse`)
and the error for no answer at all (:class:`GateUnreachable`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.message import Message
from typing import Any, Protocol

from ml_backend.net.urls import Origin, safe_url
from model.errors import DataError

__all__ = ["AuthHeaders", "Destination", "GateResponse", "GateUnreachable"]


class GateUnreachable(DataError):
    """No HTTP answer came (refused, timed out, name not found, TLS failure); the message names the URL."""


class AuthHeaders(Protocol):
    """Gives the headers that authenticate to Label Studio (``ml_backend.labelstudio.auth``), asked on every request;
    told when Label Studio refused them (401), so that a renewable token is renewed and the request sent again once."""

    def headers(self) -> dict[str, str]: ...

    def invalidate(self, rejected: Mapping[str, str]) -> bool: ...


@dataclass(frozen=True)
class Destination:
    """Where one kind of request may go.

    Attributes:
        origins: exact origins allowed.
        hosts: host names allowed on any port of http or https (``ALLOWED_IMAGE_HOSTS`` entries without a scheme).
        private_ok: origins the operator named explicitly, which may resolve to private or loopback addresses.
        private_hosts_ok: host names (as in ``hosts``) that may resolve to private addresses.
        credentials_for: the one origin credentials are attached for (Label Studio), or None.
        auth: the credentials, asked for on each request to ``credentials_for``.
        private_remedy: what an operator does to allow a private address for this kind of request.
    """

    origins: frozenset[Origin] = frozenset()
    hosts: frozenset[str] = frozenset()
    private_ok: frozenset[Origin] = frozenset()
    private_hosts_ok: frozenset[str] = frozenset()
    credentials_for: Origin | None = None
    auth: AuthHeaders | None = field(default=None, compare=False)
    private_remedy: str = "set LABEL_STUDIO_URL to it"

    def allows(self, origin: Origin) -> bool:
        return origin in self.origins or origin.host in self.hosts

    def private_allowed(self, origin: Origin) -> bool:
        return origin in self.private_ok or origin.host in self.private_hosts_ok


@dataclass
class GateResponse:
    """An answer that came through the gate (body read whole, within the size limit)."""

    status: int
    headers: Message
    url: str
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON.

        Raises:
            DataError: the body is not JSON, or nested too deeply (its content is not quoted).
        """
        try:
            return json.loads(self.body)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser's stack
            raise DataError(f"{safe_url(self.url)} answered HTTP {self.status} with a body that is not JSON (or is "
                            "nested too deeply).") from None

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")
