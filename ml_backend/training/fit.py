"""The training job's model step: the candidates compared by cross-validation, the best one's heads fitted.

Every training cross-validates the enabled candidates (``MODEL_CANDIDATES``, ``model.heads.candidates``) on the
consensus labels of readable images with ``CV_FOLDS`` folds (``model.heads.selection``) and fits the winner's
heads on all of them; the winner's out-of-fold logits give the calibration temperature and the metrics, and
the choice with every candidate's score goes into ``metrics["model_choice"]``.

With the same encoder and nearly the same labels as the last cross-validation (``ml_backend.training.calibration``)
the last choice and temperature are reused: only the final heads train, and the cross-validation of that
candidate runs after publishing.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ml_backend.paths import ProjectPaths
from ml_backend.settings import Settings
from ml_backend.training.calibration import ReuseDecision, decide_reuse, label_digests, read_calibration
from ml_backend.training.encoder import Encoder
from ml_backend.training.features import Features
from ml_backend.training.images import ProjectImages
from ml_backend.training.labels import Labels, labels_shortfall
from ml_backend.training.pull import ProjectSource
from model.errors import DataError
from model.heads.candidates import CANDIDATES, Candidate, parse_candidates
from model.heads.heads import HeadsConfig
from model.heads.selection import cross_validate_candidate, path_folds, select_and_fit
from model.heads.training import FitResult, labelled_rows

__all__ = ["Fit", "cross_validate_after_publish", "fit_heads"]

log = logging.getLogger(__name__)


@dataclass
class Fit:
    """The chosen model's heads and the tasks it was trained on (rows of ``oof_level_probs``)."""

    result: FitResult
    task_ids: list[int]
    pairs: list[tuple[str, tuple[str, ...]]]  # (content hash, path) training pairs
    rows: list[int]  # rows of the features (images order) trained on
    candidate: Candidate  # the model chosen (model.heads.candidates)
    choice: dict[str, Any]  # model.heads.selection.Selection.to_dict(), or the reused one


def fit_heads(settings: Settings, paths: ProjectPaths, source: ProjectSource, labels: Labels,
              images: ProjectImages, features: Features, ok: np.ndarray, encoder: Encoder
              ) -> tuple[Fit, ReuseDecision]:
    """Choose the model among the candidates and fit its heads on the consensus labels of readable images."""
    start = time.perf_counter()
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
    taxonomy = source.config.taxonomy
    pairs = [(images.hashes[i], p) for i, p in zip(rows, targets)]
    labelled_index, encoded, _ = labelled_rows(features[next(iter(features))][rows], targets, taxonomy)
    num_classes = [taxonomy.num_classes(k) for k in range(taxonomy.depth)]
    enabled = parse_candidates(settings.model_candidates)
    record = read_calibration(paths)
    reuse = decide_reuse(record, encoder.version, label_digests(pairs), settings.calibration_reuse_fraction)
    if reuse.reuse and record is not None:
        kept = CANDIDATES.get(record.candidate)
        if kept is None or kept not in enabled or kept.features not in features:
            reuse = ReuseDecision(False, f"the last chosen model {record.candidate} is not among the candidates now",
                                  reuse.changed_fraction)
    log.info("Project %s: calibration %s (%s).", paths.project_id, "reused" if reuse.reuse else "cross-validated first",
             reuse.reason)
    if reuse.reuse:
        assert record is not None
        candidate = CANDIDATES[record.candidate]
        x = features[candidate.features][rows]
        heads = candidate.train(x, encoded, num_classes, HeadsConfig())
        choice = dict(record.metrics.get("model_choice") or {"chosen": candidate.name})
        metrics = {**record.metrics, "n_labelled": len(rows), "model_choice": choice,
                   "calibration": {"from_version": record.model_version, "n_labelled": record.n_labelled,
                                   "changed_fraction": reuse.changed_fraction}}
        result = FitResult(heads, record.temperature, [], [], [], metrics, labelled_index, encoded,
                           time.perf_counter() - start)
        return Fit(result, task_ids, pairs, rows, candidate, choice), reuse
    selection, heads = select_and_fit({s: f[rows] for s, f in features.items()}, enabled, encoded, taxonomy,
                                      folds=settings.cv_folds, labelled_index=labelled_index, heads_cfg=HeadsConfig())
    candidate = selection.chosen
    log.info("Project %s: model choice %s (%s).", paths.project_id, candidate.name, selection.reason)
    cv = selection.cv
    choice = selection.to_dict()
    metrics = {**cv.metrics, "model_choice": choice}
    result = FitResult(heads, cv.temperature, cv.oof_level_probs, cv.oof_level_logits, cv.oof_predictions, metrics,
                       cv.labelled_index, cv.targets, time.perf_counter() - start, cv.fold_of)
    return Fit(result, task_ids, pairs, rows, candidate, choice), reuse


def cross_validate_after_publish(settings: Settings, fit: Fit, features: Features, source: ProjectSource) -> Fit:
    """The cross-validation a reused calibration skipped, of the kept candidate only: out-of-fold probabilities for
    the disagreement flags and the temperature and metrics the next retrain reuses. The published heads stay."""
    x = features[fit.candidate.features][fit.rows]
    taxonomy = source.config.taxonomy
    fold_of = path_folds(fit.result.targets, min(settings.cv_folds, len(fit.rows)))
    cv = cross_validate_candidate(fit.candidate, x, fit.result.targets, taxonomy, fold_of, fit.result.labelled_index,
                                  HeadsConfig())
    metrics = {**cv.metrics, "model_choice": fit.choice}
    result = dataclasses.replace(fit.result, temperature=cv.temperature, oof_level_probs=cv.oof_level_probs,
                                 oof_level_logits=cv.oof_level_logits, oof_predictions=cv.oof_predictions,
                                 metrics=metrics, labelled_index=cv.labelled_index, targets=cv.targets,
                                 fold_of=cv.fold_of)
    return dataclasses.replace(fit, result=result)
