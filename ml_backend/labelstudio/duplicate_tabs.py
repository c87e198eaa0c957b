"""Duplicate images shown in Label Studio: a Data Manager tab of every task in a duplicate group, and one of the
groups whose labels disagree (every edition has tabs; see ``ml_backend.labelstudio.tabs``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ml_backend.labelstudio.client import LabelStudioClient
from ml_backend.labelstudio.tabs import upsert_task_tab

__all__ = ["CONFLICT_TAB_TITLE", "DUPLICATES_TAB_TITLE", "MAX_TAB_TASKS", "post_duplicate_tabs"]

DUPLICATES_TAB_TITLE = "taxomoco: duplicates"
CONFLICT_TAB_TITLE = "taxomoco: duplicates that disagree"
MAX_TAB_TASKS = 300
"""Tasks a tab filters at most (a longer id filter makes the Data Manager slow)."""


def post_duplicate_tabs(client: LabelStudioClient, project_id: int, duplicates: Mapping[str, Any]) -> dict[str, int]:
    """Create or update both tabs from ``ml_backend.training.neighbors.duplicate_conflicts``'s answer.

    Returns:
        ``{title: tab id}``.
    """
    in_groups = [int(t) for t in duplicates.get("tasks_in_groups", [])][:MAX_TAB_TASKS]
    conflicting: list[int] = []
    for group in duplicates.get("conflicting", []):
        conflicting.extend(int(t) for t in group["items"] if int(t) not in conflicting)
    return {DUPLICATES_TAB_TITLE: upsert_task_tab(client, project_id, DUPLICATES_TAB_TITLE, in_groups),
            CONFLICT_TAB_TITLE: upsert_task_tab(client, project_id, CONFLICT_TAB_TITLE, conflicting[:MAX_TAB_TASKS])}
