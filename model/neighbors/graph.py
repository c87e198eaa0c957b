"""The k-nearest-neighbour graph of a plain embedding matrix, as label propagation and its benchmarks use it."""

from __future__ import annotations

import numpy as np

from model.arrays import FloatArray, IntArray
from model.neighbors.index import NeighborIndex

__all__ = ["knn_graph"]


def knn_graph(emb: FloatArray, k: int) -> tuple[IntArray, FloatArray]:
    """The ``k`` most similar other rows of every row of a plain embedding matrix (label propagation's graph).

    Args:
        emb: ``(N, D)`` embeddings; rows with a NaN (unreadable images) or of zero length get no neighbours and
            are nobody's.
        k: neighbours per row (at most the number of other usable rows).

    Returns:
        ``idx (N, k)`` int64 row indices (-1: none) and ``sim (N, k)`` float32 cosine similarities (0 where none),
        most similar first, the row itself excluded: :meth:`NeighborIndex.knn` on the usable rows.
    """
    x = np.asarray(emb, dtype=np.float32)  # (N, D)
    n = len(x)
    idx = np.full((n, int(k)), -1, dtype=np.int64)  # (N, k)
    sim = np.zeros((n, int(k)), dtype=np.float32)  # (N, k)
    with np.errstate(invalid="ignore", over="ignore"):
        usable = np.isfinite(x).all(axis=1) & (np.einsum("ij,ij->i", x, x) > 0)  # (N,)
    rows = np.flatnonzero(usable)
    k_eff = min(int(k), len(rows) - 1)
    if k_eff < 1:
        return idx, sim
    graph = NeighborIndex.build([str(r) for r in rows], x[rows]).knn(k_eff)  # rows keyed by their position
    found = graph.neighbors >= 0  # (M, k_eff)
    idx[rows, :k_eff] = np.where(found, rows[np.maximum(graph.neighbors, 0)], -1)
    sim[rows, :k_eff] = np.where(found, graph.similarities, 0.0)
    return idx, sim
