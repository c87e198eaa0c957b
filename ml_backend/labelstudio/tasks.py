"""Label Studio's projects and tasks as the backend reads them: what a project is, and every task with every
annotation of every annotator (read by :class:`ml_backend.labelstudio.client.LabelStudioClient`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

__all__ = ["ProjectInfo", "TaskRecord", "parse_time", "task_record"]


@dataclass(frozen=True)
class ProjectInfo:
    """A Label Studio project as the backend needs it."""

    id: int
    title: str
    label_config: str
    task_number: int | None = None


@dataclass(frozen=True)
class TaskRecord:
    """One task with every annotation of every annotator, as Label Studio returns them.

    Attributes:
        id: task id.
        data: the task data (``{"image": "/data/upload/3/x.png", ...}``).
        annotations: annotation dicts unchanged: ``id``, ``completed_by`` (user id), ``result``,
            ``was_cancelled``, ``ground_truth``, ``created_at``, ``updated_at``, ``lead_time``, ...
        predictions: prediction dicts (``model_version``, ``score``, ``result``, ...).
        updated_at: Label Studio's ISO time of the task's last change (an annotation's too).
    """

    id: int
    data: dict[str, Any]
    annotations: list[dict[str, Any]] = field(default_factory=list)
    predictions: list[dict[str, Any]] = field(default_factory=list)
    updated_at: str = ""


def task_record(task: Mapping[str, Any]) -> TaskRecord:
    """A task as Label Studio's REST API returns it, as a :class:`TaskRecord`."""
    return TaskRecord(
        id=int(task["id"]),
        data=dict(task.get("data") or {}),
        annotations=[dict(a) for a in task.get("annotations") or []],
        predictions=[dict(p) for p in task.get("predictions") or []],
        updated_at=str(task.get("updated_at") or ""),
    )


def parse_time(iso: str) -> datetime:
    """Label Studio's ISO time (``Z`` or an offset; naive means UTC) as an aware datetime."""
    moment = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
