"""Predictions of the live model version for a project's tasks, from the embedding cache (no image is decoded).

The training job that published the version embedded every task image it could read into the project's
embedding cache (``ProjectPaths.cache``) and mapped each image value to its content hash
(``ProjectPaths.images_index``), so predicting every task is a cache read plus the heads: no download, no decode,
no encoder forward. A task whose image was unreadable gets the same empty item ``/predict`` gives it (score 0).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ml_backend.labelstudio.client import LabelStudioClient
from ml_backend.labelstudio.label_config import LabelConfig
from ml_backend.labelstudio.results import prediction_result
from ml_backend.labelstudio.tasks import TaskRecord
from ml_backend.net.images import ImageFetcher
from ml_backend.paths import ProjectPaths
from ml_backend.settings import Settings
from model.bundle import load_live
from model.errors import TaxomocoError
from model.predictor import Predictor

__all__ = ["LivePredictions", "TaskPredictions"]

log = logging.getLogger(__name__)


@dataclass
class TaskPredictions:
    """Predictions of one model version for a list of tasks (rows in task order).

    Attributes:
        task_ids: ``(N,)`` task ids.
        items: one Label Studio prediction item per task (``{"result", "score", "model_version"}``).
        emb: ``(N, D)`` float32 embeddings, NaN rows where the image has none.
        top_prob: ``(N,)`` calibrated probability of the most probable full path, NaN where there is no embedding;
            None when there is no model at all (the order is then coverage only).
    """

    task_ids: list[int]
    items: list[dict[str, Any]]
    emb: np.ndarray
    top_prob: np.ndarray | None


class LivePredictions:
    """The live model version of a project, predicting from the embedding cache.

    Args:
        settings: the process settings (``prefix_threshold``, image settings for the image keys).
        paths: the project's files.
        client: the project's Label Studio (image values relative to it are keyed by its origin).
        config: the project's current label config.

    Raises:
        BundleError: no live version, or one that cannot be loaded.
    """

    def __init__(self, settings: Settings, paths: ProjectPaths, client: LabelStudioClient, config: LabelConfig) -> None:
        self.settings, self.config = settings, config
        self.bundle = load_live(paths.models)
        self.version = str(self.bundle.manifest.version)
        self.predictor = Predictor(self.bundle, paths.cache, device="cpu")
        self.fetcher = ImageFetcher(settings, client)
        try:
            self.index: dict[str, str] = json.loads(paths.images_index.read_text())
        except (FileNotFoundError, ValueError):
            self.index = {}
        self.same_taxonomy = self.bundle.taxonomy == config.taxonomy
        if not self.same_taxonomy:
            log.warning("Project %s: model %s was trained on other labels than the current label config; paths "
                        "outside the config are left empty.", paths.project_id, self.version)

    def _hash(self, task: TaskRecord) -> str | None:
        value = task.data.get(self.config.image_key) if isinstance(task.data, dict) else None
        if not isinstance(value, str) or not value.strip():
            return None
        return self.index.get(self.fetcher.key(value))

    def predict(self, tasks: Sequence[TaskRecord]) -> TaskPredictions:
        """Items, embeddings and top path probabilities for ``tasks``."""
        n = len(tasks)
        cache = self.predictor.cache
        assert cache is not None
        dim = int(self.bundle.manifest.embedding_dim)
        emb = np.full((n, dim), np.nan, dtype=np.float32)  # (N, D)
        top = np.full(n, np.nan, dtype=np.float64)  # (N,)
        preds: list[Any] = [None] * n
        keyed = [(i, h) for i, h in enumerate(self._hash(t) for t in tasks) if h]
        if keyed:
            got, found = cache.get([h for _, h in keyed])  # (M, D), (M,)
            rows = np.array([i for i, _ in keyed], dtype=np.int64)[found]
            emb[rows] = got[found]
            if len(rows):
                logits = self.predictor.level_logits(emb[rows])  # L tensors (R, K_k)
                row_hashes = [h for (_, h), hit in zip(keyed, found) if hit]
                decoded, top[rows] = self.predictor.decode_rows(logits, row_hashes, self.config.leafs_only,
                                                                self.settings.prefix_threshold)
                for row, pred in zip(rows.tolist(), decoded):
                    preds[row] = pred if self.same_taxonomy else self._to_config(pred)
        items = [prediction_result(self.config, p, self.version) for p in preds]
        return TaskPredictions([t.id for t in tasks], items, emb, top)

    def _to_config(self, pred: Any) -> _Named | None:
        try:
            return _Named(self.config.taxonomy.resolve(pred.path), float(pred.score))
        except TaxomocoError:
            return None


@dataclass(frozen=True)
class _Named:
    """A prediction's path in the current config's canonical form (what /predict does for a changed config)."""

    path: tuple[str, ...]
    score: float
