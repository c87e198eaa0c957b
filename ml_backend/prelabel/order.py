"""The labeling order of a project: ``ProjectPaths.labeling_queue`` (what ``GET /queue`` serves) and the
"taxomoco: label next" Data Manager tab that shows its head in Label Studio.

The rule is :mod:`model.ranking`'s (typical coverage while labels are few, then least confidence of the calibrated
path distribution, or of the propagated one before the heads train). Before the first label there is no prediction
at all: the order is the coverage picks, then the other tasks (``ml_backend.training.coldstart``).

The tab filters the first ``LABEL_NEXT_TAB_TASKS`` task ids of the order; when they are all ranked by uncertainty
it is ordered by the Data Manager's *Prediction score* ascending, which is the same order once the project's model
version is pinned to the version whose scores it shows (the prediction score of a ``leafsOnly`` config is the top
path probability). Cold-start picks carry no score the Data Manager could sort by, so that tab lists them by task
id.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from ml_backend.labelstudio.client import LabelStudioClient
from ml_backend.labelstudio.tabs import upsert_task_tab
from ml_backend.paths import ProjectPaths
from ml_backend.prelabel.live import TaskPredictions
from ml_backend.training.records import utc_now
from model.atomic import atomic_write_json
from model.errors import DataError
from model.ranking import Reason, is_cold_start, labeling_order

__all__ = ["LABEL_NEXT_TAB", "SCORE_ORDERING", "read_queue", "update_label_next_tab", "write_queue"]

LABEL_NEXT_TAB = "taxomoco: label next"
"""Title of the Data Manager tab showing the head of the labeling order."""

SCORE_ORDERING = ["tasks:predictions_score"]
"""Data Manager ordering: prediction score ascending (least confident first)."""

COLD_START_BUDGET = 100
"""Cold-start (coverage) picks at the head of the order."""


def write_queue(paths: ProjectPaths, predictions: TaskPredictions, labelled: np.ndarray, n_leaves: int,
                cold_start_per_class: float) -> dict[str, Any]:
    """Rank the unlabelled tasks and save the order atomically.

    Args:
        paths: the project's files.
        predictions: the served version's predictions for every task of the project (labelled ones included: their
            embeddings mark the clusters already covered); before any version, no items and ``top_prob`` None.
        labelled: ``(N,)`` bool aligned with ``predictions.task_ids``: the task has a human annotation.
        n_leaves: leaf classes of the taxonomy.
        cold_start_per_class: see ``Settings.cold_start_per_class``.

    Returns:
        The saved queue: ``{"project", "version", "written_at", "cold_start", "labelled", "tasks": [{"task",
        "reason", "score"}]}``.
    """
    cold = is_cold_start(int(labelled.sum()), n_leaves, predictions.top_prob is not None, cold_start_per_class)
    ranked = labeling_order(predictions.emb, labelled, predictions.top_prob, n_leaves, cold_start_per_class,
                            budget=COLD_START_BUDGET)
    queue = {"project": paths.project_id,
             "version": predictions.items[0]["model_version"] if predictions.items else None,
             "written_at": utc_now(), "cold_start": cold, "labelled": int(labelled.sum()),
             "tasks": [{"task": predictions.task_ids[r.index], "reason": r.reason.value, "score": round(r.score, 6)}
                       for r in ranked]}
    atomic_write_json(paths.labeling_queue, queue)
    return queue


def read_queue(paths: ProjectPaths) -> dict[str, Any]:
    """The saved labeling order.

    Raises:
        DataError: none yet (it is written after the first model version's predictions).
    """
    try:
        return dict(json.loads(paths.labeling_queue.read_text()))
    except FileNotFoundError:
        raise DataError(f"Project {paths.project_id} has no labeling order yet: it is computed once the project's "
                        "images are embedded, by the first job after the model is connected (see /job_status).") from None
    except ValueError:
        raise DataError(f"The labeling order of project {paths.project_id} is unreadable; the next model version "
                        "rewrites it (POST /train).") from None


def update_label_next_tab(client: LabelStudioClient, project_id: int, queue: dict[str, Any], size: int) -> int:
    """Create or update the "label next" tab with the head of ``queue``; returns the tab id."""
    head = queue["tasks"][:size]
    uncertain = bool(head) and all(t["reason"] == Reason.UNCERTAIN.value for t in head)
    return upsert_task_tab(client, project_id, LABEL_NEXT_TAB, [int(t["task"]) for t in head],
                           ordering=SCORE_ORDERING if uncertain else ())
