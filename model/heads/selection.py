"""Choosing the model to publish: every candidate cross-validated on the same folds, the best by hierarchical F1.

:func:`select` deals the labelled images into ``folds`` folds stratified by their full label path (a class with
a single label lands in one fold: its held-out image cannot be predicted by any candidate, which is fair to
all; duplicate images, when the caller names them, share a fold), trains each candidate's heads on the other
folds (``model.heads.candidates``), and scores the held-out predictions, decoded as they would be served, by
micro hierarchical F1 (``model.evaluation``): per fold, then mean ± standard deviation over the folds.

The winner is chosen by :func:`pick` under a :class:`~model.paired_gain.GainRule` (``model.paired_gain``, shared
with the propagation choice): the best candidate is the one with the highest mean hF, and a candidate of lower rank
(cheaper, simpler) wins instead when the best one's paired per-fold gain over it does not clear the rule's bar
(``mean``: :data:`TIE_MARGIN`; ``one-se``: also one standard error of the paired gains). Its out-of-fold logits
give the calibration temperature and the metrics of the published version (``model.heads.training.calibrated_cv``),
so the selection costs no second cross-validation. Features are computed once per feature source by the caller
and heads are small, so the cost is ``folds x candidates`` head fits.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from model.arrays import FloatArray, IntArray
from model.errors import DataError
from model.evaluation import hierarchical_prf, true_paths
from model.heads.candidates import Candidate, FeatureSource
from model.heads.heads import HeadsConfig, TaxonomyHeads
from model.heads.training import CrossValidation, calibrated_cv, heads_logits, stratified_folds
from model.paired_gain import TIE_MARGIN, GainRule, paired_gain, required_gain
from model.taxonomy import Taxonomy

__all__ = [
    "TIE_MARGIN",
    "CandidateScore",
    "Selection",
    "cross_validate_candidate",
    "path_folds",
    "pick",
    "select",
    "select_and_fit",
]

@dataclass
class CandidateScore:
    """A candidate's cross-validated quality.

    Attributes:
        name: the candidate.
        hf_mean: mean over folds of the held-out hierarchical F1; ``hf_std`` its standard deviation.
        fold_hf: hF of each fold.
        path_accuracy: held-out full-path accuracy over all folds.
        seconds: wall time of its cross-validation.
    """

    name: str
    hf_mean: float
    hf_std: float
    fold_hf: list[float]
    path_accuracy: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"hF_mean": round(self.hf_mean, 4), "hF_std": round(self.hf_std, 4),
                "fold_hF": [round(x, 4) for x in self.fold_hf], "path_accuracy": round(self.path_accuracy, 4),
                "seconds": round(self.seconds, 3)}


@dataclass
class Selection:
    """What :func:`select` decided.

    Attributes:
        chosen: the winner.
        reason: one sentence: why it won.
        scores: every candidate's score, in rank order.
        folds: the number of folds.
        cv: the winner's cross-validation (calibration temperature, out-of-fold probabilities, metrics).
        skipped: candidates that could not run, and why (e.g. no previous encoder).
        rule: the bar a better-scoring candidate had to clear to beat a simpler one.
        cvs: every candidate's cross-validation (``cv`` is the winner's), for reports and benchmarks.
    """

    chosen: Candidate
    reason: str
    scores: dict[str, CandidateScore]
    folds: int
    cv: CrossValidation
    skipped: dict[str, str] = field(default_factory=dict)
    rule: GainRule = GainRule.ONE_SE
    cvs: dict[str, CrossValidation] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (manifest metrics, reports, ``/job_status``)."""
        return {"chosen": self.chosen.name, "reason": self.reason, "folds": self.folds, "rule": self.rule.value,
                "tie_margin": TIE_MARGIN,
                "candidates": {n: s.to_dict() for n, s in self.scores.items()}, "skipped": dict(self.skipped)}


def path_folds(targets: IntArray, folds: int, seed: int = 0, groups: IntArray | None = None) -> IntArray:
    """Fold id ``(N,)`` per labelled row, stratified by the full target row (its label path).

    Args:
        targets: ``(N, L)`` encoded label paths.
        folds: number of folds.
        seed: assignment seed.
        groups: ``(N,)`` optional group id per row (e.g. duplicate images): rows of one group land in the same
            fold, so a held-out image is never scored by a model trained on its own duplicate. A group is
            stratified by its first row's path. With fewer than 2 groups the rows are dealt one by one.
    """
    _, strata = np.unique(np.asarray(targets), axis=0, return_inverse=True)
    strata = np.asarray(strata).reshape(-1)
    if groups is None:
        return stratified_folds(strata, folds, seed)
    _, first, unit = np.unique(np.asarray(groups), return_index=True, return_inverse=True)
    if len(first) < 2:
        return stratified_folds(strata, folds, seed)
    unit_fold = stratified_folds(strata[first], folds, seed)  # (G,) one fold per group
    fold_of: IntArray = unit_fold[np.asarray(unit).reshape(-1)]
    return fold_of


def cross_validate_candidate(candidate: Candidate, x: FloatArray, targets: IntArray, taxonomy: Taxonomy,
                             fold_of: IntArray, labelled_index: IntArray | None = None,
                             heads_cfg: HeadsConfig | None = None) -> CrossValidation:
    """Out-of-fold logits of one candidate on features ``x (N_lab, D)`` → calibrated :class:`CrossValidation`."""
    n = len(targets)
    num_classes = [taxonomy.num_classes(k) for k in range(taxonomy.depth)]
    level_logits = [np.zeros((n, kk), dtype=np.float32) for kk in num_classes]  # L x (N_lab, K_k)
    for f in np.unique(fold_of):
        held = fold_of == f
        heads = candidate.train(x[~held], targets[~held], num_classes, heads_cfg)
        for lv, out in enumerate(heads_logits(heads, torch.from_numpy(np.ascontiguousarray(x[held])))):
            level_logits[lv][held] = out
    index = np.arange(n) if labelled_index is None else labelled_index
    return calibrated_cv(level_logits, targets, taxonomy, index, fold_of)


def _score(name: str, cv: CrossValidation, taxonomy: Taxonomy, seconds: float) -> CandidateScore:
    truths = true_paths(cv.targets, taxonomy)
    per_fold = []
    for f in np.unique(cv.fold_of):
        rows = np.flatnonzero(cv.fold_of == f)
        hier = hierarchical_prf([truths[i][0] for i in rows], [cv.oof_predictions[i].path for i in rows],
                                [truths[i][1] for i in rows])
        per_fold.append(float(hier["hF"]))
    return CandidateScore(name, float(np.mean(per_fold)), float(np.std(per_fold)), per_fold,
                          float(cv.metrics.get("path_accuracy", 0.0)), seconds)


def select(features: Mapping[FeatureSource, FloatArray], candidates: Sequence[Candidate], targets: IntArray,
           taxonomy: Taxonomy, folds: int = 3, labelled_index: IntArray | None = None,
           heads_cfg: HeadsConfig | None = None, seed: int = 0, groups: IntArray | None = None,
           rule: GainRule = GainRule.ONE_SE) -> Selection:
    """Cross-validate every candidate whose features are given and choose one (see the module docstring).

    Args:
        features: labelled rows' features ``(N_lab, D_source)`` per feature source (the same rows in each).
        candidates: the candidates to compare; those whose source is missing are skipped (and listed).
        targets: ``(N_lab, L)`` from ``Taxonomy.encode_many``.
        taxonomy: the label tree.
        folds: cross-validation folds (at most one per labelled image).
        labelled_index: positions of the rows in the caller's arrays (kept in the winner's ``cv``).
        heads_cfg: hyper-parameters of the MLP heads.
        seed: fold assignment seed.
        groups: ``(N_lab,)`` optional group per row kept within one fold (duplicate images; see :func:`path_folds`).
        rule: the bar the best candidate's paired gain must clear to beat a simpler one (:func:`pick`).

    Raises:
        DataError: fewer than two labelled rows, or no candidate with features.
    """
    targets = np.asarray(targets)
    n = len(targets)
    k = min(int(folds), n)
    if k < 2:
        raise DataError(f"Cross-validation needs at least 2 labelled images (got {n}); label a few more.")
    runnable = sorted((c for c in candidates if c.features in features), key=lambda c: c.rank)
    skipped = {c.name: f"no {c.features.value} features in this training" for c in candidates if c not in runnable}
    if not runnable:
        raise DataError(f"None of the candidates {[c.name for c in candidates]} has features in this training.")
    fold_of = path_folds(targets, k, seed, groups)
    cvs: dict[str, CrossValidation] = {}
    scores: dict[str, CandidateScore] = {}
    for c in runnable:
        start = time.perf_counter()
        x = np.asarray(features[c.features], dtype=np.float32)
        if len(x) != n:
            raise DataError(f"{c.name}: {len(x)} feature rows for {n} labelled images; pass the same rows.")
        cvs[c.name] = cross_validate_candidate(c, x, targets, taxonomy, fold_of, labelled_index, heads_cfg)
        scores[c.name] = _score(c.name, cvs[c.name], taxonomy, time.perf_counter() - start)
    chosen, reason = pick(runnable, scores, rule)
    return Selection(chosen, reason, scores, k, cvs[chosen.name], skipped, rule, cvs)


def pick(runnable: Sequence[Candidate], scores: Mapping[str, CandidateScore], rule: GainRule) -> tuple[Candidate, str]:
    """The winner among ``runnable`` (scored on the same folds) and one sentence why.

    The best is the highest mean hF (the lower rank on equal means); the lowest-rank candidate whose paired per-fold
    deficit to the best does not clear ``rule``'s bar (``model.paired_gain``) wins instead.
    """
    ranked = sorted(runnable, key=lambda c: c.rank)
    best = max(ranked, key=lambda c: (scores[c.name].hf_mean, -c.rank))
    b = scores[best.name]
    k = len(b.fold_hf)
    for c in ranked:
        if c is best:
            break
        gain, se = paired_gain(b.fold_hf, scores[c.name].fold_hf)
        need = required_gain(rule, se)
        if gain <= need:
            s = scores[c.name]
            return c, (f"{c.name} ({s.hf_mean:.3f} ± {s.hf_std:.3f} over {k} folds) ties with {best.name} "
                       f"({b.hf_mean:.3f}: paired gain {gain:+.3f} hF on the same folds, not above {need:.3f}, "
                       f"rule {rule.value}) and is the simpler, cheaper model")
    others = sorted((o for o in ranked if o is not best), key=lambda o: -scores[o.name].hf_mean)
    tied = [o.name for o in ranked if o.rank > best.rank and scores[o.name].hf_mean >= b.hf_mean - TIE_MARGIN]
    head = (f"{best.name} has the highest cross-validated hierarchical F1, {b.hf_mean:.3f} ± {b.hf_std:.3f} "
            f"over {k} folds")
    if tied:
        return best, (f"{head}, tied with {', '.join(tied)} (within {TIE_MARGIN}): the simpler, cheaper model wins "
                      f"(rule {rule.value})")
    runner = f"; next: {others[0].name} {scores[others[0].name].hf_mean:.3f}" if others else ""
    return best, f"{head}{runner}, clearing the bar of rule {rule.value}"


def select_and_fit(features: Mapping[FeatureSource, FloatArray], candidates: Sequence[Candidate], targets: IntArray,
                   taxonomy: Taxonomy, folds: int = 3, labelled_index: IntArray | None = None,
                   heads_cfg: HeadsConfig | None = None, groups: IntArray | None = None,
                   rule: GainRule = GainRule.ONE_SE) -> tuple[Selection, TaxonomyHeads]:
    """:func:`select`, then the winner's heads trained on every labelled row (what gets published)."""
    selection = select(features, candidates, targets, taxonomy, folds, labelled_index, heads_cfg, groups=groups,
                       rule=rule)
    num_classes = [taxonomy.num_classes(k) for k in range(taxonomy.depth)]
    x = np.asarray(features[selection.chosen.features], dtype=np.float32)
    return selection, selection.chosen.train(x, np.asarray(targets), num_classes, heads_cfg)
