"""Metrics of taxonomy predictions: per level, hierarchical, and calibration; all as JSON-able dicts.

* Per level: accuracy, macro and per-class precision / recall / F1, and the confusion matrix (rows = true
  class, columns = predicted class, in ``taxonomy.class_names(k)`` order). Rows whose target is IGNORE at a
  level are skipped there. The predicted class of a level comes from the decoded (consistent) best path.
* Hierarchical hP / hR / hF (Kiritchenko et al. 2006), micro-averaged: each path is replaced by the set of
  its prefixes (the node and all its ancestors). When an annotator gave only a prefix, the prediction is
  compared down to that depth only (what lies below was not said).
* Calibration: expected calibration error (ECE, equal-width bins) and a reliability curve of the path
  confidence, where the event is "the predicted path agrees with everything the annotator said".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from model.arrays import FloatArray, IntArray
from model.errors import DataError
from model.heads.calibration import path_nll
from model.heads.decode import LevelLogits, PathPrediction, decode
from model.taxonomy import IGNORE, Path, Taxonomy

__all__ = ["calibration", "evaluate", "hierarchical_prf", "level_metrics", "true_paths"]


def level_metrics(y_true: IntArray, y_pred: IntArray, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro/per-class P/R/F1 and confusion matrix of one level.

    Args:
        y_true: ``(N,)`` true class indices, IGNORE rows skipped.
        y_pred: ``(N,)`` predicted class indices.
        class_names: the K class names of the level.

    Returns:
        ``{"n", "accuracy", "macro": {precision, recall, f1}, "per_class": {name: {precision, recall, f1,
        support}}, "confusion": K x K list, "classes": names}``. Macro averages run over the classes that
        occur in the targets or the predictions.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    keep = y_true != IGNORE
    y_true, y_pred = y_true[keep], y_pred[keep]
    k = len(class_names)
    confusion = np.zeros((k, k), dtype=np.int64)  # (K, K): rows true, columns predicted
    np.add.at(confusion, (y_true, y_pred), 1)
    tp = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    active = (support > 0) | (predicted > 0)
    n = int(keep.sum())

    def mean(a: FloatArray) -> float:
        return float(a[active].mean()) if active.any() else 0.0

    return {
        "n": n,
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "macro": {"precision": mean(precision), "recall": mean(recall), "f1": mean(f1)},
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
        "confusion": confusion.tolist(),
        "classes": list(class_names),
    }


def _prefixes(path: Sequence[str]) -> set[Path]:
    return {tuple(path[: d + 1]) for d in range(len(path))}


def hierarchical_prf(true_paths: Sequence[Path], pred_paths: Sequence[Path], true_is_prefix: Sequence[bool]) -> dict[str, Any]:
    """Micro-averaged hierarchical precision, recall and F1.

    Args:
        true_paths: the annotators' paths (full, or a prefix).
        pred_paths: the predicted paths, aligned.
        true_is_prefix: per row, whether the true path stops at an inner node (the prediction is then
            truncated to its depth).

    Returns:
        ``{"hP", "hR", "hF"}``.
    """
    inter = n_pred = n_true = 0
    for t, p, partial in zip(true_paths, pred_paths, true_is_prefix):
        p = p[: len(t)] if partial else p
        ts, ps = _prefixes(t), _prefixes(p)
        inter += len(ts & ps)
        n_pred += len(ps)
        n_true += len(ts)
    hp = inter / n_pred if n_pred else 0.0
    hr = inter / n_true if n_true else 0.0
    hf = 2 * hp * hr / (hp + hr) if hp + hr > 0 else 0.0
    return {"hP": hp, "hR": hr, "hF": hf}


def calibration(confidence: FloatArray, correct: FloatArray, n_bins: int = 10) -> dict[str, Any]:
    """Expected calibration error and reliability curve over equal-width confidence bins.

    Args:
        confidence: ``(N,)`` predicted probabilities in [0, 1].
        correct: ``(N,)`` 1 where the prediction was right.
        n_bins: number of bins over (0, 1].

    Returns:
        ``{"ece", "bins": [{"lo", "hi", "count", "confidence", "accuracy"}]}`` (empty bins have count 0 and
        null averages).
    """
    confidence = np.clip(np.asarray(confidence, dtype=np.float64), 0.0, 1.0)
    correct = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)  # (N,) bin (lo, hi]
    bins, ece = [], 0.0
    n = len(confidence)
    for b in range(n_bins):
        m = which == b
        count = int(m.sum())
        conf: float | None = None
        acc: float | None = None
        if count:
            conf, acc = float(confidence[m].mean()), float(correct[m].mean())
            ece += count / n * abs(conf - acc)
        bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": count, "confidence": conf,
                     "accuracy": acc})
    return {"ece": float(ece), "bins": bins}


def _true_path(row: IntArray, taxonomy: Taxonomy) -> tuple[Path, bool]:
    """The path a target row names, and whether it stops at an inner node (a prefix)."""
    known = [k for k in range(taxonomy.depth) if row[k] != IGNORE]
    depth = max(known) + 1
    last = int(row[depth - 1])
    if taxonomy.has_end[depth - 1] and last == taxonomy.end_index(depth - 1):  # END: walk back to the leaf
        depth = min(k for k in range(depth) if taxonomy.has_end[k] and row[k] == taxonomy.end_index(k))
        last = int(row[depth - 1])
    node = taxonomy.levels[depth - 1][last]
    return node.path, not node.is_leaf


def true_paths(targets: IntArray, taxonomy: Taxonomy) -> list[tuple[Path, bool]]:
    """Per labelled target row ``(N, L)``: the path it names and whether that stops at an inner node (a prefix)."""
    return [_true_path(r, taxonomy) for r in np.asarray(targets)]


def evaluate(
    level_logits: LevelLogits,
    targets: IntArray,
    taxonomy: Taxonomy,
    temperature: float = 1.0,
    n_bins: int = 10,
    predictions: Sequence[PathPrediction] | None = None,
) -> dict[str, Any]:
    """All metrics of (out-of-fold) predictions against their targets.

    Args:
        level_logits: L arrays ``(N, K_k)``.
        targets: ``(N, L)`` from ``Taxonomy.encode_many``; all-IGNORE rows are skipped.
        taxonomy: the taxonomy of the heads.
        temperature: the calibration temperature applied before decoding.
        n_bins: bins of the reliability curve.
        predictions: the full-path decoding of ``level_logits`` when the caller already has it.

    Returns:
        ``{"n", "path_accuracy", "nll", "levels": [level_metrics...], "hierarchical": {hP, hR, hF},
        "calibration": {ece, bins}, "temperature"}``.

    Raises:
        DataError: no labelled row, or targets not aligned with the logits.
    """
    targets = np.asarray(targets)
    n_all = targets.shape[0]
    if targets.ndim != 2 or targets.shape[1] != taxonomy.depth or any(len(a) != n_all for a in level_logits):
        raise DataError(
            f"Targets {targets.shape} and logits {[tuple(np.shape(a)) for a in level_logits]} are not aligned "
            f"rows of a {taxonomy.depth}-level taxonomy; pass encode_many of the same rows."
        )
    rows = np.flatnonzero((targets != IGNORE).any(axis=1))
    if len(rows) == 0:
        raise DataError("No labelled rows to evaluate; label some images first.")
    if predictions is None:
        predictions = decode(level_logits, taxonomy, leafs_only=True, temperature=temperature)
    preds = [predictions[i] for i in rows]
    targets = targets[rows]
    pred_index = taxonomy.encode_many([p.path for p in preds])  # (n, L)

    levels = [
        {"level": k, **level_metrics(targets[:, k], pred_index[:, k], taxonomy.class_names(k))}
        for k in range(taxonomy.depth)
    ]
    truths = [_true_path(r, taxonomy) for r in targets]
    hier = hierarchical_prf([t for t, _ in truths], [p.path for p in preds], [partial for _, partial in truths])
    # Confidence of the event the annotation can check: the predicted path down to the annotated depth.
    conf, correct = [], []
    for (t, partial), p in zip(truths, preds):
        d = len(t) if partial else len(p.path)
        conf.append(p.level_scores[d - 1] if partial else p.score)
        correct.append(float(p.path[:d] == t if partial else p.path == t))
    arrays = [a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a) for a in level_logits]
    nll = path_nll([a[rows] for a in arrays], targets, taxonomy, temperature)  # (n,)
    return {
        "n": int(len(rows)),
        "path_accuracy": float(np.mean(correct)),
        "nll": float(np.mean(nll)),
        "levels": levels,
        "hierarchical": hier,
        "calibration": calibration(np.array(conf), np.array(correct), n_bins),
        "temperature": float(temperature),
    }
