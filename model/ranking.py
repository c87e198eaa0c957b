"""Which unlabelled image a person should label next: coverage while labels are few, then uncertainty.

The rule (``docs/design.md``, "The labeling loop"):

1. **Cold start** — no model yet, or fewer than ``cold_start_per_class`` labels per leaf class on average
   (``n_labelled < cold_start_per_class * n_leaves``): *typical coverage* on the self-supervised embeddings, in
   the spirit of TypiClust (Hacohen et al., 2022). In steps of one pick per leaf class, the L2-normalised
   embeddings of all images are clustered with k-means into (labelled + picked so far + step) clusters; clusters
   that hold no labelled or picked image give their most *typical* image (the highest inverse mean distance to its
   nearest neighbours in the cluster), the largest clusters first, until ``budget`` picks. Each prefix of the
   order is so a cover of its own size, as TypiClust's clustering into labelled + query size is. The score is the
   cluster's share of the images. Outliers, which plain k-center picks first, come last.
2. **Uncertainty** — otherwise, and for everything after the cold-start picks: least confidence of the
   calibrated full-path distribution, ``1 - max_path p(path | image)``, highest first; the first ``budget`` of
   them spread over the embedding space (:func:`diverse_uncertain`: the least confident image of each of
   ``budget`` clusters of the most uncertain ones). This is the order of
   Label Studio's own "Uncertainty sampling" and of the Data Manager's *Prediction score* column ascending, when
   the prediction score is the path probability (``leafsOnly`` configs).
3. Images without an embedding or a prediction (unreadable), and before any model the images after the
   cold-start picks, come last in the given order.

Everything here is numpy/scipy on arrays; ``ml_backend.prelabel`` brings the task ids and writes the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import faiss
import numpy as np

from model.arrays import BoolArray, FloatArray, IntArray
from model.neighbors.vectors import single_threaded

__all__ = ["Ranked", "Reason", "diverse_uncertain", "is_cold_start", "kmeans", "labeling_order", "least_confidence",
           "typical_cover"]

TYPICALITY_NEIGHBOURS = 20
"""Neighbours whose mean distance defines an image's typicality (TypiClust uses 20)."""

KMEANS_SAMPLE = 20_000
"""Images k-means is fitted on at most (a seeded sample; every image is then assigned to its nearest centroid)."""

POOL_FACTOR = 10
"""Diverse uncertainty sampling clusters the ``POOL_FACTOR * budget`` least confident images."""

TYPICALITY_SAMPLE = 2_000
"""Members of one cluster whose typicality is computed at most (a seeded sample of a larger cluster)."""


class Reason(str, Enum):
    """Why an image is where it is in the labeling order."""

    COVERAGE = "coverage"  # the most typical image of an unlabelled cluster (cold start)
    UNCERTAIN = "uncertain"  # the model's calibrated path distribution is unsure
    UNRANKED = "unranked"  # no embedding and no prediction (unreadable image): last


@dataclass(frozen=True)
class Ranked:
    """One image in the labeling order.

    Attributes:
        index: row in the arrays given to :func:`labeling_order`.
        reason: why it is here.
        score: coverage: the cluster's share of all images; uncertain: ``1 - top path probability``; else 0.
    """

    index: int
    reason: Reason
    score: float


def kmeans(x: FloatArray, k: int, seed: int = 0, iterations: int = 10, assign_to: FloatArray | None = None
           ) -> tuple[FloatArray, IntArray]:
    """k-means of the rows of ``x`` ``(N, D)`` (faiss, one thread, BLAS distances; scipy's k-means++ start costs
    O(k² N D) and took minutes at 10,000 images).

    Returns:
        ``(K, D)`` centroids and the nearest centroid of each row of ``assign_to`` (default ``x``): ``(M,)``.
    """
    single_threaded()
    data = np.ascontiguousarray(x, dtype=np.float32)
    k = max(1, min(int(k), len(data)))
    km = faiss.Kmeans(data.shape[1], k, niter=iterations, seed=seed, verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=1 << 30)
    km.train(data)
    rows = data if assign_to is None else np.ascontiguousarray(assign_to, dtype=np.float32)
    _, assign = km.index.search(rows, 1)  # (M, 1)
    return np.asarray(km.centroids, dtype=np.float64), assign[:, 0].astype(np.int64)


def least_confidence(top_prob: FloatArray) -> FloatArray:
    """``1 - p`` of the most probable path: ``(N,)`` in [0, 1], higher is less certain."""
    return 1.0 - np.clip(np.asarray(top_prob, dtype=np.float64), 0.0, 1.0)


def is_cold_start(n_labelled: int, n_leaves: int, has_model: bool, cold_start_per_class: float) -> bool:
    """Whether the order should still cover the embedding space rather than follow the model's uncertainty."""
    return not has_model or n_labelled < cold_start_per_class * max(1, n_leaves)


def _normalised(emb: FloatArray) -> FloatArray:
    emb = np.asarray(emb, dtype=np.float64)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    unit: FloatArray = emb / np.maximum(norms, 1e-12)
    return unit


def typical_cover(emb: FloatArray, labelled: BoolArray, budget: int, seed: int = 0, step: int = 0
                  ) -> list[tuple[int, float]]:
    """TypiClust-style picks: the most typical image of each cluster without a label, largest clusters first.

    With ``step`` > 0 the picks come in steps of ``step``, each from its own clustering into (covered rows +
    ``step``) clusters, the picks so far counting as labelled: every prefix of the order is then a cover of its own
    size (the first 10 picks are the typical images of 10 clusters, not the 10 largest of ``budget`` clusters, which
    may split one mode several times). ``step`` = 0: all picks from one clustering into labelled + ``budget``.

    Args:
        emb: ``(N, D)`` embeddings of every image (labelled ones included: they cover their clusters).
        labelled: ``(N,)`` bool, images that already have a label.
        budget: how many images to pick at most.
        seed: k-means seed (the order is deterministic for a given seed).
        step: picks per clustering (0: one clustering for the whole budget).

    Returns:
        ``[(row, cluster share of all images)]`` in pick order, rows among the unlabelled ones.
    """
    labelled = np.asarray(labelled, dtype=bool)
    budget = min(int(budget), int((~labelled).sum()))
    if budget <= 0:
        return []
    x = _normalised(emb)  # (N, D)
    rng = np.random.default_rng(seed)
    n = len(x)
    fit_rows = np.arange(n) if n <= KMEANS_SAMPLE else np.sort(rng.choice(n, KMEANS_SAMPLE, replace=False))
    taken = labelled.copy()
    picks: list[tuple[int, float]] = []
    while len(picks) < budget:
        want = budget - len(picks) if step <= 0 else min(int(step), budget - len(picks))
        got = _cover_step(x, fit_rows, taken, want, seed + len(picks), rng)
        if not got:
            break
        for row, _ in got:
            taken[row] = True
        picks += got
    return picks


def _cover_step(x: FloatArray, fit_rows: IntArray, taken: BoolArray, want: int, seed: int,
                rng: np.random.Generator) -> list[tuple[int, float]]:
    """Up to ``want`` typical images of the largest clusters without a taken image, from one k-means of ``x``
    into (taken + ``want``) clusters."""
    n = len(x)
    k = int(min(n, int(taken.sum()) + want))
    assign: IntArray
    if k <= 1:
        assign = np.zeros(n, dtype=np.int64)
        sizes = np.array([n])
    else:
        centroids, assign = kmeans(x[fit_rows], k, seed, assign_to=x)  # (K, D), (N,)
        sizes = np.bincount(assign, minlength=len(centroids))
    covered = set(assign[taken].tolist())
    order = sorted((c for c in range(len(sizes)) if c not in covered and sizes[c] > 0), key=lambda c: (-sizes[c], c))
    picks: list[tuple[int, float]] = []
    for c in order:
        members = np.flatnonzero((assign == c) & ~taken)
        if len(members) == 0:
            continue
        if len(members) > TYPICALITY_SAMPLE:
            members = np.sort(rng.choice(members, TYPICALITY_SAMPLE, replace=False))
        best = int(members[int(np.argmax(_typicality(x[members])))]) if len(members) > 1 else int(members[0])
        picks.append((best, float(sizes[c]) / n))
        if len(picks) == want:
            break
    return picks


def _typicality(unit: FloatArray) -> FloatArray:
    """``(m,)`` inverse mean distance of each row of ``unit`` ``(m, D)`` (L2-normalised) to its
    ``TYPICALITY_NEIGHBOURS`` nearest other rows. Distances from one matrix product (``|a - b|² = 2 - 2 a·b`` on
    the unit sphere) and a partial sort: at 2,000 members ~10x faster than ``cdist`` and a full sort."""
    m = min(TYPICALITY_NEIGHBOURS, len(unit) - 1)
    d = np.sqrt(np.maximum(2.0 - 2.0 * (unit @ unit.T), 0.0))  # (m, m)
    near = np.partition(d, m, axis=1)[:, :m + 1]  # the row itself (0) and its m nearest, unordered
    mean = (near.sum(axis=1) - near.min(axis=1)) / m  # without the smallest: the row itself
    out: FloatArray = 1.0 / (mean + 1e-12)
    return out


def diverse_uncertain(emb: FloatArray, unsure: FloatArray, budget: int, seed: int = 0) -> list[int]:
    """Uncertain *and* different images: the ``POOL_FACTOR * budget`` least confident rows are clustered into
    ``budget`` clusters (k-means on the L2-normalised embeddings) and each cluster gives its least confident row
    (diverse mini-batch active learning, Zhdanov 2019), so one labeling round does not spend itself on many copies
    of the same confusion.

    Args:
        emb: ``(N, D)`` embeddings of the candidate rows (no NaN).
        unsure: ``(N,)`` least confidence of each row.
        budget: picks wanted.
        seed: k-means seed.

    Returns:
        Rows of ``emb``, least confident first (at most ``budget``).
    """
    if budget <= 0 or len(emb) == 0:
        return []
    pool = np.argsort(-np.asarray(unsure), kind="stable")[:POOL_FACTOR * budget]  # (M,)
    if len(pool) <= budget:
        return [int(r) for r in pool]
    x = _normalised(np.asarray(emb)[pool])
    _, assign = kmeans(x, budget, seed)  # (M,) cluster of each pooled row
    firsts: dict[int, int] = {}
    for position, cluster in enumerate(assign.tolist()):  # pool is least confident first
        firsts.setdefault(cluster, position)
    return [int(pool[p]) for p in sorted(firsts.values())]


def labeling_order(emb: FloatArray | None, labelled: BoolArray, top_prob: FloatArray | None, n_leaves: int,
                   cold_start_per_class: float = 10.0, budget: int = 100, seed: int = 0,
                   diverse: bool = True, cover_step: int | None = None) -> list[Ranked]:
    """The order in which the unlabelled images should be labelled (see the module's rule).

    Args:
        emb: ``(N, D)`` embeddings, NaN rows (or None) where there is none.
        labelled: ``(N,)`` bool, images that already have a human label (left out of the order).
        top_prob: ``(N,)`` calibrated probability of each image's most probable full path, NaN where there is no
            prediction; None before the first model.
        n_leaves: number of leaf classes of the taxonomy.
        cold_start_per_class: labels per leaf class below which the order covers the embedding space.
        budget: how many cold-start (or diverse uncertain) picks head the order.
        seed: k-means seed.
        diverse: the first ``budget`` uncertain picks are spread over the embedding space
            (:func:`diverse_uncertain`); else plain least confidence.
        cover_step: cold-start picks per clustering (:func:`typical_cover`'s ``step``); None: one per leaf class,
            so each step of the order can cover as many modes as there are classes; 0: one clustering.

    Returns:
        One :class:`Ranked` per unlabelled image.
    """
    labelled = np.asarray(labelled, dtype=bool)
    n = len(labelled)
    has_emb = np.zeros(n, dtype=bool) if emb is None else np.asarray(~np.isnan(np.asarray(emb)).any(axis=1))
    has_pred = np.zeros(n, dtype=bool) if top_prob is None else ~np.isnan(np.asarray(top_prob, dtype=np.float64))
    out: list[Ranked] = []
    taken = labelled.copy()
    if is_cold_start(int(labelled.sum()), n_leaves, top_prob is not None, cold_start_per_class) and has_emb.any():
        rows = np.flatnonzero(has_emb)
        step = max(1, n_leaves) if cover_step is None else cover_step
        for row, share in typical_cover(np.asarray(emb)[rows], labelled[rows], budget, seed, step):
            out.append(Ranked(int(rows[row]), Reason.COVERAGE, share))
            taken[rows[row]] = True
    if top_prob is not None:
        unsure = least_confidence(np.nan_to_num(np.asarray(top_prob, dtype=np.float64), nan=1.0))
        rest = np.flatnonzero(~taken & has_pred)
        rest = rest[np.argsort(-unsure[rest], kind="stable")]  # least confident first
        if diverse and emb is not None:
            rows_emb = rest[has_emb[rest]]
            for row in diverse_uncertain(np.asarray(emb)[rows_emb], unsure[rows_emb], budget - len(out), seed):
                out.append(Ranked(int(rows_emb[row]), Reason.UNCERTAIN, float(unsure[rows_emb[row]])))
                taken[rows_emb[row]] = True
        for row in rest[~taken[rest]]:
            out.append(Ranked(int(row), Reason.UNCERTAIN, float(unsure[row])))
            taken[row] = True
    out.extend(Ranked(int(row), Reason.UNRANKED, 0.0) for row in np.flatnonzero(~taken))
    return out
