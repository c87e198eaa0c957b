"""Task comments (Label Studio Enterprise has a comment API; Community answers 404: then flags use tabs only)."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from ml_backend.labelstudio.client import LabelStudioClient
from ml_backend.labelstudio.errors import LabelStudioError, LabelStudioNotFound, NotSupportedByServer

__all__ = ["list_comments", "post_comment", "resolve_comment", "supports_comments"]

_supported: dict[str, bool] = {}
_lock = threading.Lock()


def supports_comments(client: LabelStudioClient) -> bool:
    """Whether this server has the comment API (Label Studio Enterprise); probed once per server."""
    with _lock:
        known = _supported.get(str(client.origin))
    if known is not None:
        return known
    try:
        client.request("GET", "/api/comments/", "probe the comment API", params={"task": 0})
        found = True
    except LabelStudioNotFound:
        found = False
    except LabelStudioError as exc:
        found = exc.status is not None and exc.status < 500 and exc.status != 405
    with _lock:
        _supported[str(client.origin)] = found
    return found


def _require(client: LabelStudioClient) -> None:
    if not supports_comments(client):
        raise NotSupportedByServer(
            f"Label Studio at {client.url} has no comment API (/api/comments/ answers 404: comments are a Label "
            "Studio Enterprise feature); flags are shown as a Data Manager tab instead.", f"{client.url}/api/comments/",
            404)


def post_comment(client: LabelStudioClient, project_id: int, task_id: int, text: str) -> int:
    """Add a comment to a task; returns the comment id.

    Raises:
        NotSupportedByServer: the server has no comment API (Label Studio Community).
    """
    _require(client)
    body = {"project": int(project_id), "task": int(task_id), "text": str(text), "is_resolved": False}
    return int(client.request("POST", "/api/comments/", f"comment on task {task_id}", json=body).json()["id"])


def list_comments(client: LabelStudioClient, task_id: int) -> list[dict[str, Any]]:
    """The comments of a task (``id``, ``text``, ``is_resolved``, ``created_by`` ...)."""
    _require(client)
    answer = client.request("GET", "/api/comments/", f"list the comments of task {task_id}",
                            params={"task": int(task_id)}).json()
    return list(answer.get("results", answer) if isinstance(answer, Mapping) else answer)


def resolve_comment(client: LabelStudioClient, comment_id: int, resolved: bool = True) -> None:
    """Mark a comment resolved (or unresolved again)."""
    _require(client)
    client.request("PATCH", f"/api/comments/{int(comment_id)}/", f"resolve comment {comment_id}",
                   json={"is_resolved": bool(resolved)})
