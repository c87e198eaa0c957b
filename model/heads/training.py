"""Heads training on cached embeddings with out-of-fold calibration and evaluation.

``fit`` runs k-fold cross-validation over the labelled images (:func:`cross_validate`) to get an honest
(out-of-fold) prediction for every one of them, fits the calibration temperature and computes the metrics on
those, then trains the final heads on all labelled images. The out-of-fold level probabilities also feed the
disagreement detection. A retrain on nearly the same labels may reuse an earlier temperature
(``fit(..., temperature=t)``): only the final heads train, and the cross-validation can run later.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.special import softmax
from tqdm.auto import tqdm

from model.arrays import FloatArray, IntArray
from model.errors import DataError
from model.evaluation import evaluate
from model.heads.calibration import fit_temperature
from model.heads.decode import PathPrediction, decode
from model.heads.heads import HeadsConfig, TaxonomyHeads
from model.heads.mlp_training import train_heads
from model.taxonomy import IGNORE, Taxonomy

__all__ = [
    "CrossValidation",
    "FitResult",
    "calibrated_cv",
    "cross_validate",
    "fit",
    "heads_logits",
    "labelled_rows",
    "predict",
    "stratified_folds",
]


@dataclass
class FitResult:
    """What :func:`fit` learned.

    Attributes:
        heads: the final heads, trained on every labelled image (eval mode).
        temperature: calibration temperature fitted on the out-of-fold logits (1.0 without folds).
        oof_level_probs: per level ``(N_lab, K_k)`` out-of-fold probabilities, temperature applied; rows
            follow ``labelled_index``. Empty when there were too few labels for folds.
        oof_level_logits: the raw out-of-fold logits behind ``oof_level_probs``.
        oof_predictions: decoded out-of-fold full-path predictions (calibrated), aligned with the rows.
        metrics: :func:`model.evaluation.evaluate` of the out-of-fold predictions, plus ``folds``,
            ``n_labelled``, ``ece_uncalibrated``; ``{}`` without folds.
        labelled_index: ``(N_lab,)`` positions of the labelled rows in the input.
        targets: ``(N_lab, L)`` encoded paths of the labelled rows.
        seconds: wall time of the whole fit.
        fold_of: ``(N_lab,)`` cross-validation fold of each labelled row (empty without folds).
    """

    heads: TaxonomyHeads
    temperature: float
    oof_level_probs: list[FloatArray]
    oof_level_logits: list[FloatArray]
    oof_predictions: list[PathPrediction]
    metrics: dict[str, Any]
    labelled_index: IntArray
    targets: IntArray
    seconds: float
    fold_of: IntArray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def stratified_folds(strata: IntArray, folds: int, seed: int) -> IntArray:
    """Fold id per row ``(N,)``: rows of each stratum are shuffled and dealt round-robin over the folds.

    Works for any stratum size (a class with 2 rows lands in 2 folds); fold sizes differ by at most one.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(strata))
    order = order[np.argsort(strata[order], kind="stable")]  # grouped by stratum, shuffled within
    fold_of = np.empty(len(strata), dtype=np.int64)
    fold_of[order] = np.arange(len(strata)) % folds
    return fold_of


def _check_classes(targets: IntArray, taxonomy: Taxonomy, labelled: Sequence[Sequence[str]]) -> None:
    """Raise DataError unless some level has labels of at least two classes."""
    if any(len(np.unique(targets[targets[:, k] != IGNORE, k])) >= 2 for k in range(taxonomy.depth)):
        return
    seen = sorted({"/".join(taxonomy.resolve(p)) for p in labelled})
    tops = {taxonomy.resolve(p)[0] for p in labelled}
    others = [n.name for n in taxonomy.levels[0] if n.name not in tops]
    if not others:  # a single top-level label: ask for a second class one level down
        known = {c for k in range(taxonomy.depth) for c in taxonomy.class_names(k) if c in seen}
        others = [c for k in range(1, taxonomy.depth) for c in taxonomy.class_names(k) if c not in known]
    raise DataError(
        f"All {len(targets)} labelled images have the same class ({', '.join(seen)}); a classifier needs labels "
        f"of at least two classes. Label a few images of another class next, e.g. {others[:5]}."
    )


def heads_logits(heads: TaxonomyHeads, emb: torch.Tensor, batch: int = 8192) -> list[FloatArray]:
    """Eval-mode logits per level for ``emb (N, D)``: L arrays ``(N, K_k)`` float32."""
    heads.eval()
    with torch.inference_mode():
        parts = [heads(emb[i : i + batch]) for i in range(0, max(len(emb), 1), batch)]  # one part when empty
    return [torch.cat([p[k] for p in parts]).numpy() for k in range(len(heads.num_classes))]


@dataclass
class CrossValidation:
    """Out-of-fold predictions of the labelled images and what they give (see :func:`cross_validate`).

    Attributes: as the fields of the same name in :class:`FitResult`.
    """

    temperature: float
    oof_level_probs: list[FloatArray]
    oof_level_logits: list[FloatArray]
    oof_predictions: list[PathPrediction]
    metrics: dict[str, Any]
    labelled_index: IntArray
    targets: IntArray
    fold_of: IntArray


def labelled_rows(emb: FloatArray, paths: Sequence[Sequence[str] | None], taxonomy: Taxonomy
              ) -> tuple[IntArray, IntArray, torch.Tensor]:
    """Validated ``(labelled_index (N_lab,), targets (N_lab, L), x (N_lab, D))`` of the labelled rows.

    Raises:
        DataError: misaligned inputs, no labelled row, or labels of fewer than two classes.
    """
    if emb.ndim != 2 or emb.shape[0] != len(paths):
        raise DataError(
            f"Got {emb.shape[0] if emb.ndim else 0} embeddings of shape {emb.shape} for {len(paths)} paths; pass "
            "one (N, D) row per image and one path (or None) per image."
        )
    labelled_index = np.array([i for i, p in enumerate(paths) if p is not None], dtype=np.int64)
    if len(labelled_index) == 0:
        raise DataError("No image is labelled yet; label at least two images of two different classes.")
    targets = taxonomy.encode_many([paths[i] for i in labelled_index])  # (N_lab, L)
    _check_classes(targets, taxonomy, [paths[i] for i in labelled_index])
    return labelled_index, targets, torch.from_numpy(emb[labelled_index])  # (N_lab, D)


def cross_validate(
    emb: FloatArray,
    paths: Sequence[Sequence[str] | None],
    taxonomy: Taxonomy,
    cfg: HeadsConfig | None = None,
    folds: int = 5,
    progress: bool = False,
    device: str | torch.device = "cpu",
) -> CrossValidation:
    """k-fold cross-validation of the heads: an honest (out-of-fold) prediction for every labelled image, the
    calibration temperature fitted on them, and their metrics.

    Args: as for :func:`fit`. With fewer than 2 usable folds the temperature is 1.0 and nothing else is filled.

    Raises:
        DataError: misaligned inputs, an unknown path, or labels of fewer than two classes.
    """
    cfg = cfg or HeadsConfig()
    emb = np.asarray(emb, dtype=np.float32)
    labelled_index, targets, x = labelled_rows(emb, paths, taxonomy)
    n = len(labelled_index)
    k = min(folds, n)
    cv = CrossValidation(1.0, [], [], [], {}, labelled_index, targets, np.zeros(0, dtype=np.int64))
    if k < 2:
        return cv
    fold_of = stratified_folds(targets[:, 0], k, cfg.seed)
    level_logits = [np.zeros((n, taxonomy.num_classes(lv)), dtype=np.float32) for lv in range(taxonomy.depth)]
    for f in tqdm(range(k), desc="cross-validation", disable=not progress):
        held = fold_of == f
        heads = train_heads(x[~held], targets[~held], taxonomy, cfg, device=device)
        for lv, out in enumerate(heads_logits(heads, x[held])):
            level_logits[lv][held] = out
    return calibrated_cv(level_logits, targets, taxonomy, labelled_index, fold_of)


def calibrated_cv(level_logits: Sequence[FloatArray], targets: IntArray, taxonomy: Taxonomy, labelled_index: IntArray,
                  fold_of: IntArray) -> CrossValidation:
    """A :class:`CrossValidation` from out-of-fold logits (L arrays ``(N_lab, K_k)``): the temperature fitted on
    them, the calibrated decoding, the metrics (``folds`` = the number of distinct folds)."""
    cv = CrossValidation(1.0, [], [], [], {}, labelled_index, targets, fold_of)
    cv.temperature = float(fit_temperature(level_logits, targets, taxonomy))
    cv.oof_level_logits = list(level_logits)
    cv.oof_predictions = decode(level_logits, taxonomy, leafs_only=True, temperature=cv.temperature)
    metrics = evaluate(level_logits, targets, taxonomy, cv.temperature, predictions=cv.oof_predictions)
    raw = evaluate(level_logits, targets, taxonomy, 1.0)
    metrics["ece_uncalibrated"] = raw["calibration"]["ece"]
    metrics["nll_uncalibrated"] = raw["nll"]
    metrics["folds"] = len(np.unique(fold_of))
    metrics["n_labelled"] = len(labelled_index)
    cv.metrics = metrics
    cv.oof_level_probs = [softmax(a.astype(np.float64) / cv.temperature, axis=1).astype(np.float32) for a in level_logits]
    return cv


def fit(
    emb: FloatArray,
    paths: Sequence[Sequence[str] | None],
    taxonomy: Taxonomy,
    cfg: HeadsConfig | None = None,
    folds: int = 5,
    progress: bool = False,
    device: str | torch.device = "cpu",
    temperature: float | None = None,
) -> FitResult:
    """Train calibrated heads with out-of-fold evaluation.

    Args:
        emb: embeddings ``(N, D)`` of all images (labelled or not).
        paths: per image its taxonomy path (full or prefix), or None when unlabelled.
        taxonomy: the label tree.
        cfg: heads hyper-parameters.
        folds: cross-validation folds (clipped to the number of labelled images; stratified by top level).
            With fewer than 2 usable folds the temperature stays 1.0 and ``metrics`` is empty.
        progress: show progress bars.
        device: where the heads train (see :func:`model.heads.mlp_training.train_heads`).
        temperature: a calibration temperature to reuse (from an earlier :func:`cross_validate` on nearly the
            same labels): no cross-validation runs, only the final heads train; the out-of-fold fields stay
            empty and ``metrics`` holds ``n_labelled`` only.

    Returns:
        A :class:`FitResult`.

    Raises:
        DataError: misaligned inputs, an unknown path, or labels of fewer than two classes.
    """
    start = time.perf_counter()
    cfg = cfg or HeadsConfig()
    emb = np.asarray(emb, dtype=np.float32)
    if temperature is None:
        cv = cross_validate(emb, paths, taxonomy, cfg, folds, progress, device)
    else:
        labelled_index, targets, _ = labelled_rows(emb, paths, taxonomy)
        cv = CrossValidation(float(temperature), [], [], [], {}, labelled_index, targets, np.zeros(0, dtype=np.int64))
    x = torch.from_numpy(emb[cv.labelled_index])  # (N_lab, D)
    heads = train_heads(x, cv.targets, taxonomy, cfg, progress=progress, device=device)
    metrics = dict(cv.metrics)
    metrics["n_labelled"] = len(cv.labelled_index)
    return FitResult(
        heads=heads,
        temperature=float(cv.temperature),
        oof_level_probs=cv.oof_level_probs,
        oof_level_logits=cv.oof_level_logits,
        oof_predictions=cv.oof_predictions,
        metrics=metrics,
        labelled_index=cv.labelled_index,
        targets=cv.targets,
        seconds=time.perf_counter() - start,
        fold_of=cv.fold_of,
    )


def predict(
    heads: TaxonomyHeads,
    temperature: float,
    emb: FloatArray,
    taxonomy: Taxonomy,
    leafs_only: bool = True,
    prefix_threshold: float = 0.5,
    top_k: int = 1,
) -> list[PathPrediction]:
    """Calibrated path predictions for embeddings ``(N, D)`` (see :func:`model.heads.decode.decode`)."""
    emb = np.asarray(emb, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[1] != heads.in_dim:
        raise DataError(
            f"Embeddings of shape {emb.shape} do not fit heads trained on dimension {heads.in_dim}; embed the "
            "images with the encoder of the same model version."
        )
    logits = heads_logits(heads, torch.from_numpy(emb))
    return decode(logits, taxonomy, leafs_only, prefix_threshold, temperature, top_k)

