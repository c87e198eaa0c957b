"""Label propagation over the kNN graph of the embeddings (label spreading, Zhou et al. 2004; the kNN-graph form
of Iscen et al. 2019): the labelled images' leaf classes spread to every image along similar neighbours.

``W`` is the symmetric kNN graph with weights ``max(cos, 0) ** gamma``, ``S = D^-1/2 W D^-1/2``; the leaf scores
``F (N, C)`` solve ``(I - alpha S) F = Y`` (conjugate gradient, one column per class), ``Y`` holding each labelled
image's class weighted by ``1 / labels of that class`` (classes with fewer labels are not drowned). Leaf
probabilities are ``F`` clipped at 0 and normalised per row (uniform where nothing reached the image); the
probability of a taxonomy node is the sum over its leaves, so the levels are consistent by construction.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.sparse.linalg import cg

from model.arrays import FloatArray, IntArray

__all__ = ["level_probs", "propagate"]


def propagate(idx: IntArray, sim: FloatArray, seeds: IntArray, n_classes: int, alpha: float = 0.99,
              gamma: float = 3.0, max_iter: int = 30) -> FloatArray:
    """Leaf-class probabilities of every image from the labelled ones.

    Args:
        idx: ``(N, k)`` neighbour rows of each row (-1: none), e.g. :func:`model.neighbors.index.knn_graph`.
        sim: ``(N, k)`` their cosine similarities.
        seeds: ``(N,)`` int leaf class of each labelled row, -1 for unlabelled ones.
        n_classes: number of leaf classes ``C``.
        alpha: how far labels spread (0: not at all; close to 1: along the whole graph).
        gamma: sharpening of the edge weights.
        max_iter: conjugate-gradient iterations per class.

    Returns:
        ``(N, C)`` float32 probabilities, rows summing to 1.
    """
    n, k = idx.shape
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
    scores: FloatArray = np.zeros((n, n_classes), dtype=np.float64)  # (N, C)
    for c in range(n_classes):
        members = np.flatnonzero(seeds == c)
        if not len(members):
            continue
        y = np.zeros(n)
        y[members] = 1.0 / len(members)
        scores[:, c], _ = cg(a, y, maxiter=max_iter)
    scores = np.clip(scores, 0, None)
    total = scores.sum(axis=1, keepdims=True)
    probs = np.where(total > 0, scores / np.where(total > 0, total, 1), 1.0 / n_classes)
    return probs.astype(np.float32)


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
