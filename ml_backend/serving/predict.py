"""The /predict pipeline: label config -> served model -> task images -> one batch -> one result item per task.

Used by ``ml_backend.http.app``. A task whose image cannot be fetched or decoded gets an empty item (and a log
line with the task id and the reason), never a failed batch; images whose embedding is cached are not
decoded at all; a model trained on other labels than the current config gives empty items for paths the
config no longer has. Before a project has a model, its live propagation version (``PROPAGATION``) answers: each
task's stored propagated path, by task id (``ml_backend.serving.propagated``).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, cast

from cachetools import LRUCache

from ml_backend.http.metrics import Registry
from ml_backend.labelstudio import connections
from ml_backend.labelstudio.label_config import LabelConfig, parse_label_config
from ml_backend.labelstudio.results import prediction_result
from ml_backend.net.images import ImageFetcher, TaskImage, is_remote
from ml_backend.prelabel.propagated import propagated_path
from ml_backend.serving.propagated import PropagatedStore
from ml_backend.serving.store import UNTRAINED, ModelStore
from ml_backend.serving.training_state import TrainingStates
from ml_backend.settings import Settings
from model.errors import ConfigError, TaxomocoError
from model.predictor import Predictor

__all__ = ["PredictService"]

log = logging.getLogger(__name__)

MAX_PROJECTS_CACHED = 64
"""Label configs and image fetchers kept in memory (least recently used ones are dropped)."""


@dataclass(frozen=True)
class _Named:
    path: tuple[str, ...]
    score: float


class PredictService:
    """The /predict pipeline of one app: config -> served model -> images -> one batch -> result items.

    Args:
        settings: the process settings (limits, ``prefix_threshold``).
        store: where the served model of each project comes from.
        metrics: counters of predictions and failed images.
        states: the projects' last trainings; predictions carry the version as /setup reports it (with the
            reason of a failed training, ``ml_backend.serving.training_state``).
    """

    def __init__(self, settings: Settings, store: ModelStore, metrics: Registry,
                 states: TrainingStates | None = None) -> None:
        self.settings, self.store, self.metrics = settings, store, metrics
        self.states = states or TrainingStates(settings)
        self.propagated = PropagatedStore(settings)
        self.load_wait_s = settings.predict_load_wait_s
        # model forwards running at once: more only oversubscribe the cores and starve /health of the GIL
        self._slots = threading.BoundedSemaphore(settings.predict_concurrency)
        # bounded: label configs and clients of the projects seen last (a config may be megabytes)
        self._schemas: LRUCache[int, str] = LRUCache(MAX_PROJECTS_CACHED)
        self._fetchers: LRUCache[connections.LSConnection, ImageFetcher] = LRUCache(MAX_PROJECTS_CACHED)
        self._same_taxonomy: LRUCache[tuple[str, str], bool] = LRUCache(4 * MAX_PROJECTS_CACHED)
        self._lock = threading.Lock()

    def remember_schema(self, project_id: int, schema: str) -> None:
        """Keep /setup's label config for /predict calls that do not carry one."""
        with self._lock:
            self._schemas[int(project_id)] = schema

    def version(self, project_id: int) -> str:
        """The version this process serves for the project (what ``/setup`` reports, before the training-state
        label): the model's, else the live propagation version, else ``untrained``; fast."""
        version = self.store.version(project_id)
        if version == UNTRAINED:
            return self.propagated.version(project_id) or UNTRAINED
        return version

    def predict(self, project_id: int, tasks: list[Any], label_config: str | None) -> tuple[list[dict[str, Any]], str]:
        """One result item per task, in order, and the version they were computed with.

        Before a model is served: the propagated items of the live propagation version, else an empty list.

        Raises:
            ConfigError: no label config (neither in the body nor from /setup), or one that cannot be served.
        """
        with self._lock:
            remembered = self._schemas.get(project_id)
        xml = label_config or remembered
        if not xml:
            raise ConfigError(
                f'No label config for project {project_id}: send "label_config" in /predict (Label Studio does) '
                "or call /setup first."
            )
        config = parse_label_config(xml)
        model = self.store.get(project_id, wait_s=self.load_wait_s)
        if model is None:
            return self._propagated(project_id, tasks, config)
        version = self.states.label(project_id, model.version)  # what /setup reports for this model
        values = [_image_value(task, config.image_key) for task in tasks]
        images = self._fetcher(project_id, values).fetch_task_images(values)
        # the server's store loads Predictors (default_loader); ServedModel is the part the store itself needs
        preds = self._run(cast(Predictor, model), images, config)
        pid = str(project_id)
        out: list[dict[str, Any]] = []
        for task, image, pred in zip(tasks, images, preds):
            if image.error is not None:
                self.metrics.failed_images.labels(pid, image.reason or "other").inc()
                task_id = task.get("id") if isinstance(task, dict) else None
                log.warning("project %s task %s: no prediction: %s", project_id, task_id, image.error)
            out.append(prediction_result(config, pred, version))
        self._count(pid, sum(p is not None for p in preds), len(preds))
        return out, version

    def _count(self, pid: str, made: int, asked: int) -> None:
        """The request's predictions and empty items, one counter step each (not one per task)."""
        if made:
            self.metrics.predictions.labels(pid).inc(made)
        if asked > made:
            self.metrics.empty_predictions.labels(pid).inc(asked - made)

    def _propagated(self, project_id: int, tasks: list[Any], config: LabelConfig) -> tuple[list[dict[str, Any]], str]:
        """The live propagation version's item of each task (empty where it holds none); no predictions without one."""
        propagated = self.propagated.get(project_id)
        if propagated is None:
            return [], self.states.label(project_id, self.store.version(project_id))
        version = self.states.label(project_id, propagated.version)
        out: list[dict[str, Any]] = []
        made = 0
        for task in tasks:
            task_id = task.get("id") if isinstance(task, dict) else None
            found = propagated_path(propagated, task_id, config) if isinstance(task_id, int) else None
            made += found is not None
            out.append(prediction_result(config, found, version))
        self._count(str(project_id), made, len(tasks))
        return out, version

    def _run(self, model: Predictor, images: list[TaskImage], config: LabelConfig) -> list[Any]:
        """Predictions for the fetched images; ``images[i]`` is replaced by a failed one where decoding failed."""
        items = [(t.data, t.content_hash) if t.data is not None and t.content_hash else None for t in images]
        with self._slots:
            preds, errors = model.predict_encoded(
                items, leafs_only=config.leafs_only, prefix_threshold=self.settings.prefix_threshold,
                max_pixels=self.settings.image_max_pixels, batch_pixels=self.settings.predict_max_pixels)
        for i, reason in errors.items():
            images[i] = TaskImage(None, None, reason, "decode")
        if self._taxonomy_matches(model, config):
            return list(preds)
        return [self._to_config(p, config) for p in preds]

    def _taxonomy_matches(self, model: Any, config: LabelConfig) -> bool:
        key = (model.version, config.config_hash)
        with self._lock:
            known = self._same_taxonomy.get(key)
        if known is None:
            same = model.taxonomy == config.taxonomy
            if not same:
                log.warning(
                    "model %s was trained on other labels than the current label config; predictions outside the "
                    "config are left empty until the next training",
                    model.version,
                )
            with self._lock:
                self._same_taxonomy[key] = same
            return same
        return known

    @staticmethod
    def _to_config(pred: Any, config: LabelConfig) -> Any:
        if pred is None:
            return None
        try:
            return _Named(config.taxonomy.resolve(pred.path), float(pred.score))
        except TaxomocoError:
            return None

    def _fetcher(self, project_id: int, values: list[str | None]) -> ImageFetcher:
        """The image fetcher of the project's Label Studio (one per connection, kept for the next request)."""
        if not any(is_remote(v) for v in values):
            return ImageFetcher(self.settings)
        try:
            conn = connections.resolve(self.settings, project_id)
        except ConfigError as exc:
            log.warning("project %s: %s", project_id, exc)
            return ImageFetcher(self.settings)
        with self._lock:
            fetcher = self._fetchers.get(conn)
            if fetcher is None:
                fetcher = self._fetchers[conn] = ImageFetcher(self.settings, conn.client())
        return fetcher


def _image_value(task: Any, key: str) -> str | None:
    data = task.get("data") if isinstance(task, dict) else None
    value = data.get(key) if isinstance(data, dict) else None
    return value if isinstance(value, str) and value.strip() else None
