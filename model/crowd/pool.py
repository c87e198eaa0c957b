"""How likely each class is right, robust to annotators who err together: Dawid–Skene blended with a linear pool.

Dawid–Skene (:mod:`model.crowd.dawid_skene`) multiplies the evidence of the annotators and the model as if their
mistakes were independent given the true class. When they are not (a hard image misleads several annotators and
the model the same way) the product is overconfident exactly where a person should look, and "three annotators
agree" outranks "the model doubts it". A *linear* opinion pool (the weighted average of each source's opinion,
the form of CROWDLAB's consensus quality, Goh et al. 2022) stays calibrated under such dependence but wastes
independent evidence. This module computes, per taxonomy level::

    review(c) = omega * posterior(c) + (1 - omega) * pool(c)

where ``posterior`` is the Dawid–Skene posterior (with the model as a witness) and ``pool`` the weighted average of
the model's probabilities and each annotator's vote:

* each annotator's vote puts its estimated accuracy ``accuracy_a`` on the class given and the rest evenly on the
  other classes, and weighs ``max(1 - (1 - accuracy_a) / baseline, eps)``;
* the model's probabilities weigh ``max(1 - error_model / baseline, eps) * sqrt(mean annotators per item)``,

with ``accuracy_a`` the annotator's Dawid–Skene accuracy, ``error_model`` how often the model's top class differs
from the consensus on items with two or more annotators, and ``baseline`` the error of always answering the most
frequent consensus class (so a source no better than that weighs nothing). ``omega`` is chosen from the data, per
level: on items with two or more annotators, each annotator's label is predicted from the others and the model
(leave-one-annotator-out; ``P(label) = sum_c review_-a(c) * confusion_a[c, label]``) and ``omega`` maximises the
log-likelihood of those held-out labels. Annotators whose mistakes are independent give ``omega = 1`` (plain
Dawid–Skene); mistakes shared with each other or the model pull it down.

The consensus class itself stays the Dawid–Skene one; the review probabilities rank what to re-check and score
each given label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.special import softmax

from model.arrays import BoolArray, FloatArray, IntArray
from model.crowd.dawid_skene import CrowdFit, Observations

__all__ = ["BLEND_GRID", "MAX_HELD_OUT_CELLS", "ReviewFit", "review_posterior"]

BLEND_GRID = np.linspace(0.0, 1.0, 21)
"""Candidate values of ``omega`` (ties go to the larger, i.e. to plain Dawid–Skene)."""
MAX_HELD_OUT_CELLS = 4_000_000
"""Held-out labels × classes scored when choosing ``omega`` (a seeded sample of items beyond that)."""
_EPS = 1e-6


@dataclass(frozen=True)
class ReviewFit:
    """The review probabilities of one level.

    Attributes:
        posterior: ``(N, K)`` blended probability of each true class per item (rows of the Dawid–Skene
            posterior where no annotator labelled the level).
        blend: ``omega``, the weight of the Dawid–Skene posterior (1: no dependence found).
        model_weight: the model's weight in the pool, or None without a model.
        annotator_weight: ``(A,)`` each annotator's weight in the pool.
        held_out: labels held out to choose ``omega`` (0: too few items with two annotators; ``omega`` = 1).
    """

    posterior: FloatArray
    blend: float
    model_weight: float | None
    annotator_weight: FloatArray
    held_out: int


def review_posterior(
    obs: Observations, fit: CrowdFit, n_items: int, n_annotators: int, n_classes: int,
    model_probs: FloatArray | None = None, seed: int = 0,
) -> ReviewFit:
    """The blended review probabilities of one level (see the module doc).

    Args:
        obs: the level's labels, as given to :func:`model.crowd.dawid_skene.fit_crowd`.
        fit: its result.
        n_items: N.
        n_annotators: A.
        n_classes: K.
        model_probs: ``(N, K)`` the model's out-of-sample probabilities (zero rows: no opinion), or None.
        seed: seeds the sample of held-out items when there are more than ``MAX_HELD_OUT_CELLS`` allow.
    """
    N, A, K = n_items, n_annotators, n_classes
    T = fit.posterior  # (N, K)
    if K < 2 or len(obs.item) == 0:
        return ReviewFit(T, 1.0, None, np.zeros(A), 0)
    # One row per (item, annotator) pair: its class shares (the annotator's weights, normalised to sum 1).
    keys, pair_of = np.unique(obs.item * A + obs.annotator, return_inverse=True)  # (Q,), (E,)
    pairs = _Pairs(keys // A, keys % A, pair_of, _row_normalised(
        sparse.csr_matrix((obs.weight, (pair_of, obs.label)), shape=(len(keys), K))))
    n_per_item = np.bincount(pairs.item, minlength=N)  # (N,) annotators with a label at this level
    labelled = n_per_item > 0
    multi = n_per_item > 1
    basis = multi if multi.any() else labelled

    cons = T.argmax(axis=1)  # (N,)
    baseline = max(1.0 - np.bincount(cons[basis], minlength=K).max() / basis.sum(), _EPS)
    accuracy = np.nan_to_num(np.asarray(fit.accuracy, dtype=np.float64), nan=1.0 / K)  # (A,)
    weight = np.clip(1.0 - (1.0 - accuracy) / baseline, _EPS, None)  # (A,)
    right = np.clip(accuracy, 1.0 / K, 1.0)  # (A,) each vote's mass on the class given
    wrong = (1.0 - right) / (K - 1)  # (A,) ... and on each other class

    # Pool numerator (N, K) and total weight (N,): the annotators' votes, then the model.
    w_pair = weight[pairs.annot]  # (Q,)
    gain = sparse.csr_matrix(((weight * (right - wrong))[pairs.annot], (pairs.item, np.arange(len(keys)))),
                             shape=(N, len(keys)))
    num = np.bincount(pairs.item, weights=w_pair * wrong[pairs.annot], minlength=N)[:, None] + np.asarray(
        (gain @ pairs.share).todense())
    total = np.bincount(pairs.item, weights=w_pair, minlength=N).astype(np.float64)  # (N,)
    model_w: float | None = None
    if model_probs is not None:
        P = np.asarray(model_probs, dtype=np.float64)  # (N, K)
        has_model = P.sum(axis=1) > 0  # (N,)
        rows = basis & has_model
        if rows.any():
            err = float(np.mean(P[rows].argmax(axis=1) != cons[rows]))
            model_w = max(1.0 - err / baseline, _EPS) * float(np.sqrt(n_per_item[labelled].mean()))
            num += model_w * np.where(has_model[:, None], P, 0.0)
            total += model_w * has_model
    pool = num / np.maximum(total, _EPS)[:, None]  # (N, K)

    blend, held = _choose_blend(obs, fit, T, num, total, pairs, weight, right, wrong, multi, seed)
    posterior = np.where(labelled[:, None], blend * T + (1.0 - blend) * pool, T)
    return ReviewFit(posterior, blend, model_w, weight, held)


@dataclass(frozen=True)
class _Pairs:
    """The (item, annotator) pairs of a level: ``item``, ``annot`` ``(Q,)``; ``of`` ``(E,)`` the pair of each label;
    ``share`` ``(Q, K)`` sparse, the pair's class weights summing to 1."""

    item: IntArray
    annot: IntArray
    of: IntArray
    share: sparse.csr_matrix


def _row_normalised(m: sparse.csr_matrix) -> sparse.csr_matrix:
    out: sparse.csr_matrix = sparse.csr_matrix(m.multiply(1.0 / np.asarray(m.sum(axis=1))))
    return out


def _choose_blend(
    obs: Observations, fit: CrowdFit, T: FloatArray, num: FloatArray, total: FloatArray, pairs: _Pairs,
    weight: FloatArray, right: FloatArray, wrong: FloatArray, multi: BoolArray, seed: int,
) -> tuple[float, int]:
    """``omega`` maximising the leave-one-annotator-out log-likelihood of the labels on items with 2+ annotators."""
    K = T.shape[1]
    entries = np.flatnonzero(multi[obs.item])  # (E',) labels on items with another annotator
    if len(entries) == 0:
        return 1.0, 0
    budget = max(MAX_HELD_OUT_CELLS // K, 1)
    if len(entries) > budget:  # a seeded sample of whole items, as many as the budget holds
        items, per_item = np.unique(obs.item[entries], return_counts=True)
        order = np.random.default_rng(seed).permutation(len(items))
        fits = np.cumsum(per_item[order]) <= budget
        fits[0] = True
        entries = entries[np.isin(obs.item[entries], items[order[fits]])]
    annot, label, w_entry = obs.annotator[entries], obs.label[entries], obs.weight[entries]
    used, local = np.unique(pairs.of[entries], return_inverse=True)  # the (item, annotator) pairs held out
    conf = None if fit.confusion is None else np.asarray(fit.confusion)  # (A, K, K); None: one-coin, many classes
    log_cols = _log_columns(conf, fit.accuracy, annot, label, K)  # (E', K) log P(label | true c)

    # (Q', K) each: Dawid–Skene without the pair's labels, and the pool without the pair's vote.
    removed = np.zeros((len(used), K))
    np.add.at(removed, local, log_cols * w_entry[:, None])
    items, who = pairs.item[used], pairs.annot[used]
    t_out = softmax(np.log(np.clip(T[items], 1e-300, None)) - removed, axis=1)
    vote = wrong[who][:, None] + (right - wrong)[who][:, None] * pairs.share[used].toarray()
    w = weight[who][:, None]
    p_out = (num[items] - w * vote) / np.maximum(total[items][:, None] - w, _EPS)

    # P(label | the rest) = sum_c review(c) * P(label | c), with the label's own annotator's confusion column.
    cols = np.exp(log_cols)
    a_t = (t_out[local] * cols).sum(axis=1)  # (E',)
    a_p = (p_out[local] * cols).sum(axis=1)
    scores = [float((w_entry * np.log(np.clip(b * a_t + (1 - b) * a_p, 1e-300, None))).sum()) for b in BLEND_GRID]
    best = max(range(len(BLEND_GRID)), key=lambda j: (round(scores[j], 9), j))
    return float(BLEND_GRID[best]), len(entries)


def _log_columns(conf: FloatArray | None, accuracy: FloatArray, annot: IntArray, label: IntArray, K: int) -> FloatArray:
    """``(E, K)``: log P(given ``label`` | true class c) for each entry's annotator, every c."""
    if conf is not None:
        return np.log(np.clip(conf[annot, :, label], 1e-300, None))
    acc = np.clip(np.nan_to_num(accuracy[annot], nan=1.0 / K), _EPS, 1 - _EPS)  # (E,)
    out = np.repeat(np.log((1.0 - acc) / (K - 1))[:, None], K, axis=1)
    out[np.arange(len(label)), label] = np.log(acc)
    return out
