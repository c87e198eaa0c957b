"""Embeddings keyed by image content hash, one directory per encoder version, memory-mapped.

Layout of ``root/<encoder_version>/``:

- ``meta.json``: ``{"encoder_version", "dim", "dtype": "float32"}``;
- ``rows.f32``: append-only float32 rows, ``dim`` values each;
- ``keys.bin``: append-only 32-byte sha256 digests; record ``i`` is the key of row ``i``;
- ``lock``: ``fcntl.flock`` target serialising writers.

A writer, under the exclusive lock, first trims any tail a crashed writer left, appends the rows, and only
then appends their keys. Readers take no lock: they trust ``min(keys, rows)`` complete records, so a row is
never visible before it is fully written, and a half-written key record is ignored. One writer process at a
time and any number of reader processes (each with its own ``EmbeddingCache``) are safe; a single
``EmbeddingCache`` object is not meant to be shared between threads without external locking.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from model.arrays import BoolArray, FloatArray
from model.errors import ConfigError, DataError

__all__ = ["EmbeddingCache", "embed_through_cache"]

if TYPE_CHECKING:
    from model.features.extractor import Extractor
    from model.images import ImageSource

_KEY_BYTES = 32


def _digest(h: str) -> bytes:
    try:
        raw = bytes.fromhex(h)
    except (TypeError, ValueError):
        raw = b""
    if len(raw) != _KEY_BYTES:
        raise DataError(f"cache key {h!r} is not a sha256 hex digest; use model.images.content_hash(bytes).")
    return raw


class EmbeddingCache:
    """Embeddings ``(D,)`` float32 by image content hash, for one encoder version.

    Args:
        root: Cache root; the version's directory ``root/<encoder_version>`` is created on first use.
        encoder_version: Id of the encoder whose embeddings these are (see ``encoder_version``).
        dim: Embedding dimension D.

    Raises:
        ConfigError: The version directory exists with another ``dim``, or the version id is not a plain name.
    """

    def __init__(self, root: Path, encoder_version: str, dim: int) -> None:
        if not encoder_version or "/" in encoder_version or encoder_version.startswith("."):
            raise ConfigError(f"encoder_version {encoder_version!r} cannot name a directory; use its hex id.")
        if dim < 1:
            raise ConfigError(f"dim={dim} must be >= 1.")
        self.dir = Path(root) / encoder_version
        self.encoder_version = encoder_version
        self.dim = int(dim)
        self._row_bytes = 4 * self.dim
        self._rows_path = self.dir / "rows.f32"
        self._keys_path = self.dir / "keys.bin"
        self._index: dict[bytes, int] = {}
        self._keys_read = 0  # records of keys.bin already in _index
        self._rows: np.memmap[Any, np.dtype[np.float32]] | None = None
        self._open()

    def _open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        meta_path = self.dir / "meta.json"
        with self._locked():
            if meta_path.exists():
                meta = json.loads(meta_path.read_text())
                if int(meta["dim"]) != self.dim:
                    raise ConfigError(
                        f"embedding cache {self.dir} holds {meta['dim']}-d rows but dim={self.dim} was asked; "
                        "the encoder version id must change when the architecture does (or delete the directory)."
                    )
            else:
                tmp = meta_path.with_suffix(".tmp")
                tmp.write_text(json.dumps({"encoder_version": self.encoder_version, "dim": self.dim,
                                           "dtype": "float32"}))
                os.replace(tmp, meta_path)
            for p in (self._rows_path, self._keys_path):
                p.touch(exist_ok=True)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.dir / "lock", "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _valid_records(self) -> int:
        keys = os.path.getsize(self._keys_path) // _KEY_BYTES
        rows = os.path.getsize(self._rows_path) // self._row_bytes
        return min(keys, rows)

    def refresh(self) -> None:
        """Picks up rows other processes appended since the last look."""
        n = self._valid_records()
        if n > self._keys_read:
            with open(self._keys_path, "rb") as f:
                f.seek(self._keys_read * _KEY_BYTES)
                data = f.read((n - self._keys_read) * _KEY_BYTES)
            for i in range(n - self._keys_read):
                self._index.setdefault(data[i * _KEY_BYTES:(i + 1) * _KEY_BYTES], self._keys_read + i)
            self._keys_read = n
        if n and (self._rows is None or self._rows.shape[0] != n):
            self._rows = np.memmap(self._rows_path, dtype=np.float32, mode="r", shape=(n, self.dim))

    def __len__(self) -> int:
        self.refresh()
        return len(self._index)

    def __contains__(self, h: object) -> bool:
        if not isinstance(h, str):
            return False
        self.refresh()
        return _digest(h) in self._index

    def get(self, hashes: Iterable[str]) -> tuple[FloatArray, BoolArray]:
        """Looks embeddings up.

        Args:
            hashes: N content hashes (sha256 hex).

        Returns:
            ``(embeddings (N, D) float32, found (N,) bool)``; rows not found are zero.
        """
        keys = [_digest(h) for h in hashes]
        self.refresh()
        rows = np.array([self._index.get(k, -1) for k in keys], dtype=np.int64)  # (N,)
        found = rows >= 0
        out = np.zeros((len(keys), self.dim), dtype=np.float32)  # (N, D)
        if found.any():
            assert self._rows is not None
            out[found] = self._rows[rows[found]]
        return out, found

    def put(self, hashes: Iterable[str], emb: FloatArray) -> int:
        """Stores embeddings; keys already present are left as they are.

        Args:
            hashes: N content hashes (sha256 hex).
            emb: Embeddings ``(N, D)``; converted to float32; must be finite.

        Returns:
            How many new rows were appended.

        Raises:
            DataError: Shapes disagree, a key is not a sha256 digest, or a row is not finite.
        """
        keys = [_digest(h) for h in hashes]
        emb = np.asarray(emb, dtype=np.float32)
        if emb.ndim != 2 or emb.shape != (len(keys), self.dim):
            raise DataError(f"put got embeddings of shape {emb.shape} for {len(keys)} keys; "
                            f"expected ({len(keys)}, {self.dim}).")
        if not np.isfinite(emb).all():
            raise DataError("put got non-finite embeddings (NaN marks an unreadable image); store only rows "
                            "whose image was embedded.")
        with self._locked():
            # Trim what a writer that died between the two appends left behind.
            n = self._valid_records()
            for path, size in ((self._rows_path, n * self._row_bytes), (self._keys_path, n * _KEY_BYTES)):
                if os.path.getsize(path) != size:
                    os.truncate(path, size)
            self.refresh()
            new: dict[bytes, int] = {}
            for i, k in enumerate(keys):
                if k not in self._index and k not in new:
                    new[k] = i
            if not new:
                return 0
            order = list(new.values())
            with open(self._rows_path, "ab") as f:
                f.write(np.ascontiguousarray(emb[order]).tobytes())
                f.flush()
            with open(self._keys_path, "ab") as f:
                f.write(b"".join(new.keys()))
                f.flush()
            self.refresh()
            return len(order)


def embed_through_cache(
    embedder: Extractor,
    cache: EmbeddingCache | None,
    images: Sequence[ImageSource | None],
    hashes: Sequence[str | None] | None,
    progress: bool = False,
) -> tuple[FloatArray, BoolArray]:
    """Embeddings of ``images``, read from ``cache`` where their content hash is known, computed (and stored)
    otherwise.

    Args:
        embedder: the encoder whose version ``cache`` belongs to.
        cache: the embedding cache, or None to compute everything.
        images: N image sources (paths, bytes, PIL images, uint8 arrays); None where the caller only has
            the hash (such a row is ok only when its hash is cached).
        hashes: N content hashes (None where unknown: computed, not cached), or None.
        progress: show a progress bar while computing.

    Returns:
        ``(emb (N, D) float32, ok (N,) bool)``; rows of unreadable images are NaN with ``ok`` False. Rows with
        the same known hash are computed once (100k tasks over 10k distinct images cost 10k forwards).
    """
    n = len(images)
    out = np.full((n, embedder.out_dim), np.nan, dtype=np.float32)  # (N, D)
    ok = np.zeros(n, dtype=bool)
    key_of: dict[int, str] = {}  # row -> content hash, for the rows the cache can answer or store
    if cache is not None and hashes is not None:
        key_of = {i: h for i, h in enumerate(hashes) if h}
    if cache is not None and key_of:
        keyed = list(key_of)
        got, found = cache.get([key_of[i] for i in keyed])
        rows = [i for i, hit in zip(keyed, found) if hit]
        out[rows] = got[found]
        ok[rows] = True
    # One forward per distinct content hash: rows sharing a hash (one image shown by many tasks) copy its row.
    todo: list[int] = []  # rows to compute: the first readable source of each missing hash, every unhashed one
    sources: list[ImageSource] = []  # their images
    first_of: dict[str, int] = {}  # hash -> the row computed for it
    for i, image in enumerate(images):
        h = hashes[i] if hashes is not None else None
        if ok[i] or image is None or (h and h in first_of):
            continue
        if h:
            first_of[h] = i
        todo.append(i)
        sources.append(image)
    if todo:
        new, new_ok = embedder.embed_with_mask(sources, progress=progress)  # (M, D), (M,)
        rows = [i for i, good in zip(todo, new_ok) if good]
        out[rows] = new[new_ok]
        ok[rows] = True
        store = [i for i in rows if i in key_of]
        if cache is not None and store:
            cache.put([key_of[i] for i in store], out[store])
        if hashes is not None:
            same = [(i, first_of[h]) for i, h in enumerate(hashes) if not ok[i] and h and h in first_of]
            if same:
                dst, src = zip(*same)
                out[list(dst)] = out[list(src)]
                ok[list(dst)] = ok[list(src)]
    return out, ok
