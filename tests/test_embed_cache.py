"""Embedding cache: round trip, reopen, version isolation, crash tails, a reader process during writes."""

from __future__ import annotations

import io
import multiprocessing as mp
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.arrays import BoolArray, FloatArray
from model.encoder.cache import EmbeddingCache, embed_through_cache
from model.errors import ConfigError, DataError
from model.features.pixels import PixelFeatures
from model.images import ImageSource, content_hash

DIM = 8


def _key(i: int) -> str:
    return content_hash(f"image-{i}".encode())


def _row(i: int) -> np.ndarray:
    """The embedding the writer stores for key i: a reader can check every value it sees."""
    return (np.arange(DIM, dtype=np.float32) + 1000.0 * i)  # (D,)


def test_round_trip_and_duplicates(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path, "v1", DIM)
    assert len(cache) == 0
    emb, found = cache.get([_key(0)])
    assert emb.shape == (1, DIM) and not found.any()
    assert cache.put([_key(i) for i in range(5)], np.stack([_row(i) for i in range(5)])) == 5
    assert cache.put([_key(3), _key(5), _key(5)], np.stack([_row(99), _row(5), _row(98)])) == 1
    assert len(cache) == 6 and _key(5) in cache and _key(6) not in cache
    emb, found = cache.get([_key(4), _key(7), _key(3), _key(5)])
    assert found.tolist() == [True, False, True, True]
    np.testing.assert_array_equal(emb[0], _row(4))
    np.testing.assert_array_equal(emb[1], np.zeros(DIM))
    np.testing.assert_array_equal(emb[2], _row(3))  # first put wins
    np.testing.assert_array_equal(emb[3], _row(5))


def test_reopen_and_versions_are_isolated(tmp_path: Path) -> None:
    EmbeddingCache(tmp_path, "v1", DIM).put([_key(1)], _row(1)[None])
    other = EmbeddingCache(tmp_path, "v2", DIM)
    assert _key(1) not in other and len(other) == 0
    other.put([_key(1)], _row(2)[None])
    again = EmbeddingCache(tmp_path, "v1", DIM)
    np.testing.assert_array_equal(again.get([_key(1)])[0][0], _row(1))
    np.testing.assert_array_equal(EmbeddingCache(tmp_path, "v2", DIM).get([_key(1)])[0][0], _row(2))
    with pytest.raises(ConfigError, match="holds 8-d rows but dim=16"):
        EmbeddingCache(tmp_path, "v1", 16)


def test_bad_input(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path, "v1", DIM)
    with pytest.raises(DataError, match="sha256"):
        cache.put(["abc"], _row(0)[None])
    with pytest.raises(DataError, match="shape"):
        cache.put([_key(0)], np.zeros((1, DIM + 1)))
    bad = _row(0)[None].copy()
    bad[0, 0] = np.nan
    with pytest.raises(DataError, match="non-finite"):
        cache.put([_key(0)], bad)
    with pytest.raises(ConfigError, match="directory"):
        EmbeddingCache(tmp_path, "../x", DIM)


def test_half_written_tail_is_invisible_and_trimmed(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path, "v1", DIM)
    cache.put([_key(0), _key(1)], np.stack([_row(0), _row(1)]))
    # A writer died after appending a row and half a key of a third record.
    with open(cache.dir / "rows.f32", "ab") as f:
        f.write(_row(2).tobytes()[:20])
    with open(cache.dir / "keys.bin", "ab") as f:
        f.write(bytes.fromhex(_key(2))[:10])
    reader = EmbeddingCache(tmp_path, "v1", DIM)
    assert len(reader) == 2 and _key(2) not in reader
    cache.put([_key(3)], _row(3)[None])
    assert os.path.getsize(cache.dir / "rows.f32") == 3 * DIM * 4
    assert os.path.getsize(cache.dir / "keys.bin") == 3 * 32
    emb, found = reader.get([_key(3), _key(1)])
    assert found.all()
    np.testing.assert_array_equal(emb, np.stack([_row(3), _row(1)]))


def _reader(root: str, total: int, ready: mp.Event, queue: mp.Queue[tuple[int, int, str]]) -> None:
    cache = EmbeddingCache(Path(root), "v1", DIM)
    keys = [_key(i) for i in range(total)]
    checks, problems, seen = 0, "", 0
    ready.set()
    while seen < total:
        emb, found = cache.get(keys)
        seen = int(found.sum())
        for i in np.flatnonzero(found):
            if not np.array_equal(emb[i], _row(int(i))):
                problems = f"row {i} read as {emb[i][:3]}"
        if (~found[: seen]).any():  # rows are appended in key order, so found must be a prefix
            problems = f"found is not a prefix at {seen}"
        checks += 0 < seen < total
        if problems:
            break
    queue.put((checks, seen, problems))


def test_reader_process_during_writes(tmp_path: Path) -> None:
    total = 3000
    EmbeddingCache(tmp_path, "v1", DIM)
    ctx = mp.get_context("spawn")
    queue, ready = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_reader, args=(str(tmp_path), total, ready, queue))
    proc.start()
    assert ready.wait(timeout=60)
    writer = EmbeddingCache(tmp_path, "v1", DIM)
    for start in range(0, total, 7):
        ids = range(start, min(total, start + 7))
        writer.put([_key(i) for i in ids], np.stack([_row(i) for i in ids]))
    checks, seen, problems = queue.get(timeout=120)
    proc.join(timeout=30)
    assert problems == "" and seen == total and proc.exitcode == 0
    assert checks > 1  # the reader saw partial states while the writer was appending


class _CountingPixels(PixelFeatures):
    """The real pixel extractor, counting the images it is asked to compute."""

    def __init__(self) -> None:
        super().__init__()
        self.computed = 0

    def embed_with_mask(self, images: Sequence[ImageSource], progress: bool = False) -> tuple[FloatArray, BoolArray]:
        self.computed += len(images)
        return super().embed_with_mask(images, progress)


def test_embed_through_cache_computes_each_distinct_image_once(tmp_path: Path) -> None:
    """Many tasks showing few images (100k tasks over 10k images) cost one forward per distinct image."""
    rng = np.random.default_rng(0)
    files = []
    for i in range(3):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
        path = tmp_path / f"{i}.png"
        path.write_bytes(buf.getvalue())
        files.append((str(path), content_hash(buf.getvalue())))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    rows = [files[k % 3] for k in range(12)] + [(str(broken), content_hash(b"not an image"))] * 2
    images, hashes = [p for p, _ in rows], [h for _, h in rows]
    extractor = _CountingPixels()
    cache = EmbeddingCache(tmp_path / "cache", extractor.version, extractor.out_dim)
    emb, ok = embed_through_cache(extractor, cache, [*images, None], [*hashes, hashes[0]])
    assert extractor.computed == 4  # 3 images + the unreadable one, once each
    assert ok.tolist() == [True] * 12 + [False, False, True]  # the hash-only row is answered by its twin
    alone, _ = PixelFeatures().embed_with_mask([p for p, _ in files])
    np.testing.assert_array_equal(emb[:12], alone[[k % 3 for k in range(12)]])
    np.testing.assert_array_equal(emb[14], alone[0])
    assert np.isnan(emb[12:14]).all() and len(cache) == 3
    again, ok_again = embed_through_cache(extractor, cache, images, hashes)  # a later run: cache hits only
    assert extractor.computed == 5 and ok_again.tolist() == ok.tolist()[:14]  # only the unreadable one again
    np.testing.assert_array_equal(again[:12], emb[:12])
    plain = _CountingPixels()  # no cache: still one forward per distinct hash
    no_cache, _ = embed_through_cache(plain, None, images, hashes)
    assert plain.computed == 4
    np.testing.assert_array_equal(no_cache[:12], emb[:12])
