"""Which unlabelled image a person should label next: coverage while labels are few, then uncertainty.

The rule (``docs/design.md``, "The labeling loop"):

1. **Cold start** — no model yet, or fewer than ``cold_start_per_class`` labels per leaf class on average
   (``n_labelled < cold_start_per_class * n_leaves``): *typical coverage* on the self-supervised embeddings, in
   the spirit of TypiClust (Hacohen et al., 2022). The L2-normalised embeddings of all images are clustered with
   k-means into ``n_labelled + budget`` clusters; clusters that hold no labelled image come first, the largest
   first, and each gives its most *typical* image (the highest inverse mean distance to its nearest neighbours in
   the cluster). The score is the cluster's share of the images. Outliers, which plain k-center picks first,
   come last.
2. **Uncertainty** — otherwise, and for everything after the cold-start picks: least confidence of the
   calibrated full-path distribution, ``1 - max_path p(path | image)``, highest first. This is the order of
   Label Studio's own "Uncertainty sampling" and of the Data Manager's *Prediction score* column ascending, when
   the prediction score is the path probability (``leafsOnly`` configs).
3. Images without an embedding or a prediction (unreadable), and before any model the images after the
   cold-start picks, come last in the given order.

Everything here is numpy/scipy on arrays; ``ml_backend.prelabel`` brings the task ids and writes the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np
from scipy.cluster.vq import kmeans2
from scipy.spatial.distance import cdist

from model.arrays import BoolArray, FloatArray

__all__ = ["Ranked", "Reason", "is_cold_start", "labeling_order", "least_confidence", "typical_cover"]

TYPICALITY_NEIGHBOURS = 20
"""Neighbours whose mean distance defines an image's typicality (TypiClust uses 20)."""

KMEANS_SAMPLE = 20_000
"""Images k-means is fitted on at most (a seeded sample; every image is then assigned to its nearest centroid)."""

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


def typical_cover(emb: FloatArray, labelled: BoolArray, budget: int, seed: int = 0) -> list[tuple[int, float]]:
    """TypiClust-style picks: the most typical image of each cluster without a label, largest clusters first.

    Args:
        emb: ``(N, D)`` embeddings of every image (labelled ones included: they cover their clusters).
        labelled: ``(N,)`` bool, images that already have a label.
        budget: how many images to pick at most.
        seed: k-means seed (the order is deterministic for a given seed).

    Returns:
        ``[(row, cluster share of all images)]`` in pick order, rows among the unlabelled ones.
    """
    n = len(emb)
    labelled = np.asarray(labelled, dtype=bool)
    free = np.flatnonzero(~labelled)
    if budget <= 0 or len(free) == 0:
        return []
    rng = np.random.default_rng(seed)
    x = _normalised(emb)  # (N, D)
    k = int(min(n, int(labelled.sum()) + budget))
    if k <= 1:
        assign = np.zeros(n, dtype=np.int64)
        centroids = x.mean(axis=0, keepdims=True)
    else:
        fit_rows = np.arange(n) if n <= KMEANS_SAMPLE else np.sort(rng.choice(n, KMEANS_SAMPLE, replace=False))
        centroids, _ = kmeans2(x[fit_rows], k, minit="++", seed=seed, iter=10)  # (K, D)
        assign = np.concatenate([np.argmin(cdist(x[i:i + 4096], centroids, "sqeuclidean"), axis=1)
                                 for i in range(0, n, 4096)])  # (N,)
    sizes = np.bincount(assign, minlength=len(centroids))
    covered = set(assign[labelled].tolist())
    order = sorted((c for c in range(len(centroids)) if c not in covered and sizes[c] > 0),
                   key=lambda c: (-sizes[c], c))
    picks: list[tuple[int, float]] = []
    for c in order:
        members = np.flatnonzero((assign == c) & ~labelled)
        if len(members) == 0:
            continue
        if len(members) > TYPICALITY_SAMPLE:
            members = np.sort(rng.choice(members, TYPICALITY_SAMPLE, replace=False))
        if len(members) == 1:
            best = int(members[0])
        else:
            d = cdist(x[members], x[members])  # (m, m)
            m = min(TYPICALITY_NEIGHBOURS, len(members) - 1)
            nearest = np.sort(d, axis=1)[:, 1:m + 1]  # (m, m') without the image itself
            typicality = 1.0 / (nearest.mean(axis=1) + 1e-12)
            best = int(members[int(np.argmax(typicality))])
        picks.append((best, float(sizes[c]) / n))
        if len(picks) == budget:
            break
    return picks


def labeling_order(emb: FloatArray | None, labelled: BoolArray, top_prob: FloatArray | None, n_leaves: int,
                   cold_start_per_class: float = 2.0, budget: int = 100, seed: int = 0) -> list[Ranked]:
    """The order in which the unlabelled images should be labelled (see the module's rule).

    Args:
        emb: ``(N, D)`` embeddings, NaN rows (or None) where there is none.
        labelled: ``(N,)`` bool, images that already have a human label (left out of the order).
        top_prob: ``(N,)`` calibrated probability of each image's most probable full path, NaN where there is no
            prediction; None before the first model.
        n_leaves: number of leaf classes of the taxonomy.
        cold_start_per_class: labels per leaf class below which the order covers the embedding space.
        budget: how many cold-start picks head the order.
        seed: k-means seed.

    Returns:
        One :class:`Ranked` per unlabelled image.
    """
    labelled = np.asarray(labelled, dtype=bool)
    n = len(labelled)
    has_emb = np.zeros(n, dtype=bool) if emb is None else ~np.isnan(np.asarray(emb)).any(axis=1)
    has_pred = np.zeros(n, dtype=bool) if top_prob is None else ~np.isnan(np.asarray(top_prob, dtype=np.float64))
    out: list[Ranked] = []
    taken = labelled.copy()
    if is_cold_start(int(labelled.sum()), n_leaves, top_prob is not None, cold_start_per_class) and has_emb.any():
        rows = np.flatnonzero(has_emb)
        for row, share in typical_cover(np.asarray(emb)[rows], labelled[rows], budget, seed):
            out.append(Ranked(int(rows[row]), Reason.COVERAGE, share))
            taken[rows[row]] = True
    if top_prob is not None:
        unsure = least_confidence(np.nan_to_num(np.asarray(top_prob, dtype=np.float64), nan=1.0))
        rest = np.flatnonzero(~taken & has_pred)
        for row in rest[np.argsort(-unsure[rest], kind="stable")]:
            out.append(Ranked(int(row), Reason.UNCERTAIN, float(unsure[row])))
            taken[row] = True
    out.extend(Ranked(int(row), Reason.UNRANKED, 0.0) for row in np.flatnonzero(~taken))
    return out
