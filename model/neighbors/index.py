"""Exact nearest neighbours over L2-normalised embeddings: the one kNN index of the product.

:class:`NeighborIndex` wraps a faiss ``IndexFlatIP`` (exact inner product; on unit vectors the inner product
is the cosine similarity) and names every row by a string key (an image content hash in the backend, a file
path on folders). The same index answers "images similar to this one" (:meth:`NeighborIndex.search`), gives
the k-nearest-neighbour graph that label propagation and the near-duplicate grouping use
(:meth:`NeighborIndex.knn`, :meth:`NeighborIndex.pairs_above`), and is persisted beside the model versions.

Exact search is the default up to at least 1M rows: ``bench/similarity.py`` measured the query latency and
memory of ``IndexFlatIP`` against brute-force numpy at 10k, 100k and 1M rows (``bench/results/similarity.txt``).

Persistence (:meth:`NeighborIndex.save`, :func:`load_index`) writes and reads the generations of
``model.neighbors.generations``: a crash at any point leaves the previous index loadable.

The plain-matrix kNN graph lives in ``model.neighbors.graph``, normalisation in ``model.neighbors.vectors``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from model.arrays import FloatArray, IntArray
from model.errors import ConfigError, DataError
from model.neighbors.generations import CURRENT, read_generation, write_generation
from model.neighbors.pairs import pairs_above as similar_pairs
from model.neighbors.vectors import normalise, single_threaded

__all__ = ["KnnGraph", "NeighborIndex", "load_index"]

_SEARCH_BATCH = 4096  # query rows per faiss call in knn(): bounds the (B, N) distance block


@dataclass(frozen=True)
class KnnGraph:
    """The k-nearest-neighbour graph of an index's rows (each row's own entry left out).

    Attributes:
        keys: the N row keys (row ``i`` is ``keys[i]``).
        neighbors: ``(N, k)`` int64 row numbers, most similar first; -1 pads rows with fewer than k others.
        similarities: ``(N, k)`` float32 cosine similarities aligned with ``neighbors`` (-inf where padded).
    """

    keys: list[str]
    neighbors: IntArray
    similarities: FloatArray


class NeighborIndex:
    """Exact cosine-similarity search over keyed embeddings (faiss ``IndexFlatIP`` on unit vectors).

    Args:
        dim: embedding dimension D.
        encoder_version: the encoder whose embeddings these are (recorded; an index never mixes encoders).

    Not thread-safe for writers: build or add in one thread, then share the object for searching (faiss
    searches of an ``IndexFlatIP`` that is not being modified may run in parallel).
    """

    def __init__(self, dim: int, encoder_version: str = "") -> None:
        if int(dim) < 1:
            raise ConfigError(f"dim={dim} must be >= 1.")
        single_threaded()
        self.dim = int(dim)
        self.encoder_version = str(encoder_version)
        self._index: faiss.IndexFlatIP = faiss.IndexFlatIP(self.dim)
        self._keys: list[str] = []
        self._rows: dict[str, int] = {}

    # ----- building -----------------------------------------------------------------------------------
    @classmethod
    def build(cls, keys: Sequence[str], emb: FloatArray, encoder_version: str = "") -> NeighborIndex:
        """An index of ``emb`` ``(N, D)`` keyed by ``keys`` (a repeated key keeps its first row)."""
        emb = np.asarray(emb)
        if emb.ndim != 2:
            raise DataError(f"embeddings must be a (N, D) array, got shape {emb.shape}.")
        index = cls(emb.shape[1], encoder_version)
        index.add(keys, emb)
        return index

    def add(self, keys: Sequence[str], emb: FloatArray) -> int:
        """Add rows whose key is not indexed yet; returns how many were added.

        Args:
            keys: N keys (non-empty strings without line breaks).
            emb: ``(N, D)`` embeddings; normalised here.

        Raises:
            DataError: shapes disagree, a key is malformed, or a row is not finite / has zero length.
        """
        keys = [str(k) for k in keys]
        emb = np.asarray(emb)
        if emb.ndim != 2 or emb.shape != (len(keys), self.dim):
            raise DataError(f"add got embeddings of shape {emb.shape} for {len(keys)} keys; expected "
                            f"({len(keys)}, {self.dim}).")
        bad = [k for k in keys if not k or "\n" in k or "\r" in k]
        if bad:
            raise DataError(f"index keys must be non-empty single-line strings; got {bad[0]!r}.")
        new: dict[str, int] = {}
        for i, k in enumerate(keys):
            if k not in self._rows and k not in new:
                new[k] = i
        if not new:
            return 0
        rows = normalise(emb if len(new) == len(keys) else emb[list(new.values())])  # (M, D) unit rows
        self._index.add(rows)
        for k in new:
            self._rows[k] = len(self._keys)
            self._keys.append(k)
        return len(new)

    # ----- reading ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._rows

    @property
    def keys(self) -> list[str]:
        """Row keys in row order (a copy)."""
        return list(self._keys)

    def key(self, row: int) -> str:
        """The key of ``row`` (IndexError outside ``0..len-1``)."""
        return self._keys[row]

    def row(self, key: str) -> int:
        """The row of ``key``. Raises KeyError when it is not indexed."""
        return self._rows[key]

    def vectors(self, keys: Iterable[str]) -> FloatArray:
        """The stored unit vectors ``(M, D)`` of ``keys`` (KeyError for a key not indexed)."""
        rows = [self._rows[k] for k in keys]
        out = np.empty((len(rows), self.dim), dtype=np.float32)  # (M, D)
        for j, r in enumerate(rows):
            out[j] = self._index.reconstruct(int(r))
        return out

    def search(self, queries: FloatArray, k: int) -> tuple[FloatArray, IntArray]:
        """The ``k`` most similar rows of each query.

        Args:
            queries: ``(Q, D)`` embeddings (normalised here).
            k: neighbours per query (at most ``len(self)`` are real).

        Returns:
            ``(similarities (Q, k) float32, rows (Q, k) int64)``, most similar first; -1 rows (similarity
            -inf) pad when the index has fewer than ``k`` rows.
        """
        if k < 1:
            raise DataError(f"k={k} must be >= 1.")
        q = normalise(np.atleast_2d(queries))  # (Q, D)
        if q.shape[1] != self.dim:
            raise DataError(f"queries have {q.shape[1]} dimensions; this index holds {self.dim}-d embeddings of "
                            f"encoder {self.encoder_version or '?'}.")
        sims, rows = self._index.search(q, int(k))  # (Q, k), (Q, k)
        sims = np.where(rows >= 0, sims, -np.inf).astype(np.float32)
        return sims, rows.astype(np.int64)

    def similar_to(self, key: str, k: int) -> list[tuple[str, float]]:
        """The ``k`` rows most similar to the indexed row ``key`` (itself left out), as ``(key, similarity)``."""
        sims, rows = self.search(self.vectors([key]), k + 1)
        me = self._rows[key]
        out = [(self._keys[int(r)], float(s)) for s, r in zip(sims[0], rows[0]) if r >= 0 and int(r) != me]
        return out[:k]

    def knn(self, k: int, previous: KnnGraph | None = None) -> KnnGraph:
        """The k-nearest-neighbour graph of every row (exact; ``N × N`` inner products in blocks).

        Its own row is removed from each row's list (an identical vector stored under another key stays:
        it is a different image with the same embedding).

        Args:
            k: neighbours per row.
            previous: this index's graph from before rows were added (the same ``k``, its keys the first rows of
                this index: :meth:`add` only appends). Then only the new rows are searched against all rows and the
                old rows against the new ones, ``(N - M) × N`` inner products instead of ``N × N``; a graph that
                does not fit is ignored.
        """
        n = len(self)
        k = int(k)
        if k < 1:
            raise DataError(f"k={k} must be >= 1.")
        neighbors = np.full((n, k), -1, dtype=np.int64)  # (N, k)
        sims = np.full((n, k), -np.inf, dtype=np.float32)  # (N, k)
        m = 0
        if previous is not None and previous.neighbors.shape[1] == k and len(previous.keys) <= n and \
                previous.keys == self._keys[:len(previous.keys)]:
            m = len(previous.keys)
            neighbors[:m], sims[:m] = previous.neighbors, previous.similarities
        want = min(k + 1, n)
        for start in range(m, n, _SEARCH_BATCH):  # the new rows (all of them without a previous graph)
            stop = min(n, start + _SEARCH_BATCH)
            block = self._index.reconstruct_n(start, stop - start)  # (B, D)
            s, r = self._index.search(block, want)  # (B, k+1)
            for j in range(stop - start):
                keep = (r[j] >= 0) & (r[j] != start + j)
                rr, ss = r[j][keep][:k], s[j][keep][:k]
                neighbors[start + j, :len(rr)] = rr
                sims[start + j, :len(ss)] = ss
        if 0 < m < n:
            self._merge_added(m, k, neighbors, sims)
        return KnnGraph(self.keys, neighbors, sims)

    def _merge_added(self, m: int, k: int, neighbors: IntArray, sims: FloatArray) -> None:
        """Merge the rows added after row ``m - 1`` into the neighbour lists of rows ``0..m-1`` (in place)."""
        n = len(self)
        added = faiss.IndexFlatIP(self.dim)
        added.add(self._index.reconstruct_n(m, n - m))  # (N - M, D)
        for start in range(0, m, _SEARCH_BATCH):
            stop = min(m, start + _SEARCH_BATCH)
            s, r = added.search(self._index.reconstruct_n(start, stop - start), min(k, n - m))  # (B, k')
            found = r >= 0
            cand_r = np.concatenate([neighbors[start:stop], np.where(found, r + m, -1)], axis=1)  # (B, k + k')
            cand_s = np.concatenate([sims[start:stop], np.where(found, s, -np.inf).astype(np.float32)], axis=1)
            best = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]  # (B, k)
            neighbors[start:stop] = np.take_along_axis(cand_r, best, axis=1)
            sims[start:stop] = np.take_along_axis(cand_s, best, axis=1)

    def pairs_above(self, threshold: float, start: int = 0) -> tuple[IntArray, FloatArray]:
        """Pairs of distinct rows whose cosine similarity is at least ``threshold`` (exact; see
        :mod:`model.neighbors.pairs`: about ``N^1.5`` products for a near-duplicate threshold instead of ``N²``).

        Args:
            threshold: the cosine similarity a pair must reach.
            start: only pairs with at least one row ``>= start`` (the rows added since an earlier call with the
                old length: an incremental update costs at most ``(N - start) × N`` products instead of ``N × N``).

        Returns:
            ``(pairs (P, 2) int64 with i < j, similarities (P,) float32)``, ordered by ``(i, j)``.
        """
        single_threaded()
        return similar_pairs(self._index, threshold, start)

    # ----- persistence --------------------------------------------------------------------------------
    def save(self, directory: Path | str, durable: bool = False) -> Path:
        """Write the index as a new generation of ``directory`` and make it current (see the module docstring).

        Args:
            directory: the index directory (created).
            durable: fsync files and directories (a crash after the call cannot lose the index).

        Returns:
            The new generation's directory.
        """
        meta = {"dim": self.dim, "count": len(self), "encoder_version": self.encoder_version, "metric": "cosine",
                "faiss": faiss.__version__}
        return write_generation(Path(directory), self._index, self._keys, meta, durable)

    @classmethod
    def load(cls, directory: Path | str) -> NeighborIndex:
        """The current generation of ``directory`` (see :func:`load_index`)."""
        return load_index(directory)


def _load_generation(gen: Path) -> NeighborIndex:
    single_threaded()
    meta, keys, flat = read_generation(gen)
    index = NeighborIndex(int(meta["dim"]), str(meta.get("encoder_version", "")))
    index._index = flat
    index._keys = keys
    index._rows = {k: i for i, k in enumerate(keys)}
    return index


def load_index(directory: Path | str) -> NeighborIndex:
    """Load the current generation of an index directory written by :meth:`NeighborIndex.save`.

    Raises:
        DataError: no index there yet, or its files are damaged or disagree (naming the remedy).
    """
    root = Path(directory)
    for attempt in range(3):  # a save may retire the generation between reading CURRENT and its files
        try:
            name = (root / CURRENT).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise DataError(f"no neighbour index in {root} yet: it is built by training.") from None
        try:
            return _load_generation(root / name)
        except DataError:
            if attempt == 2 or (root / CURRENT).read_text(encoding="utf-8").strip() == name:
                raise
    raise AssertionError("unreachable")
