"""Unit vectors for the kNN index: faiss kept single-threaded and embeddings L2-normalised before any search."""

from __future__ import annotations

import faiss
import numpy as np

from model.arrays import FloatArray
from model.errors import DataError

__all__ = ["normalise", "single_threaded"]


def single_threaded() -> None:
    """Keep faiss's OpenMP at one thread (called before every faiss call of this module).

    GNU OpenMP hangs in a forked child once the parent ran a parallel region, and RQ runs every job in a forked
    work horse: a worker (or a test process) that searched with several threads would deadlock its next job.
    One thread also suits the queries here (one at a time) and a server whose cores serve requests.
    """
    if faiss.omp_get_max_threads() != 1:
        faiss.omp_set_num_threads(1)


def normalise(emb: FloatArray) -> FloatArray:
    """Unit-length float32 copy of ``emb`` ``(N, D)``.

    Raises:
        DataError: a row is not finite or has zero length (an unreadable image's NaN row, an all-zero vector).
    """
    single_threaded()
    x = np.array(emb, dtype=np.float32, copy=True, order="C")  # (N, D)
    if x.ndim != 2:
        raise DataError(f"embeddings must be a (N, D) array, got shape {x.shape}.")
    sq = np.einsum("ij,ij->i", x, x)  # (N,) squared lengths; NaN or inf anywhere in a row makes its length so
    if not np.isfinite(sq).all():
        raise DataError("embeddings hold NaN or infinite values (an unreadable image); index only rows that embedded.")
    if x.shape[0] and not (sq > 0).all():
        raise DataError(f"{int((sq <= 0).sum())} embeddings have zero length; they have no direction to compare.")
    faiss.normalize_L2(x)
    return x
