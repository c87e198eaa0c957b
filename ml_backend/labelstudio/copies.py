"""Annotations that merely copy a prediction: not human labels, so not trained on unless a setting says so.

A *copy* is an annotation that Label Studio links to the prediction it was made from (``parent_prediction``),
whose taxonomy paths are that prediction's, and on which nobody spent time:

* ``bulk``: no ``lead_time`` at all: the Data Manager's "Create annotations from predictions" action
  (``predictions_to_annotations``: bulk ``ANNOTATIONS_CREATED``) records none;
* ``quick``: submitted unchanged within ``COPY_MAX_LEAD_TIME_S`` of the task's opening (the labeling view sends
  ``parent_prediction`` and the seconds since it loaded the task as ``lead_time``).

An annotation a person changed (other paths than the prediction's), or confirmed after looking at the task for
longer, is a human label.

Label Studio clears ``parent_prediction`` when the prediction is deleted (the clean-up policy of
``ml_backend.prelabel`` deletes older versions' predictions) without moving the task's ``updated_at``. So each copy
seen is remembered (``ProjectPaths.prediction_copies``: annotation id -> its paths) and stays a copy while its
paths are unchanged; a person who edits it later makes it a human label.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

from ml_backend.labelstudio.annotations import parse_annotation
from ml_backend.labelstudio.label_config import LabelConfig
from ml_backend.labelstudio.tasks import TaskRecord
from model.atomic import atomic_write_json

__all__ = ["COPY_MAX_LEAD_TIME_S", "CopyKind", "PredictionCopies", "find_copies", "read_remembered",
           "without_copies", "write_remembered"]

log = logging.getLogger(__name__)

COPY_MAX_LEAD_TIME_S = 1.0
"""An unchanged pre-annotation submitted sooner than this after the task opened was not looked at."""


class CopyKind(str, Enum):
    """How an annotation came to copy a prediction."""

    BULK = "bulk"          # "Create annotations from predictions" (no lead time)
    QUICK = "quick"        # submitted unchanged within COPY_MAX_LEAD_TIME_S
    REMEMBERED = "remembered"  # seen as a copy before its prediction was deleted, paths unchanged since


@dataclass
class PredictionCopies:
    """The copies among a project's annotations.

    Attributes:
        paths: annotation id -> its paths as text (``"A/B|C/D"``): what is remembered between pulls.
        kinds: annotation id -> :class:`CopyKind` of the copies present now.
    """

    paths: dict[int, str] = field(default_factory=dict)
    kinds: dict[int, CopyKind] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """Copies present now, per kind."""
        return {k.value: sum(1 for v in self.kinds.values() if v is k) for k in CopyKind}


def _paths_key(result: Any, config: LabelConfig) -> str:
    return "|".join(sorted("/".join(p) for p in parse_annotation(result, config).paths))


def _int(value: Any) -> int | None:
    if isinstance(value, Mapping):
        value = value.get("id")
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def find_copies(tasks: Iterable[TaskRecord], config: LabelConfig, remembered: Mapping[int, str],
                max_lead_time_s: float = COPY_MAX_LEAD_TIME_S) -> PredictionCopies:
    """The annotations of ``tasks`` that copy a prediction (see the module for the rule).

    Args:
        tasks: the project's tasks with their annotations and predictions.
        config: the project's parsed label config (paths are compared through it).
        remembered: the copies found by earlier pulls (:func:`read_remembered`).
        max_lead_time_s: the *quick* copy bound.

    Returns:
        The copies present now; ``paths`` also keeps remembered copies of annotations this pull did not read
        (their task did not change), so nothing is forgotten by an incremental pull.
    """
    out = PredictionCopies(paths=dict(remembered))
    for task in tasks:
        predictions = {_int(p.get("id")): p for p in task.predictions if isinstance(p, Mapping)}
        for ann in task.annotations:
            aid = _int(ann.get("id"))
            if aid is None or ann.get("was_cancelled"):
                continue
            key = _paths_key(ann.get("result"), config)
            parent = _int(ann.get("parent_prediction"))
            lead = ann.get("lead_time")
            kind: CopyKind | None = None
            if parent is not None and (lead is None or float(lead) < max_lead_time_s):
                prediction = predictions.get(parent)
                if prediction is None or _paths_key(prediction.get("result"), config) == key:
                    kind = CopyKind.BULK if lead is None else CopyKind.QUICK
            elif parent is None and remembered.get(aid) == key:
                kind = CopyKind.REMEMBERED
            if kind is None:
                out.paths.pop(aid, None)  # changed since, or never a copy
            else:
                out.paths[aid], out.kinds[aid] = key, kind
    return out


def without_copies(tasks: Iterable[TaskRecord], copies: PredictionCopies) -> list[TaskRecord]:
    """The tasks with their copy annotations left out (a task whose only annotations were copies has none)."""
    return [replace(t, annotations=[a for a in t.annotations if _int(a.get("id")) not in copies.kinds])
            if any(_int(a.get("id")) in copies.kinds for a in t.annotations) else t for t in tasks]


def read_remembered(path: Path) -> dict[int, str]:
    """The copies remembered by earlier pulls (empty when none, or unreadable: the next pull finds them again
    while their predictions exist)."""
    try:
        data = json.loads(path.read_text())
        return {int(k): str(v) for k, v in dict(data.get("copies", {})).items()}
    except FileNotFoundError:
        return {}
    except (ValueError, TypeError, AttributeError) as exc:
        log.warning("prediction copies record %s unreadable (%s); starting over", path, exc)
        return {}


def write_remembered(path: Path, copies: PredictionCopies) -> None:
    """Save ``copies.paths`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"copies": {str(k): v for k, v in sorted(copies.paths.items())}})
