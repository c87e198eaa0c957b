"""All pairs of indexed rows whose cosine similarity reaches a threshold: the near-duplicate self-join, exact.

Comparing every row with every other costs ``N² · D`` products: 2.8 CPU-s for 10,000 256-d rows and 37 CPU-s for
40,000 on a 2-core EPYC, so about 6 CPU-hours for 1M rows. Near-duplicate thresholds are high (at most 0.9996
by default): the two rows of a pair lie within ``r = sqrt(2 - 2·t)`` of each other (0.028), much less than the
spread of a k-means cell. So the join partitions the rows into ``CELLS_PER_SQRT_N · √N`` k-means cells and
compares each query row only with the rows of the cells where it can have a partner, which the triangle
inequality bounds exactly. For a row ``y`` of cell ``j`` (its nearest centroid ``c_j``), a query ``x`` whose
nearest centroid is ``c_i`` and ``|x - y| <= r``::

    |x - c_j| <= |x - y| + |y - c_j| <= r + |y - c_i| <= 2r + |x - c_i|

so ``x`` queries every cell whose centroid is within ``2r`` (plus a rounding margin) of its nearest centroid's
distance, and no pair is missed: the result is the full join's (up to the float32 rounding of a similarity
equal to the threshold). The cells only decide how much is skipped: on the animal-mnist embeddings a row
queries ~5 cells, so ~5 / cells of the full work, about ``N^1.5`` in all. Where the cells save nothing (a low
threshold, whose ``2r`` spans most cells, or few rows: see :func:`pruned_pays`), the full join runs.
"""

from __future__ import annotations

import math

import faiss
import numpy as np

from model.arrays import FloatArray, IntArray

__all__ = ["CELLS_PER_SQRT_N", "MIN_PRUNED_ROWS", "flat_vectors", "pairs_above", "pruned_pays"]

CELLS_PER_SQRT_N = 2.0
"""k-means cells per square root of the row count."""
MIN_PRUNED_ROWS = 8192
"""Below this many rows the full join (< 2 CPU-s) runs."""
SAMPLE_PER_CELL = 64  # k-means trains on at most this many rows per cell
KMEANS_ITERATIONS = 10
MAX_WORK_FRACTION = 0.5  # the cells must skip at least half the full join's products, else it runs
_MARGIN = 1e-3  # added to 2r: covers float32 rounding of the distances to the centroids
_BLOCK = 4096  # rows per distance block / per range-search call


def flat_vectors(index: faiss.IndexFlatIP) -> FloatArray:
    """The ``(N, D)`` float32 rows stored in a flat faiss index, without copying them (a view: read only)."""
    n, d = int(index.ntotal), int(index.d)
    if n == 0:
        return np.zeros((0, d), dtype=np.float32)
    return faiss.rev_swig_ptr(index.get_xb(), n * d).reshape(n, d)


def pruned_pays(n: int, start: int) -> bool:
    """Whether the cell-pruned join is worth its k-means: enough rows, and enough query rows per cell."""
    return n >= MIN_PRUNED_ROWS and n - start >= 16 * _cell_count(n)


def pairs_above(index: faiss.IndexFlatIP, threshold: float, start: int = 0) -> tuple[IntArray, FloatArray]:
    """Pairs of distinct rows of ``index`` (unit vectors) whose inner product is at least ``threshold``.

    Args:
        index: the rows (a flat inner-product index, ``IndexFlatIP``, of L2-normalised vectors).
        threshold: the cosine similarity a pair must reach.
        start: only pairs with at least one row ``>= start`` (rows added since an earlier call with that length).

    Returns:
        ``(pairs (P, 2) int64 with i < j, similarities (P,) float32)``, ordered by ``(i, j)``.
    """
    n, start = int(index.ntotal), max(0, int(start))
    found = None
    if pruned_pays(n, start):
        found = _pruned(flat_vectors(index), threshold, start)
    if found is None:
        found = _full(index, threshold, start)
    pairs, sims = found
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))
    return pairs[order], sims[order]


def _radius(threshold: float) -> float:
    # faiss keeps results with inner product > radius: step just below the threshold to include it
    return float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))


def _keep(owner: IntArray, rows: IntArray, dist: FloatArray, start: int
          ) -> tuple[IntArray, IntArray, FloatArray]:
    """Each pair once: ``owner`` (a query row, ``>= start``) with a higher row, or with a row before ``start``
    (those are never queries)."""
    keep = (rows > owner) | (rows < start)
    return np.minimum(owner, rows)[keep], np.maximum(owner, rows)[keep], dist[keep]


def _collect(parts: list[tuple[IntArray, IntArray, FloatArray]]) -> tuple[IntArray, FloatArray]:
    firsts = [np.zeros(0, np.int64), *(p[0] for p in parts)]
    seconds = [np.zeros(0, np.int64), *(p[1] for p in parts)]
    values = [np.zeros(0, np.float32), *(p[2] for p in parts)]
    pairs = np.stack([np.concatenate(firsts), np.concatenate(seconds)], axis=1).astype(np.int64)  # (P, 2)
    return pairs, np.concatenate(values).astype(np.float32)


def _full(index: faiss.IndexFlatIP, threshold: float, start: int) -> tuple[IntArray, FloatArray]:
    """Every query row (``>= start``) against every row: ``(N - start) × N`` products."""
    n, radius = int(index.ntotal), _radius(threshold)
    parts = []
    for lo in range(start, n, _BLOCK):
        hi = min(n, lo + _BLOCK)
        lims, dist, rows = index.range_search(index.reconstruct_n(lo, hi - lo), radius)  # (B, D) queries
        owner = np.repeat(np.arange(lo, hi), np.diff(lims).astype(np.int64))  # (R,)
        parts.append(_keep(owner, rows.astype(np.int64), dist, start))
    return _collect(parts)


def _cell_count(n: int) -> int:
    return max(2, int(round(CELLS_PER_SQRT_N * math.sqrt(max(n, 1)))))


def _pruned(x: FloatArray, threshold: float, start: int) -> tuple[IntArray, FloatArray] | None:
    """The join restricted to the cells each query row can have a partner in; None when that saves too little.

    Args:
        x: ``(N, D)`` float32 unit rows.
    """
    n, d = x.shape
    cells = _cell_count(n)
    rng = np.random.default_rng(0)  # a fixed sample: the same rows give the same cells (and the same work)
    sample = x[np.sort(rng.choice(n, size=min(n, cells * SAMPLE_PER_CELL), replace=False))]  # (S, D)
    kmeans = faiss.Kmeans(d, cells, niter=KMEANS_ITERATIONS, seed=1, max_points_per_centroid=SAMPLE_PER_CELL,
                          verbose=False)
    kmeans.train(np.ascontiguousarray(sample))
    centroids = np.asarray(kmeans.centroids, dtype=np.float32)  # (C, D)
    c_sq = np.einsum("ij,ij->i", centroids, centroids)  # (C,)
    reach = 2.0 * math.sqrt(max(0.0, 2.0 - 2.0 * float(threshold))) + _MARGIN
    cell = np.empty(n, dtype=np.int64)  # (N,) each row's nearest centroid
    query_rows, query_cells = [], []
    for lo in range(0, n, _BLOCK):
        hi = min(n, lo + _BLOCK)
        block = x[lo:hi]  # (B, D)
        dist = np.sqrt(np.maximum(np.einsum("ij,ij->i", block, block)[:, None] + c_sq[None, :]
                                  - 2.0 * (block @ centroids.T), 0.0))  # (B, C) distances to the centroids
        cell[lo:hi] = dist.argmin(axis=1)
        if hi > start:
            own = dist[max(0, start - lo):]  # the query rows of the block
            r, c = np.nonzero(own <= own.min(axis=1, keepdims=True) + reach)
            query_rows.append(r + max(lo, start))
            query_cells.append(c)
    q_rows, q_cells = np.concatenate(query_rows), np.concatenate(query_cells)  # (Q,) each a (row, cell) to search
    size = np.bincount(cell, minlength=cells)  # (C,)
    if float(size[q_cells].sum()) > MAX_WORK_FRACTION * (n - start) * n:
        return None
    members = np.argsort(cell, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(size)])
    by_cell = np.argsort(q_cells, kind="stable")
    q_rows, q_bounds = q_rows[by_cell], np.concatenate([[0], np.cumsum(np.bincount(q_cells, minlength=cells))])
    radius = _radius(threshold)
    parts = []
    for j in range(cells):
        rows_j, queries = members[bounds[j]:bounds[j + 1]], q_rows[q_bounds[j]:q_bounds[j + 1]]
        if not len(rows_j) or not len(queries):
            continue
        flat = faiss.IndexFlatIP(d)
        flat.add(np.ascontiguousarray(x[rows_j]))
        for lo in range(0, len(queries), _BLOCK):
            q = queries[lo:lo + _BLOCK]
            lims, dist, hit = flat.range_search(np.ascontiguousarray(x[q]), radius)
            owner = np.repeat(q, np.diff(lims).astype(np.int64))  # (R,)
            parts.append(_keep(owner, rows_j[hit.astype(np.int64)], dist, start))
    return _collect(parts)
