"""The k-nearest-neighbour graph of embeddings under cosine similarity: exact search with faiss ``IndexFlatIP``.

One small module on purpose: when the similarity index (``model/neighbors``) is on main, its kNN graph takes this
function's place with the same signature and meaning.
"""

from __future__ import annotations

import faiss
import numpy as np

from model.arrays import FloatArray, IntArray

__all__ = ["knn_graph"]


def knn_graph(emb: FloatArray, k: int) -> tuple[IntArray, FloatArray]:
    """The ``k`` most similar other rows of every row.

    Args:
        emb: ``(N, D)`` embeddings; rows with a NaN (unreadable images) get no neighbours and are nobody's.
        k: neighbours per row (at most the number of other readable rows).

    Returns:
        ``idx (N, k)`` int64 row indices (-1: none) and ``sim (N, k)`` float32 cosine similarities, most similar
        first, the row itself excluded.
    """
    n = len(emb)
    ok = ~np.isnan(emb).any(axis=1)
    rows = np.flatnonzero(ok)
    idx = np.full((n, k), -1, dtype=np.int64)
    sim = np.zeros((n, k), dtype=np.float32)
    k_eff = min(k, len(rows) - 1)
    if k_eff < 1:
        return idx, sim
    unit = np.ascontiguousarray(emb[rows], dtype=np.float32)
    faiss.normalize_L2(unit)
    index = faiss.IndexFlatIP(unit.shape[1])
    index.add(unit)
    found_sim, found = index.search(unit, k_eff + 1)  # (M, k+1): the row itself is (almost always) first
    for r, (hits, sims) in enumerate(zip(found, found_sim)):
        keep = hits != r
        hits, sims = hits[keep][:k_eff], sims[keep][:k_eff]
        idx[rows[r], :len(hits)] = rows[hits]
        sim[rows[r], :len(hits)] = sims
    return idx, sim
