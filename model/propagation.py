"""Label propagation over the kNN graph of the embeddings (label spreading, Zhou et al. 2004; the kNN-graph form
of Iscen et al. 2019): the labelled images' leaf classes spread to every image along similar neighbours.

``W`` is the symmetric kNN graph with weights ``max(cos, 0) ** gamma``, ``S = D^-1/2 W D^-1/2``; the leaf scores
``F (N, C)`` solve ``(I - alpha S) F = Y`` (conjugate gradient, one column per class), ``Y`` holding each labelled
image's class weighted by ``1 / labels of that class`` (classes with fewer labels are not drowned). Leaf
probabilities are ``F`` clipped at 0 and normalised per row; the probability of a taxonomy node is the sum over its
leaves, so the levels are consistent by construction: a path prediction (:func:`path_predictions`) takes the most
probable leaf and reports the marginal of each of its prefixes, so every level's choice is the parent of the next.

A label that stops above the leaves (a prefix path, ``leafsOnly="false"`` configs) seeds every leaf under it
equally (:func:`seed_matrix`). An image that no label reaches (a component of the graph without any label) has no
prediction rather than a uniform guess.

The backend serves propagated predictions from the first label until the taxonomy heads can be trained
(``ml_backend.training.propagation``); afterwards propagation is a candidate of the model choice, scored on the heads'
folds with :func:`held_out` (``model.propagation_choice``), and its held-out verdict on each label joins the
label-error flags (``model.crowd.neighbours``); ``bench/label_propagation.py`` measures it against the heads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import sparse
from scipy.sparse.linalg import cg

from model.arrays import BoolArray, FloatArray, IntArray
from model.errors import DataError
from model.heads.decode import PathPrediction

__all__ = ["PROPAGATION_NEIGHBOURS", "held_out", "level_probs", "leaf_probabilities", "path_predictions",
           "propagate", "seed_matrix", "spread"]

PROPAGATION_NEIGHBOURS = 10
"""Neighbours per image in the graph the labels spread over (k=10 beat k=30 at every budget in
``bench/results/label_propagation.txt``)."""


def spread(idx: IntArray, sim: FloatArray, y: FloatArray, alpha: float = 0.99, gamma: float = 3.0,
           max_iter: int = 30) -> FloatArray:
    """Leaf scores of every image from soft seeds: the solution of ``(I - alpha S) F = Y`` (see the module).

    Args:
        idx: ``(N, k)`` neighbour rows of each row (-1: none), e.g. :meth:`model.neighbors.index.NeighborIndex.knn`.
        sim: ``(N, k)`` their cosine similarities.
        y: ``(N, C)`` non-negative seed weights (0 rows: unlabelled); each column is rescaled to sum 1.
        alpha: how far labels spread (0: not at all; close to 1: along the whole graph).
        gamma: sharpening of the edge weights.
        max_iter: conjugate-gradient iterations per class.

    Returns:
        ``(N, C)`` float64 scores >= 0, not normalised (a row of zeros: no label reaches the image).
    """
    n, k = idx.shape
    y = np.asarray(y, dtype=np.float64)
    if y.shape[0] != n:
        raise DataError(f"The seeds have {y.shape[0]} rows but the graph has {n}; give one row per graph node.")
    rows = np.repeat(np.arange(n), k)
    cols, weights = idx.ravel(), np.clip(sim.ravel(), 0, None) ** gamma
    keep = cols >= 0
    w = sparse.csr_matrix((weights[keep], (rows[keep], cols[keep])), shape=(n, n))
    w = w + w.T
    degree = np.asarray(w.sum(axis=1)).ravel()
    inv_sqrt = np.where(degree > 0, 1.0 / np.sqrt(np.maximum(degree, 1e-12)), 0.0)
    d: sparse.dia_matrix = sparse.diags(inv_sqrt)  # type: ignore[arg-type]  # scipy-stubs accept only arrays typed 1-D by shape
    s = d @ w @ d
    a = sparse.identity(n, format="csr") - alpha * s
    scores: FloatArray = np.zeros(y.shape, dtype=np.float64)  # (N, C)
    for c in range(y.shape[1]):
        total = float(y[:, c].sum())
        if total <= 0:
            continue
        scores[:, c], _ = cg(a, y[:, c] / total, maxiter=max_iter)
    clipped: FloatArray = np.clip(scores, 0, None)
    return clipped


def leaf_probabilities(scores: FloatArray) -> tuple[FloatArray, BoolArray]:
    """Rows of :func:`spread`'s scores normalised to probabilities.

    Returns:
        ``probs (N, C)`` float32 (uniform where nothing arrived) and ``reached (N,)``: some label reached the row.
    """
    total = scores.sum(axis=1, keepdims=True)  # (N, 1)
    reached = total[:, 0] > 0
    n_classes = max(1, scores.shape[1])
    probs = np.where(total > 0, scores / np.where(total > 0, total, 1), 1.0 / n_classes)
    return probs.astype(np.float32), reached


def propagate(idx: IntArray, sim: FloatArray, seeds: IntArray, n_classes: int, alpha: float = 0.99,
              gamma: float = 3.0, max_iter: int = 30) -> FloatArray:
    """Leaf-class probabilities of every image from the labelled ones (hard labels).

    Args:
        idx: ``(N, k)`` neighbour rows of each row (-1: none), e.g. :func:`model.neighbors.graph.knn_graph`.
        sim: ``(N, k)`` their cosine similarities.
        seeds: ``(N,)`` int leaf class of each labelled row, -1 for unlabelled ones.
        n_classes: number of leaf classes ``C``.
        alpha: how far labels spread (0: not at all; close to 1: along the whole graph).
        gamma: sharpening of the edge weights.
        max_iter: conjugate-gradient iterations per class.

    Returns:
        ``(N, C)`` float32 probabilities, rows summing to 1 (uniform where nothing reached the image).
    """
    y = np.zeros((len(seeds), n_classes), dtype=np.float64)  # (N, C)
    labelled = np.flatnonzero(np.asarray(seeds) >= 0)
    y[labelled, np.asarray(seeds)[labelled]] = 1.0
    probs, _ = leaf_probabilities(spread(idx, sim, y, alpha, gamma, max_iter))
    return probs


def held_out(idx: IntArray, sim: FloatArray, y: FloatArray, fold_of: IntArray, alpha: float = 0.99,
             gamma: float = 3.0, max_iter: int = 30) -> tuple[FloatArray, BoolArray]:
    """Out-of-fold propagation: each fold's rows get the leaf probabilities spread from the seeds of the other folds.

    What the labels of the other images say about a labelled one, its own label (and its fold's, e.g. its
    duplicates') removed: the held-out estimate a model choice compares with the heads' out-of-fold predictions on
    the same folds, and the neighbours' verdict on a given label (a label-error signal).

    Args:
        idx, sim: the kNN graph (:func:`spread`).
        y: ``(N, C)`` seed weights (:func:`seed_matrix`).
        fold_of: ``(N,)`` fold of each row, -1 for rows in no fold (they always seed, and get no estimate).

    Returns:
        ``probs (N, C)`` float32 (uniform for rows in no fold or that no other label reached) and ``reached (N,)``.
    """
    fold_of = np.asarray(fold_of)
    if fold_of.shape != (len(y),):
        raise DataError(f"fold_of has shape {fold_of.shape} for {len(y)} seed rows; give one fold (or -1) per row.")
    n_classes = max(1, y.shape[1])
    probs: FloatArray = np.full(y.shape, 1.0 / n_classes, dtype=np.float32)  # (N, C)
    reached: BoolArray = np.zeros(len(y), dtype=bool)
    for f in np.unique(fold_of[fold_of >= 0]):
        held = fold_of == f
        seeds = np.where(held[:, None], 0.0, y)
        fold_probs, fold_reached = leaf_probabilities(spread(idx, sim, seeds, alpha, gamma, max_iter))
        probs[held], reached[held] = fold_probs[held], fold_reached[held]
    return probs, reached


def seed_matrix(n_rows: int, labels: Mapping[int, Sequence[Sequence[str]]], leaf_paths: Sequence[tuple[str, ...]]
                ) -> FloatArray:
    """Seed weights ``Y`` for :func:`spread` from label paths.

    Args:
        n_rows: rows of the graph ``N``.
        labels: graph row -> the label paths given to it (several when several tasks hold the same image); a path
            seeds its leaf, a prefix path every leaf under it equally; a path outside ``leaf_paths`` is ignored.
        leaf_paths: the ``C`` leaf classes' full paths (the columns).

    Returns:
        ``(N, C)`` float64, each label contributing a total weight of 1 to its row.
    """
    y = np.zeros((n_rows, len(leaf_paths)), dtype=np.float64)  # (N, C)
    for row, paths in labels.items():
        for path in paths:
            prefix = tuple(path)
            under = [c for c, leaf in enumerate(leaf_paths) if leaf[:len(prefix)] == prefix]
            if under:
                y[row, under] += 1.0 / len(under)
    return y


def path_predictions(probs: FloatArray, reached: BoolArray, leaf_paths: Sequence[tuple[str, ...]],
                     leafs_only: bool = True, prefix_threshold: float = 0.2) -> list[PathPrediction | None]:
    """One consistent taxonomy path per row from leaf probabilities, the way ``model.heads.decode`` decodes.

    The most probable leaf names the path; the probability of each prefix is the sum over the leaves under it
    (``level_scores``, non-increasing). With ``leafs_only`` the path is that leaf and the score its probability;
    else the path stops at the deepest prefix whose probability reaches ``prefix_threshold`` (at least the top
    level) and the score is that prefix's probability.

    Args:
        probs: ``(N, C)`` leaf probabilities (:func:`leaf_probabilities`), columns in ``leaf_paths`` order.
        reached: ``(N,)`` rows some label reached; the others get None.
        leaf_paths: the leaf classes' full paths.
        leafs_only: the label config's ``leafsOnly``.
        prefix_threshold: see above.

    Returns:
        A :class:`~model.heads.decode.PathPrediction` (or None) per row.
    """
    if not 0.0 <= prefix_threshold <= 1.0:
        raise DataError(f"prefix_threshold is a probability, got {prefix_threshold}; use a value in [0, 1].")
    leaves = [tuple(p) for p in leaf_paths]
    nodes = list(dict.fromkeys(leaf[:d + 1] for leaf in leaves for d in range(len(leaf))))
    node_of = {node: j for j, node in enumerate(nodes)}
    member = np.zeros((len(leaves), len(nodes)), dtype=np.float64)  # (C, M): leaf c lies under node j
    for c, leaf in enumerate(leaves):
        for d in range(len(leaf)):
            member[c, node_of[leaf[:d + 1]]] = 1.0
    marginals = np.asarray(probs, dtype=np.float64) @ member  # (N, M)
    best = probs.argmax(axis=1) if len(leaves) else np.zeros(len(probs), dtype=np.int64)  # (N,)
    out: list[PathPrediction | None] = []
    for i in range(len(probs)):
        if not reached[i] or not leaves:
            out.append(None)
            continue
        leaf = leaves[int(best[i])]
        scores = [min(1.0, float(marginals[i, node_of[leaf[:d + 1]]])) for d in range(len(leaf))]
        depth = len(leaf) if leafs_only else max([d + 1 for d, s in enumerate(scores) if s >= prefix_threshold],
                                                 default=1)
        out.append(PathPrediction(leaf[:depth], scores[depth - 1], scores[:depth]))
    return out


def level_probs(leaf_probs: FloatArray, leaf_paths: list[tuple[str, ...]], level: int
                ) -> tuple[FloatArray, list[tuple[str, ...]]]:
    """Probabilities of the nodes of one taxonomy level: the sums over their leaves.

    Args:
        leaf_probs: ``(N, C)`` from :func:`propagate`, columns in the order of ``leaf_paths``.
        leaf_paths: the leaf classes' full paths.
        level: 0 for the top level.

    Returns:
        ``(N, K)`` probabilities and the ``K`` node paths (prefixes of length ``level + 1``), in first-seen order.
    """
    nodes = list(dict.fromkeys(p[:level + 1] for p in leaf_paths if len(p) > level))
    member = np.zeros((len(leaf_paths), len(nodes)), dtype=np.float32)
    for c, path in enumerate(leaf_paths):
        if len(path) > level:
            member[c, nodes.index(path[:level + 1])] = 1.0
    return leaf_probs @ member, nodes
