"""The training job's model step: the candidates compared by cross-validation, the best one's heads fitted.

Every training cross-validates the enabled candidates (``MODEL_CANDIDATES``, ``model.heads.candidates``) on the
consensus labels of readable images with ``CV_FOLDS`` folds (``model.heads.selection``) and fits the winner's
heads on all of them; the winner's out-of-fold logits give the calibration temperature and the metrics, and
the choice with every candidate's score goes into ``metrics["model_choice"]``.

With the same encoder and nearly the same labels as the last cross-validation (``ml_backend.training.calibration``)
the last choice and temperature are reused: only the final heads train, and the cross-validation of that
candidate runs after publishing. With more label changes but the same encoder, and fewer than
:data:`RESELECT_GROWTH` times the labels the last model choice was made on, only the chosen candidate is
cross-validated before publishing (a new temperature; the choice stands): under a stream of labels this is the
common case, and the whole comparison cost four to five times as much (the MLP candidate alone 10 of 15 s on
300 labels, ``bench/results/retrain_latency.txt``).

The final logistic-regression heads start their solver from the live version's heads when these read the same
features (``live_start``): the penalised problem has one optimum, so the heads are the same to the solver's
tolerance, in a fraction of the iterations (``bench/linear_warm_start.py``). Cross-validation folds always start from
zero, so no fold's solver starts from heads that saw its held-out labels.

The folds keep duplicate images together (:func:`duplicate_units`: byte-identical images, and the near-duplicate
groups of the last neighbour step), so no candidate is scored on an image whose copy it trained on.
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
from ml_backend.training.calibration import (
    CalibrationRecord,
    ReuseDecision,
    decide_reuse,
    label_digests,
    read_calibration,
)
from ml_backend.training.encoder import Encoder
from ml_backend.training.features import Features, source_version
from ml_backend.training.images import ProjectImages
from ml_backend.training.labels import Labels, labels_shortfall
from ml_backend.training.neighbors import read_duplicates
from ml_backend.training.pull import ProjectSource
from model.bundle import live_version, load_live
from model.errors import BundleError, DataError
from model.heads.candidates import CANDIDATES, Candidate, HeadKind, parse_candidates
from model.heads.heads import HeadsConfig, TaxonomyHeads
from model.heads.selection import cross_validate_candidate, path_folds, select_and_fit
from model.heads.training import FitResult, labelled_rows
from model.neighbors.duplicates import duplicate_groups
from model.paired_gain import GainRule
from model.taxonomy import Taxonomy

__all__ = ["RESELECT_GROWTH", "Fit", "cross_validate_after_publish", "duplicate_units", "fit_heads", "live_start"]

log = logging.getLogger(__name__)

RESELECT_GROWTH = 1.5
"""The candidates are compared again once the labels reach this multiple of those the last choice was made on."""


def duplicate_units(paths: ProjectPaths, task_ids: list[int], keys: list[str]) -> np.ndarray:
    """One group id per labelled row ``(N_lab,)``: rows whose images are byte-identical (same content hash) or in one
    near-duplicate group of the last neighbour step (``GET /duplicates``) share an id; every other row has its own."""
    try:
        saved = read_duplicates(paths).get("groups", [])
    except DataError:  # no neighbour step yet: exact duplicates only
        saved = []
    near = [(a, b, 1.0) for g in saved if isinstance(g, dict) for a, b in zip(g.get("keys", []), g.get("keys", [])[1:])]
    unit = np.arange(len(task_ids), dtype=np.int64)
    row = {tid: i for i, tid in enumerate(task_ids)}
    for gid, group in enumerate(duplicate_groups(task_ids, keys, near)):
        unit[[row[t] for t in group.items]] = len(task_ids) + gid
    return unit


def live_start(settings: Settings, paths: ProjectPaths, candidate: Candidate, encoder: Encoder,
               taxonomy: Taxonomy) -> TaxonomyHeads | None:
    """The live version's heads as the start of ``candidate``'s solver when it fits a logistic regression on the
    features the live heads read, for the same taxonomy; else None (a cold start)."""
    if candidate.head is not HeadKind.LINEAR or live_version(paths.models) is None:
        return None
    try:
        bundle = load_live(paths.models)
    except (BundleError, OSError) as exc:  # the live version is checked where it is served; here it is only a start
        log.warning("Project %s: the live heads cannot seed the solver (%s); fitting from zero.", paths.project_id, exc)
        return None
    same = (bundle.manifest.taxonomy_hash == taxonomy.hash()
            and bundle.features_version == source_version(settings, candidate.features, encoder))
    return bundle.heads if same else None


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
        seed = live_start(settings, paths, candidate, encoder, taxonomy)
        heads = candidate.train(x, encoded, num_classes, HeadsConfig(), seed)
        choice = dict(record.metrics.get("model_choice") or {"chosen": candidate.name})
        metrics = {**record.metrics, "n_labelled": len(rows), "model_choice": choice,
                   "calibration": {"from_version": record.model_version, "n_labelled": record.n_labelled,
                                   "changed_fraction": reuse.changed_fraction}}
        result = FitResult(heads, record.temperature, [], [], [], metrics, labelled_index, encoded,
                           time.perf_counter() - start)
        return Fit(result, task_ids, pairs, rows, candidate, choice), reuse
    groups = duplicate_units(paths, task_ids, [h for h, _ in pairs])
    kept = _kept_candidate(record, encoder, enabled, features, len(rows))
    if kept is not None:  # the same choice on a new temperature: its cross-validation only
        assert record is not None
        x = features[kept.features][rows]
        fold_of = path_folds(encoded, min(settings.cv_folds, len(rows)), groups=groups)
        heads = kept.train(x, encoded, num_classes, HeadsConfig(), live_start(settings, paths, kept, encoder, taxonomy))
        cv = cross_validate_candidate(kept, x, encoded, taxonomy, fold_of, labelled_index, HeadsConfig())
        candidate = kept
        choice = dict(record.metrics.get("model_choice") or {"chosen": kept.name})
        log.info("Project %s: model choice %s kept (made on %s labels, now %d), recalibrated.", paths.project_id,
                 kept.name, choice.get("n_labelled", record.n_labelled), len(rows))
    else:
        selection, heads = select_and_fit({s: f[rows] for s, f in features.items()}, enabled, encoded, taxonomy,
                                          folds=settings.cv_folds, labelled_index=labelled_index,
                                          heads_cfg=HeadsConfig(), groups=groups,
                                          rule=GainRule(settings.model_choice))
        candidate = selection.chosen
        log.info("Project %s: model choice %s (%s).", paths.project_id, candidate.name, selection.reason)
        cv = selection.cv
        choice = {**selection.to_dict(), "n_labelled": len(rows)}
    metrics = {**cv.metrics, "model_choice": choice}
    result = FitResult(heads, cv.temperature, cv.oof_level_probs, cv.oof_level_logits, cv.oof_predictions, metrics,
                       cv.labelled_index, cv.targets, time.perf_counter() - start, cv.fold_of)
    return Fit(result, task_ids, pairs, rows, candidate, choice), reuse


def _kept_candidate(record: CalibrationRecord | None, encoder: Encoder, enabled: list[Candidate], features: Features,
                    n_labelled: int) -> Candidate | None:
    """The last chosen candidate when the choice stands (same encoder, still enabled, fewer than
    :data:`RESELECT_GROWTH` times the labels it was made on), else None: compare the candidates again."""
    if record is None or record.encoder_version != encoder.version:
        return None
    kept = CANDIDATES.get(record.candidate)
    if kept is None or kept not in enabled or kept.features not in features:
        return None
    made_on = int((record.metrics.get("model_choice") or {}).get("n_labelled") or record.n_labelled)
    return kept if n_labelled < RESELECT_GROWTH * max(made_on, 1) else None


def cross_validate_after_publish(settings: Settings, paths: ProjectPaths, fit: Fit, features: Features,
                                 source: ProjectSource) -> Fit:
    """The cross-validation a reused calibration skipped, of the kept candidate only: out-of-fold probabilities for
    the disagreement flags and the temperature and metrics the next retrain reuses. The published heads stay."""
    x = features[fit.candidate.features][fit.rows]
    taxonomy = source.config.taxonomy
    groups = duplicate_units(paths, fit.task_ids, [h for h, _ in fit.pairs])
    fold_of = path_folds(fit.result.targets, min(settings.cv_folds, len(fit.rows)), groups=groups)
    cv = cross_validate_candidate(fit.candidate, x, fit.result.targets, taxonomy, fold_of, fit.result.labelled_index,
                                  HeadsConfig())
    metrics = {**cv.metrics, "model_choice": fit.choice}
    result = dataclasses.replace(fit.result, temperature=cv.temperature, oof_level_probs=cv.oof_level_probs,
                                 oof_level_logits=cv.oof_level_logits, oof_predictions=cv.oof_predictions,
                                 metrics=metrics, labelled_index=cv.labelled_index, targets=cv.targets,
                                 fold_of=cv.fold_of)
    return dataclasses.replace(fit, result=result)
