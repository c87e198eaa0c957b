"""Disagreement flags shown in Label Studio: one Data Manager tab per flag kind, and comments where they exist.

Label Studio Community has no comment API, so every edition gets a Data Manager tab per flag kind filtering
the flagged task ids; where the server has comments (Enterprise) each flagged task also gets one comment
carrying its new flags. A flag already posted (its key is in a comment of the task, or in
``ProjectPaths.posted_flags``) is never posted again.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from ml_backend.labelstudio.client import LabelStudioClient
from ml_backend.labelstudio.comments import list_comments, post_comment, supports_comments
from ml_backend.labelstudio.tabs import upsert_task_tab
from ml_backend.paths import ProjectPaths
from model.atomic import atomic_write_json
from model.crowd.findings import Flag
from model.crowd.types import ConsensusResult

__all__ = ["MARKER", "TAB_TITLES", "comment_text", "post_flags"]

MARKER = "taxomoco-flag"
"""Written as ``[taxomoco-flag <key>]`` into comments, so a later run recognises what it posted."""

TAB_TITLES = {
    "label_error_candidate": "taxomoco: label-error candidates",
    "low_quality_consensus": "taxomoco: uncertain consensus",
    "annotators_disagree": "taxomoco: annotators disagree",
}
"""Data Manager tab title per flag kind."""

MAX_TAB_TASKS = 300
"""Most urgent tasks a flag tab filters (a longer id filter makes the Data Manager slow)."""

MAX_COMMENTS = 200
"""Tasks commented at most per training run (the most urgent first; the rest on later runs)."""


def comment_text(flags: Sequence[Flag]) -> str:
    """One comment for the new flags of one task; each flag's key is written as ``[taxomoco-flag <key>]``."""
    lines = [f"taxomoco: {f.message}" for f in flags]
    lines += [f"[{MARKER} {f.key}]" for f in flags]
    return "\n".join(lines)


def _keys_in(texts: Iterable[str]) -> set[str]:
    keys = set()
    for text in texts:
        for line in str(text or "").splitlines():
            line = line.strip()
            if line.startswith(f"[{MARKER} ") and line.endswith("]"):
                keys.add(line[len(MARKER) + 2:-1])
    return keys


def post_flags(paths: ProjectPaths, client: LabelStudioClient, result: ConsensusResult,
               max_comments: int = MAX_COMMENTS, min_score: float = 0.1) -> dict:
    """Show the flags in Label Studio: one Data Manager tab per flag kind (every edition) and, where the
    server has comments (Enterprise), one comment per task carrying its new flags. A flag already posted
    (its key is in a comment of the task, or in ``ProjectPaths.posted_flags``) is never posted again.

    Args:
        paths: the project's files (``posted_flags`` lives there).
        client: the project's Label Studio.
        result: the consensus with its flags (most urgent first).
        max_comments: tasks commented at most per call (the most urgent first; the rest on later runs).
        min_score: flags below this score go to the tabs only ("annotators disagree" on a clear consensus).

    Returns:
        ``{"tabs": {title: tab id}, "comments_supported": bool, "comments_posted": n, "flags_already_posted": m}``.
    """
    project_id = paths.project_id
    summary: dict[str, Any] = {"tabs": {}, "comments_supported": False, "comments_posted": 0, "flags_already_posted": 0}
    for kind, title in TAB_TITLES.items():
        ids: list[int] = []
        for f in result.flags:
            if f.kind.value == kind and f.item not in ids:
                ids.append(f.item)
        summary["tabs"][title] = upsert_task_tab(client, project_id, title, ids[:MAX_TAB_TASKS])
    if not supports_comments(client):
        return summary
    summary["comments_supported"] = True
    posted_path = paths.posted_flags
    posted: set[str] = set(json.loads(posted_path.read_text())) if posted_path.is_file() else set()
    by_item: dict[int, list[Any]] = {}
    for f in result.flags:  # most urgent first
        if f.score >= min_score or f.kind.value != "annotators_disagree":
            by_item.setdefault(f.item, []).append(f)
    done = 0
    try:
        for item, flags in by_item.items():
            new = [f for f in flags if f.key not in posted]
            summary["flags_already_posted"] += len(flags) - len(new)
            if not new:
                continue
            if done >= max_comments:
                break
            there = _keys_in(c.get("text", "") for c in list_comments(client, item))
            posted |= there & {f.key for f in new}
            summary["flags_already_posted"] += sum(f.key in there for f in new)
            new = [f for f in new if f.key not in there]
            if new:
                post_comment(client, project_id, item, comment_text(new))
                posted |= {f.key for f in new}
                summary["comments_posted"] += 1
                done += 1
    finally:
        atomic_write_json(posted_path, sorted(posted))
    return summary
