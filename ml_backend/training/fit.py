"""The training job's heads step: the heads fit on the consensus labels of readable images.

With the same encoder and nearly the same labels as the last cross-validation (``ml_backend.training.calibration``)
only the final heads train and the last temperature is reused; the cross-validation then runs after publishing.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np

from ml_backend.paths import ProjectPaths
from ml_backend.settings import Settings
from ml_backend.training.calibration import ReuseDecision, decide_reuse, label_digests, read_calibration
from ml_backend.training.encoder import Encoder
from ml_backend.training.images import ProjectImages
from ml_backend.training.labels import Labels, labels_shortfall
from ml_backend.training.pull import ProjectSource
from model.errors import DataError
from model.heads.heads import HeadsConfig
from model.heads.training import FitResult, cross_validate, fit

__all__ = ["Fit", "cross_validate_after_publish", "fit_heads"]

log = logging.getLogger(__name__)


@dataclass
class Fit:
    """The heads fit and the tasks it was trained on (rows of ``oof_level_probs``)."""

    result: FitResult
    task_ids: list[int]
    pairs: list[tuple[str, tuple[str, ...]]]  # (content hash, path) training pairs
    rows: list[int]  # rows of the embeddings (images order) trained on


def fit_heads(settings: Settings, paths: ProjectPaths, source: ProjectSource, labels: Labels,
              images: ProjectImages, emb: np.ndarray, ok: np.ndarray, encoder: Encoder) -> tuple[Fit, ReuseDecision]:
    """Fit the heads on the consensus labels of readable images.

    With the encoder and nearly the same labels as the last cross-validation (``ml_backend.training.calibration``),
    only the final heads train and the last temperature is reused; otherwise the out-of-fold
    cross-validation runs first.
    """
    rows, task_ids, targets = [], [], []
    for i, tid in enumerate(images.task_ids):
        path = labels.result.labels.get(tid)
        if path is not None and ok[i]:
            rows.append(i)
            task_ids.append(tid)
            targets.append(tuple(path))
    skip = labels_shortfall(dict(zip(task_ids, targets)), 2)
    if skip is not None:
        raise DataError(f"after dropping tasks whose image is unavailable: {skip}.")
    pairs = [(images.hashes[i], p) for i, p in zip(rows, targets)]
    record = read_calibration(paths)
    reuse = decide_reuse(record, encoder.version, label_digests(pairs), settings.calibration_reuse_fraction)
    log.info("Project %s: calibration %s (%s).", paths.project_id, "reused" if reuse.reuse else "cross-validated first",
             reuse.reason)
    if reuse.reuse:
        assert record is not None
        result = fit(emb[rows], targets, source.config.taxonomy, HeadsConfig(), temperature=record.temperature)
        result.metrics = {**record.metrics, "n_labelled": len(rows),
                          "calibration": {"from_version": record.model_version, "n_labelled": record.n_labelled,
                                          "changed_fraction": reuse.changed_fraction}}
    else:
        result = fit(emb[rows], targets, source.config.taxonomy, HeadsConfig())
    return Fit(result, task_ids, pairs, rows), reuse


def cross_validate_after_publish(fit: Fit, emb: np.ndarray, source: ProjectSource) -> Fit:
    """The cross-validation a reused calibration skipped: out-of-fold probabilities for the disagreement flags
    and the temperature and metrics the next retrain reuses. The published heads stay as they are."""
    paths = [p for _, p in fit.pairs]
    cv = cross_validate(emb[fit.rows], paths, source.config.taxonomy, HeadsConfig())
    result = dataclasses.replace(fit.result, temperature=cv.temperature, oof_level_probs=cv.oof_level_probs,
                                 oof_level_logits=cv.oof_level_logits, oof_predictions=cv.oof_predictions,
                                 metrics=dict(cv.metrics), labelled_index=cv.labelled_index, targets=cv.targets,
                                 fold_of=cv.fold_of)
    return dataclasses.replace(fit, result=result)
