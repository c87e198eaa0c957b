"""A project's tasks and annotations as last pulled from Label Studio, brought up to date incrementally.

Label Studio stays the source of truth: every training run asks it for the tasks changed since the last pull
(a Data Manager filter on ``updated_at``, which Label Studio moves when an annotation of the task is created,
updated or deleted) and merges them into the local copy, so a retrain of a 1,000-task project reads a few
tasks instead of all of them. A full pull replaces the copy when there is none (or it is unreadable), when it
came from another Label Studio or another label config, when its last full pull is older than
``TASKS_FULL_PULL_EVERY_S``, or when the merged copy does not have as many tasks as Label Studio (tasks were
deleted). An incremental pull reads the tasks changed since Label Studio's clock (its HTTP ``Date``) at the
start of the previous pull, minus :data:`OVERLAP_S` so that a change whose transaction committed late is
still read (without a ``Date`` header: since the newest ``updated_at`` seen, minus the same overlap).

The copy, ``ProjectPaths.tasks_snapshot`` (atomic replace), keeps each task's id, data, annotations and
``updated_at``; of its predictions only those an annotation was made from (``parent_prediction``: id and
result, which ``labelstudio.copies`` compares), not the others.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import Enum
from pathlib import Path
from typing import Any

from ml_backend.labelstudio.client import LabelStudioClient
from ml_backend.labelstudio.tasks import TaskRecord
from model.atomic import atomic_write_json

__all__ = ["FORMAT", "OVERLAP_S", "Pull", "PullKind", "pull_tasks", "read_tasks"]

log = logging.getLogger(__name__)

FORMAT = 1
OVERLAP_S = 10.0
"""Seconds before the newest ``updated_at`` seen that an incremental pull reads again."""
INCREMENTAL_PAGE_SIZE = 50
"""Tasks per request of an incremental pull: Label Studio serializes a whole page (annotations and predictions
included) before the pull can stop at the first unchanged task, so a full-size page made every small retrain read
hundreds of tasks (4 s of Label Studio's time on 1,000 tasks, measured under load)."""


class PullKind(str, Enum):
    """How a pull read the project."""

    FULL = "full"
    INCREMENTAL = "incremental"


@dataclass(frozen=True)
class Pull:
    """The project's tasks (id order) after a pull, and what the pull did.

    Attributes:
        tasks: every task with its annotations (and only the predictions they were made from).
        kind: full or incremental.
        reason: why a full pull was needed (empty for an incremental one).
        read: tasks read from Label Studio by this pull.
    """

    tasks: list[TaskRecord]
    kind: PullKind
    reason: str
    read: int


def pull_tasks(client: LabelStudioClient, project_id: int, path: Path, label_config: str,
               full_every_s: float, overlap_s: float = OVERLAP_S) -> Pull:
    """Bring the snapshot at ``path`` up to date with Label Studio and return the project's tasks.

    Args:
        client: the project's Label Studio.
        project_id: the project.
        path: the snapshot file.
        label_config: the project's current label config (a change forces a full pull).
        full_every_s: the longest time between full pulls.
        overlap_s: how far before the newest change seen an incremental pull starts reading.

    Raises:
        LabelStudioError: Label Studio could not be read (the snapshot is left as it was).
    """
    config_hash = hashlib.sha256(label_config.encode()).hexdigest()
    snapshot = _read(path)
    now = time.time()
    total, server_time = client.count_tasks(project_id)  # Label Studio's clock: this pull reads what changed later
    reason = _full_pull_reason(snapshot, client.url, config_hash, now, full_every_s)
    pull = None
    if reason is None:
        assert snapshot is not None
        since = _minus_seconds(snapshot.get("pulled_at") or snapshot["newest"], overlap_s)
        changed = [_stripped(t) for t in client.iter_tasks(project_id, page_size=INCREMENTAL_PAGE_SIZE,
                                                           updated_after=since)]
        merged = {t.id: t for t in snapshot["records"]}
        merged.update((t.id, t) for t in changed)
        if total == len(merged):
            pull = Pull(sorted(merged.values(), key=lambda t: t.id), PullKind.INCREMENTAL, "", len(changed))
        else:
            reason = f"Label Studio has {total} tasks and the merged copy {len(merged)} (tasks were deleted)"
    full_at = snapshot["full_at"] if snapshot is not None and pull is not None else now
    if pull is None:
        tasks = sorted((_stripped(t) for t in client.iter_tasks(project_id)), key=lambda t: t.id)
        pull = Pull(tasks, PullKind.FULL, reason or "", len(tasks))
    newest = max((t.updated_at for t in pull.tasks if t.updated_at), key=_parse, default="")
    pulled_at = server_time.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if server_time else None
    atomic_write_json(path, {"format": FORMAT, "url": client.url, "config_hash": config_hash, "full_at": full_at,
                  "pulled_at": pulled_at, "newest": newest, "tasks": [_as_dict(t) for t in pull.tasks]})
    if pull.kind is PullKind.FULL:
        log.info("Project %s: full pull of %d tasks (%s).", project_id, pull.read, pull.reason)
    else:
        log.info("Project %s: incremental pull: %d changed tasks read, %d in all.", project_id, pull.read,
                 len(pull.tasks))
    return pull


def read_tasks(path: Path) -> list[TaskRecord] | None:
    """The tasks of the snapshot at ``path`` (id order, parent predictions only), or None when there is no readable one."""
    snapshot = _read(path)
    return None if snapshot is None else sorted(snapshot["records"], key=lambda t: t.id)


def _full_pull_reason(snapshot: dict[str, Any] | None, url: str, config_hash: str, now: float,
                      full_every_s: float) -> str | None:
    if snapshot is None:
        return "no readable snapshot yet"
    if snapshot.get("url") != url:
        return f"the snapshot came from {snapshot.get('url')}, the project is now on {url}"
    if snapshot.get("config_hash") != config_hash:
        return "the label config changed"
    if now - snapshot["full_at"] > full_every_s:
        return f"the last full pull is older than TASKS_FULL_PULL_EVERY_S={full_every_s:g} s"
    if not snapshot.get("pulled_at") and not snapshot.get("newest"):
        return "the snapshot has no time to read changes from"
    return None


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT or not isinstance(data.get("tasks"), list):
            raise ValueError(f"format {data.get('format')!r}")
        _parse(data.get("pulled_at") or data.get("newest") or "1970-01-01T00:00:00Z")
        data["full_at"] = float(data["full_at"])
        if not math.isfinite(data["full_at"]):
            raise ValueError(f"full_at {data['full_at']!r}")
        data["records"] = [_record(d) for d in data["tasks"]]
        return data
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as exc:
        log.warning("Task snapshot %s unreadable (%s); pulling every task again.", path, exc)
        return None


def _parse(iso: str) -> datetime:
    moment = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _minus_seconds(iso: str, seconds: float) -> str:
    moment = _parse(iso).astimezone(timezone.utc) - timedelta(seconds=seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _stripped(task: TaskRecord) -> TaskRecord:
    parents = {a.get("parent_prediction") for a in task.annotations} - {None}
    kept = [{"id": p.get("id"), "result": p.get("result")} for p in task.predictions if p.get("id") in parents]
    return TaskRecord(task.id, task.data, task.annotations, kept, task.updated_at)


def _as_dict(task: TaskRecord) -> dict[str, Any]:
    return {"id": task.id, "data": task.data, "annotations": task.annotations, "predictions": task.predictions,
            "updated_at": task.updated_at}


def _record(data: dict[str, Any]) -> TaskRecord:
    annotations, predictions = data["annotations"], data.get("predictions") or []
    if not isinstance(data["data"], dict) or not isinstance(annotations, list) \
            or not all(isinstance(a, dict) for a in annotations + predictions):
        raise ValueError(f"task {data.get('id')!r} has no data dict or no list of annotation dicts")
    return TaskRecord(int(data["id"]), data["data"], annotations, predictions, str(data["updated_at"]))
