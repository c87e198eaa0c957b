"""label-studio-sdk inside the backend: its requests go through the outbound gate (``ml_backend.net.gate``), with
the credentials the gate attaches for Label Studio's origin alone; and its heavy imports can be done ahead of use."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import httpx

if TYPE_CHECKING:
    from ml_backend.net.destination import Destination
    from ml_backend.net.gate import OutboundGate

__all__ = ["GateTransport", "GatedServer", "preload_sdk"]


class GatedServer(Protocol):
    """What the transport needs of a Label Studio client: its gate, its destination and its timeout."""

    gate: OutboundGate
    destination: Destination
    timeout: float


class GateTransport(httpx.BaseTransport):
    """An httpx transport that sends label-studio-sdk's requests through the gate (credentials by the gate)."""

    def __init__(self, client: GatedServer) -> None:
        self._client = client

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        answer = self._client.gate.request(
            request.method, str(request.url), self._client.destination,
            headers={k: v for k, v in request.headers.items() if k.lower() not in ("content-length", "accept-encoding")},
            body=request.read() or None, timeout=self._client.timeout)
        return httpx.Response(answer.status, headers=list(answer.headers.items()), content=answer.body,
                              request=request)


def preload_sdk() -> None:
    """Import the parts of label-studio-sdk the client uses (over a second of CPU on first use) without any
    request, for a process that waits for its job (``ml_backend.training.jobs.warm_up``)."""
    from label_studio_sdk import LabelStudio  # heavy: see LabelStudioClient.sdk
    from label_studio_sdk.core.api_error import ApiError  # noqa: F401

    _ = LabelStudio(base_url="http://127.0.0.1:9", api_key="preload").projects  # the projects client loads lazily
