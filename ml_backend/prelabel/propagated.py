"""Predictions of a propagation version for a project's tasks (what the bulk writer writes before the heads train).

The training run that made the version (``ml_backend.training.propagation``) stored each reached task's path, score
and top leaf probability; the embeddings the labeling order needs come from the kNN index the labels spread over
(``ProjectPaths.neighbor_index``, rows keyed by image content hash, mapped to tasks by ``ProjectPaths.neighbor_tasks``).
A task no label reached, or whose image was unusable, gets the empty item ``/predict`` gives it (score 0).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ml_backend.labelstudio.label_config import LabelConfig
from ml_backend.labelstudio.results import prediction_result
from ml_backend.labelstudio.tasks import TaskRecord
from ml_backend.paths import ProjectPaths
from ml_backend.prelabel.live import TaskPredictions
from ml_backend.training.neighbors import read_task_map
from ml_backend.training.propagation import Propagated, read_propagated
from model.errors import DataError, TaxomocoError
from model.neighbors.index import load_index

__all__ = ["PropagatedPath", "PropagatedPredictions", "propagated_path"]

log = logging.getLogger(__name__)


@dataclass
class PropagatedPath:
    """A task's propagated path (the config's canonical names) and its score, as ``prediction_result`` reads it."""

    path: Sequence[str]
    score: float


def propagated_path(propagated: Propagated, task_id: int, config: LabelConfig) -> PropagatedPath | None:
    """The stored path of a task in the config's canonical form, and its score; None when the version has none for
    it (not reached, unusable image, or a path the current label config no longer has)."""
    entry = propagated.tasks.get(int(task_id))
    if entry is None:
        return None
    path_index, score, _ = entry
    try:
        return PropagatedPath(config.taxonomy.resolve(propagated.paths[path_index]), score)
    except (TaxomocoError, IndexError):
        return None


class PropagatedPredictions:
    """A propagation version of a project, giving the bulk writer its items, embeddings and top probabilities.

    Args:
        paths: the project's files.
        config: the project's current label config.
        version: the propagation version (default: the live one).

    Raises:
        DataError: no such version on disk, or its file is damaged.
    """

    def __init__(self, paths: ProjectPaths, config: LabelConfig, version: str | None = None) -> None:
        propagated = read_propagated(paths, version)
        if propagated is None:
            raise DataError(f"Project {paths.project_id} has no propagation version {version or '(live)'} on disk; "
                            "the next training run makes one (POST /train).")
        self.paths, self.config, self.propagated = paths, config, propagated
        self.version = propagated.version

    def predict(self, tasks: Sequence[TaskRecord]) -> TaskPredictions:
        """Items, embeddings (``(N, D)``, NaN rows where none) and top leaf probabilities (NaN where none)."""
        n = len(tasks)
        top = np.full(n, np.nan, dtype=np.float64)  # (N,)
        items = []
        for i, task in enumerate(tasks):
            found = propagated_path(self.propagated, task.id, self.config)
            items.append(prediction_result(self.config, found, self.version))
            if found is not None:
                top[i] = self.propagated.tasks[task.id][2]
        return TaskPredictions([t.id for t in tasks], items, self._embeddings(tasks), top)

    def _embeddings(self, tasks: Sequence[TaskRecord]) -> np.ndarray:
        try:
            index = load_index(self.paths.neighbor_index(self.propagated.encoder_version))
            task_map, _ = read_task_map(self.paths)
        except DataError as exc:  # the order then has no coverage picks; the predictions are still written
            log.warning("Project %s: no embeddings for the labeling order (%s).", self.paths.project_id, exc)
            return np.full((len(tasks), 1), np.nan, dtype=np.float32)
        emb = np.full((len(tasks), index.dim), np.nan, dtype=np.float32)  # (N, D)
        rows = [(i, task_map[t.id].key) for i, t in enumerate(tasks) if t.id in task_map and task_map[t.id].key in index]
        if rows:
            emb[[i for i, _ in rows]] = index.vectors([k for _, k in rows])
        return emb
