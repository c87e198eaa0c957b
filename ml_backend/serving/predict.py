"""The /predict pipeline: label config -> served model -> task images -> one batch -> one result item per task.

Used by ``ml_backend.http.app``. A task whose image cannot be fetched or decoded gets an empty item (and a log
line with the task id and the reason), never a failed batch; images whose embedding is cached are not
decoded at all; a model trained on other labels than the current config gives empty items for paths the
config no longer has.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ml_backend.http.metrics import Registry
from ml_backend.labelstudio import connections
from ml_backend.labelstudio.client import LabelStudioClient
from ml_backend.labelstudio.label_config import LabelConfig, parse_label_config
from ml_backend.labelstudio.results import prediction_result
from ml_backend.net.images import TaskImage, fetch_task_images, is_remote
from ml_backend.serving.store import ModelStore
from ml_backend.settings import Settings
from model.errors import ConfigError, TaxomocoError

__all__ = ["PredictService"]

log = logging.getLogger(__name__)


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
    """

    def __init__(self, settings: Settings, store: ModelStore, metrics: Registry) -> None:
        self.settings, self.store, self.metrics = settings, store, metrics
        self.load_wait_s = settings.predict_load_wait_s
        # model forwards running at once: more only oversubscribe the cores and starve /health of the GIL
        self._slots = threading.BoundedSemaphore(settings.predict_concurrency)
        # one pool of image threads for all requests: a pool per request multiplies threads under load
        self._image_pool = ThreadPoolExecutor(max_workers=max(1, settings.image_fetch_threads), thread_name_prefix="image-fetch")
        self._schemas: dict[int, str] = {}
        self._clients: dict[connections.LSConnection, Any] = {}
        self._same_taxonomy: dict[tuple[str, str], bool] = {}
        self._lock = threading.Lock()

    def remember_schema(self, project_id: int, schema: str) -> None:
        """Keep /setup's label config for /predict calls that do not carry one."""
        self._schemas[int(project_id)] = schema

    def predict(self, project_id: int, tasks: list[Any], label_config: str | None) -> tuple[list[dict], str]:
        """One result item per task, in order, and the version they were computed with.

        Returns an empty list (no predictions) while the project has no served model.

        Raises:
            ConfigError: no label config (neither in the body nor from /setup), or one that cannot be served.
        """
        xml = label_config or self._schemas.get(project_id)
        if not xml:
            raise ConfigError(
                f'No label config for project {project_id}: send "label_config" in /predict (Label Studio does) '
                "or call /setup first."
            )
        config = parse_label_config(xml)
        model = self.store.get(project_id, wait_s=self.load_wait_s)
        if model is None:
            return [], self.store.version(project_id)
        version = model.version
        values = [_image_value(task, config.image_key) for task in tasks]
        conn, headers = self._connection(project_id, values)
        images = fetch_task_images(values, self.settings, conn, headers, executor=self._image_pool)
        decoded = self._decode_uncached(model, images)  # updates images[i] where decoding failed
        preds = self._run(model, decoded, images, config)
        pid = str(project_id)
        out: list[dict] = []
        for task, image, pred in zip(tasks, images, preds):
            task_id = task.get("id") if isinstance(task, dict) else None
            if image.error is not None:
                self.metrics.failed_images.inc(pid, image.reason or "other")
                log.warning("project %s task %s: no prediction: %s", project_id, task_id, image.error)
            if pred is None:
                self.metrics.empty_predictions.inc(pid)
            else:
                self.metrics.predictions.inc(pid)
            out.append(prediction_result(config, pred, version))
        return out, version

    def _decode_uncached(self, model: Any, images: list[TaskImage]) -> list[Any]:
        """Decoded images for the tasks whose embedding is not cached; None for the others (and for failures,
        whose entry in ``images`` then says why)."""
        cached = model.cached([t.content_hash for t in images])  # (N,) bool
        decoded: list[Any] = []
        for i, task_image in enumerate(images):
            if cached[i]:
                decoded.append(None)
                continue
            image, images[i] = task_image.decode(self.settings.image_max_pixels)
            decoded.append(image)
        return decoded

    def _run(self, model: Any, batch: list[Any], images: list[TaskImage], config: LabelConfig) -> list[Any]:
        hashes = [t.content_hash for t in images]
        kwargs = {"leafs_only": config.leafs_only, "prefix_threshold": self.settings.prefix_threshold}
        try:
            with self._slots:
                preds = list(model.predict(batch, hashes, **kwargs))
        except Exception:  # isolate the image that breaks the batch; the others still get predictions
            log.exception("batch prediction of %d images failed; predicting one by one", len(batch))
            preds = []
            for image, h in zip(batch, hashes):
                try:
                    with self._slots:
                        preds.append(model.predict([image], [h], **kwargs)[0])
                except Exception as exc:
                    log.warning("prediction of one image failed: %s: %s", exc.__class__.__name__, exc)
                    preds.append(None)
        assert len(preds) == len(images), (len(preds), len(images))
        if self._taxonomy_matches(model, config):
            return preds
        return [self._to_config(p, config) for p in preds]

    def _taxonomy_matches(self, model: Any, config: LabelConfig) -> bool:
        key = (model.version, config.config_hash)
        if key not in self._same_taxonomy:
            same = model.taxonomy == config.taxonomy
            if not same:
                log.warning(
                    "model %s was trained on other labels than the current label config; predictions outside the "
                    "config are left empty until the next training",
                    model.version,
                )
            self._same_taxonomy[key] = same
        return self._same_taxonomy[key]

    @staticmethod
    def _to_config(pred: Any, config: LabelConfig) -> Any:
        if pred is None:
            return None
        try:
            return _Named(config.taxonomy.resolve(pred.path), float(pred.score))
        except TaxomocoError:
            return None

    def _connection(self, project_id: int, values: list[str | None]) -> tuple[connections.LSConnection | None, dict]:
        if not any(is_remote(v) for v in values):
            return None, {}
        try:
            conn = connections.resolve(self.settings, project_id)
        except ConfigError as exc:
            log.warning("project %s: %s", project_id, exc)
            return None, {}
        with self._lock:
            client = self._clients.get(conn)
            if client is None:
                client = self._clients[conn] = LabelStudioClient(conn.url, conn.api_key)
        try:
            return conn, client.auth_headers()
        except TaxomocoError as exc:
            log.warning("project %s: no Label Studio credentials for images: %s", project_id, exc)
            return conn, {}


def _image_value(task: Any, key: str) -> str | None:
    data = task.get("data") if isinstance(task, dict) else None
    value = data.get(key) if isinstance(data, dict) else None
    return value if isinstance(value, str) and value.strip() else None
