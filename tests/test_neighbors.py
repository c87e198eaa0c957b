"""The kNN index (model.neighbors.index) against a brute-force numpy reference, its persistence, and the
duplicate grouping (model.neighbors.duplicates)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from model.errors import DataError
from model.neighbors import AUTO_THRESHOLD_CAP
from model.neighbors.duplicates import (
    DuplicateKind,
    auto_threshold,
    calibrate_threshold,
    conflicting_groups,
    duplicate_groups,
    near_pairs,
)
from model.neighbors.index import NeighborIndex, load_index


def rows(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)  # (N, D)


def keys(n: int, prefix: str = "k") -> list[str]:
    return [hashlib.sha256(f"{prefix}{i}".encode()).hexdigest() for i in range(n)]


def brute_force(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    b = base / np.linalg.norm(base, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return np.argsort(-(q @ b.T), axis=1, kind="stable")[:, :k]  # (Q, k)


def test_search_matches_brute_force_and_scores_are_cosines():
    base, queries = rows(500), rows(20, seed=1)
    index = NeighborIndex.build(keys(500), base, encoder_version="enc")
    sims, found = index.search(queries, 10)
    assert found.shape == (20, 10) and sims.dtype == np.float32
    assert (found == brute_force(base, queries, 10)).mean() > 0.99  # ties aside, the same rows
    cos = (queries[0] / np.linalg.norm(queries[0])) @ (base[found[0, 0]] / np.linalg.norm(base[found[0, 0]]))
    assert sims[0, 0] == pytest.approx(cos, abs=1e-5)
    assert (np.diff(sims, axis=1) <= 1e-6).all()  # most similar first


def test_similar_to_leaves_the_row_itself_out_and_pads_small_indexes():
    index = NeighborIndex.build(["a", "b", "c"], rows(3))
    got = index.similar_to("a", 5)
    assert [k for k, _ in got] and "a" not in [k for k, _ in got] and len(got) == 2
    sims, found = index.search(rows(1, seed=3), 5)
    assert (found[0, 3:] == -1).all() and np.isneginf(sims[0, 3:]).all()


def test_add_is_incremental_and_skips_known_keys():
    base = rows(300)
    index = NeighborIndex.build(keys(200), base[:200])
    assert index.add(keys(300), base) == 100  # only the new keys
    assert len(index) == 300 and keys(300)[250] in index
    whole = NeighborIndex.build(keys(300), base)
    q = rows(5, seed=7)
    assert (index.search(q, 8)[1] == whole.search(q, 8)[1]).all()


def test_bad_rows_are_refused_with_the_reason():
    index = NeighborIndex(4)
    with pytest.raises(DataError, match="NaN"):
        index.add(["a"], np.array([[np.nan, 0, 0, 1]], dtype=np.float32))
    with pytest.raises(DataError, match="zero length"):
        index.add(["a"], np.zeros((1, 4), dtype=np.float32))
    with pytest.raises(DataError, match="shape"):
        index.add(["a", "b"], np.ones((1, 4), dtype=np.float32))
    with pytest.raises(DataError, match="single-line"):
        index.add(["a\nb"], np.ones((1, 4), dtype=np.float32))
    assert len(index) == 0


def test_knn_graph_matches_brute_force_without_self_loops():
    base = rows(5000, d=8, seed=2)  # more rows than one search block
    graph = NeighborIndex.build(keys(5000), base).knn(5)
    assert graph.neighbors.shape == (5000, 5) and len(graph.keys) == 5000
    assert not (graph.neighbors == np.arange(5000)[:, None]).any()
    sample = np.arange(0, 5000, 97)
    expected = brute_force(base, base[sample], 6)[:, 1:]  # first column: the row itself
    assert (graph.neighbors[sample] == expected).mean() > 0.99


def test_knn_graph_extended_after_adding_rows_equals_a_full_pass():
    base = rows(5000, d=8, seed=3)  # more rows than one search block, old and new
    index = NeighborIndex.build(keys(4500), base[:4500])
    before = index.knn(5)
    index.add(keys(5000)[4500:], base[4500:])
    extended, full = index.knn(5, previous=before), index.knn(5)
    assert extended.keys == full.keys
    assert extended.similarities == pytest.approx(full.similarities, abs=1e-6)  # old rows gained new neighbours
    assert (extended.neighbors == full.neighbors).mean() > 0.999  # up to the order of exact ties
    assert index.knn(5, previous=extended).neighbors.tolist() == extended.neighbors.tolist()  # nothing added
    # a graph of other rows, or of another k, is not trusted
    other = NeighborIndex.build(keys(4500)[::-1], base[:4500][::-1]).knn(5)
    assert index.knn(5, previous=other).similarities == pytest.approx(full.similarities, abs=1e-6)
    assert index.knn(4, previous=before).similarities == pytest.approx(full.similarities[:, :4], abs=1e-6)


def test_save_load_round_trip_and_generations(tmp_path):
    base = rows(100)
    index = NeighborIndex.build(keys(100), base, encoder_version="enc1")
    first = index.save(tmp_path / "nn")
    loaded = load_index(tmp_path / "nn")
    assert loaded.keys == index.keys and loaded.encoder_version == "enc1" and loaded.dim == 16
    q = rows(3, seed=5)
    assert (loaded.search(q, 7)[1] == index.search(q, 7)[1]).all()
    loaded.add(keys(120), rows(120))
    second = loaded.save(tmp_path / "nn")
    third = loaded.save(tmp_path / "nn")
    assert len(load_index(tmp_path / "nn")) == 120
    gens = sorted(p.name for p in (tmp_path / "nn").iterdir() if p.name.startswith("gen-"))
    assert gens == sorted([second.name, third.name]) and first.name not in gens  # current + previous kept


def test_a_crashed_save_leaves_the_previous_index_and_damage_is_reported(tmp_path, monkeypatch):
    index = NeighborIndex.build(keys(10), rows(10))
    index.save(tmp_path / "nn")
    bigger = NeighborIndex.build(keys(20), rows(20))

    def crash(*_args):
        raise OSError("disk full")

    monkeypatch.setattr("model.neighbors.index.faiss.write_index", crash)
    with pytest.raises(OSError):
        bigger.save(tmp_path / "nn")
    monkeypatch.undo()
    assert len(load_index(tmp_path / "nn")) == 10
    assert not [p for p in (tmp_path / "nn").iterdir() if p.name.startswith(".tmp-")]
    current = (tmp_path / "nn" / "CURRENT").read_text().strip()
    (tmp_path / "nn" / current / "keys.txt").write_text("only-one\n")
    with pytest.raises(DataError, match="inconsistent.*rebuilt by the next training"):
        load_index(tmp_path / "nn")
    with pytest.raises(DataError, match="no neighbour index"):
        load_index(tmp_path / "elsewhere")


def test_duplicate_groups_exact_near_and_apart():
    base = rows(6, d=32, seed=4)
    near = base[0] + 0.01 * rows(1, d=32, seed=9)[0]  # a slightly changed copy of image 0
    index = NeighborIndex.build(["h0", "h1", "h2", "h3", "h4", "h5", "h0b"], np.vstack([base, near]))
    # tasks 10 and 11 hold the same bytes (h1); task 20 holds h0 and task 21 its near copy; the rest are distinct
    items = [10, 11, 20, 21, 30, 31, 32]
    hashes = ["h1", "h1", "h0", "h0b", "h2", "h3", "h4"]
    groups = duplicate_groups(items, hashes, near_pairs(index, threshold=0.95))
    by_items = {g.items: g for g in groups}
    assert set(by_items) == {(10, 11), (20, 21)}
    assert by_items[(10, 11)].kind is DuplicateKind.EXACT and by_items[(10, 11)].similarity == 1.0
    assert by_items[(20, 21)].kind is DuplicateKind.NEAR and 0.95 <= by_items[(20, 21)].similarity < 1.0
    assert by_items[(20, 21)].to_dict()["keys"] == ["h0", "h0b"]
    # without an index only the exact group remains
    assert [g.items for g in duplicate_groups(items, hashes)] == [(10, 11)]
    # a threshold of 1.0 keeps the near copy apart
    assert [g.items for g in duplicate_groups(items, hashes, near_pairs(index, threshold=1.0))] == [(10, 11)]


def test_near_duplicates_chain_into_one_group():
    a = rows(1, d=16, seed=1)[0]
    chain = np.vstack([a + 0.02 * i * rows(1, d=16, seed=10 + i)[0] for i in range(4)])
    index = NeighborIndex.build(["c0", "c1", "c2", "c3"], chain)
    groups = duplicate_groups([1, 2, 3, 4], ["c0", "c1", "c2", "c3"], near_pairs(index, threshold=0.99))
    assert len(groups) == 1 and groups[0].items == (1, 2, 3, 4)


def test_conflicting_groups_need_two_different_labels():
    groups = duplicate_groups([1, 2, 3, 4, 5], ["x", "x", "y", "y", "z"])
    assert [g.items for g in conflicting_groups(groups, {1: ("A", "Cat"), 2: ("A", "Dog"), 3: ("A",)})] == [(1, 2)]
    assert conflicting_groups(groups, {1: ("A", "Cat"), 2: ("A", "Cat"), 3: ("A",), 4: None}) == []


def test_calibrate_threshold_bounds_false_positives():
    negatives = np.linspace(0.0, 0.9, 1000)
    positives = np.array([0.95, 0.99, 0.5])
    t = calibrate_threshold(positives, negatives, max_false_positive_rate=0.01)
    assert t.false_positive_rate <= 0.01 and t.value <= 0.9
    assert t.recall == pytest.approx(2 / 3)
    strict = calibrate_threshold(positives, negatives, max_false_positive_rate=0.0)
    assert strict.false_positive_rate == 0.0 and strict.value > 0.9


def _cosine_nearest(base: np.ndarray) -> np.ndarray:
    """Each row's cosine similarity to its most similar other row (numpy reference)."""
    x = base / np.linalg.norm(base, axis=1, keepdims=True)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    return sims.max(axis=1)  # (N,)


def test_the_automatic_threshold_follows_the_encoders_scale_and_finds_rare_copies():
    # two "encoders" of the same 2,000 distinct images: one spreads them, one packs them into a narrow cone
    spread = rows(2000, d=16, seed=3)
    packed = spread * 0.1 + rows(1, d=16, seed=4)[0] * 1.0
    for base in (spread, packed):
        t = auto_threshold(NeighborIndex.build(keys(2000), base), cap=1.0)
        nearest = _cosine_nearest(base)
        # at most 0.5 % of the images reach it with their nearest other image, and it is no higher than needed
        # (1e-5: faiss and numpy round float32 products differently)
        assert (nearest >= t.value + 1e-5).mean() <= 0.005 and (nearest >= t.value - 1e-5).mean() >= 0.004
        assert np.isnan(t.recall)
    low = auto_threshold(NeighborIndex.build(keys(2000), spread)).value
    high = auto_threshold(NeighborIndex.build(keys(2000), packed), cap=1.0).value
    assert low < 0.99 < high < 0.9996
    # the cap: a quantile above it (many images with copies, or a tightly packed encoder) is cut to it
    assert auto_threshold(NeighborIndex.build(keys(2000), packed), cap=0.98).value == 0.98
    assert auto_threshold(NeighborIndex.build(keys(2000), spread)).value == low  # below the default cap: kept
    # 5 near copies among 2,005 images (0.25 %): found at the automatic threshold, with few distinct pairs
    copies = spread[:5] + 1e-3 * rows(5, d=16, seed=5)
    index = NeighborIndex.build(keys(2005), np.vstack([spread, copies]))
    found = {(a, b) for a, b, _ in near_pairs(index, auto_threshold(index).value)}
    assert {(keys(2005)[i], keys(2005)[2000 + i]) for i in range(5)} <= found and len(found) <= 5 + 10


def test_the_automatic_threshold_samples_a_large_index_and_handles_tiny_ones():
    base = rows(3000, d=8, seed=8)
    index = NeighborIndex.build(keys(3000), base)
    sampled = auto_threshold(index, sample=1000)
    assert abs(sampled.value - auto_threshold(index).value) < 0.02
    assert auto_threshold(NeighborIndex.build(keys(1), base[:1])).value == AUTO_THRESHOLD_CAP
    assert auto_threshold(NeighborIndex(8)).value == AUTO_THRESHOLD_CAP


def test_incremental_pairs_equal_a_full_pass():
    base = rows(300, d=8, seed=6)
    base[250] = base[10] + 1e-3  # a near copy arriving later
    base[260] = base[255] + 1e-3  # two near copies both new
    index = NeighborIndex.build(keys(200), base[:200])
    before = near_pairs(index, 0.999)
    index.add(keys(300), base)
    after = before + near_pairs(index, 0.999, start=200)
    full = near_pairs(NeighborIndex.build(keys(300), base), 0.999)
    assert sorted((a, b) for a, b, _ in after) == sorted((a, b) for a, b, _ in full)
    assert {(keys(300)[10], keys(300)[250]), (keys(300)[255], keys(300)[260])} <= {(a, b) for a, b, _ in full}


def brute_pairs(base: np.ndarray, threshold: float, start: int = 0) -> set[tuple[int, int]]:
    """Pairs i < j with cosine >= threshold and j >= start, by numpy in blocks (the reference)."""
    x = base / np.linalg.norm(base, axis=1, keepdims=True)
    found = set()
    for lo in range(0, len(x), 2048):
        sims = x[lo:lo + 2048] @ x.T  # (B, N)
        for i, j in zip(*np.nonzero(sims >= threshold)):
            a, b = lo + int(i), int(j)
            if a < b and b >= start:
                found.add((a, b))
    return found


def test_the_cell_pruned_pair_search_finds_exactly_the_pairs_of_a_full_search():
    """From MIN_PRUNED_ROWS rows the near-duplicate search compares a row only with the k-means cells where the
    triangle inequality allows a partner; it must still find every pair (incremental ones too), and fall back to
    the full search where the cells save nothing (a low threshold)."""
    from model.neighbors import pairs

    n, d = pairs.MIN_PRUNED_ROWS + 800, 32
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(40, d))
    base = (centers[rng.integers(0, 40, n)] + 0.5 * rng.normal(size=(n, d))).astype(np.float32)  # (N, D)
    base /= np.linalg.norm(base, axis=1, keepdims=True)

    def near_copy(rows: np.ndarray) -> np.ndarray:  # at distance 0.035 (cosine 0.99939): some cross a cell border
        step = rng.normal(size=rows.shape)
        step -= (step * rows).sum(axis=1, keepdims=True) * rows  # orthogonal to the row
        moved = rows + 0.035 * step / np.linalg.norm(step, axis=1, keepdims=True)
        return moved / np.linalg.norm(moved, axis=1, keepdims=True)

    originals = rng.choice(n - 2000, 1000, replace=False)
    base[n - 800:] = near_copy(base[originals[:800]])  # near copies among the new rows
    base[originals[800:] + 1] = near_copy(base[originals[800:]])  # and among the old ones
    index = NeighborIndex.build(keys(n), base)
    vectors = pairs.flat_vectors(index._index)
    assert pairs.pruned_pays(n, 0) and pairs._pruned(vectors, 0.999, 0) is not None  # the cells do run here
    for start in (0, n - 4000):
        got, sims = index.pairs_above(0.999, start=start)
        expected = brute_pairs(base, 0.999, start)
        assert len(expected) >= (700 if start else 900)  # (a few copies overwrote an original)
        assert {(int(a), int(b)) for a, b in got} == expected and len(got) == len(expected)
        assert (sims >= 0.999).all() and (got[:, 0] < got[:, 1]).all()
    assert pairs._pruned(vectors, 0.5, 0) is None  # 2r spans the cells: the full search runs instead


def test_a_forked_child_can_search_after_the_parent_did():
    """RQ runs each job in a forked work horse: GNU OpenMP hangs there if the parent ran a multi-threaded search."""
    import os
    import signal
    import time

    import faiss

    faiss.omp_set_num_threads(2)  # whatever the process had set, the index keeps faiss at one thread
    base = rows(3000, d=32, seed=11)
    index = NeighborIndex.build(keys(3000), base)
    assert faiss.omp_get_max_threads() == 1
    near_pairs(index, 0.5)  # many queries at once in the parent
    pid = os.fork()
    if pid == 0:  # the child: the same search, then leave without running pytest's teardown
        try:
            near_pairs(index, 0.5)
        finally:
            os._exit(0)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("the forked child hung in faiss (OpenMP after fork)")


def test_knn_graph_of_a_plain_matrix_skips_unusable_rows():
    from model.neighbors.graph import knn_graph

    base = rows(200, d=8, seed=12)
    base[5] = np.nan  # an unreadable image
    base[7] = 0.0  # a zero vector has no direction
    idx, sim = knn_graph(base, 4)
    assert idx.shape == (200, 4) and sim.dtype == np.float32
    assert (idx[5] == -1).all() and (idx[7] == -1).all() and (sim[5] == 0).all()
    assert not np.isin(idx, [5, 7]).any() and not (idx == np.arange(200)[:, None]).any()
    usable = np.array([i for i in range(200) if i not in (5, 7)])
    expected = brute_force(base[usable], base[usable][:20], 5)[:, 1:]
    assert (idx[usable[:20]] == usable[expected]).mean() > 0.99
    small, _ = knn_graph(base[:3], 4)  # fewer rows than k: the rest is -1
    assert (small[:, 2:] == -1).all() and (small[:, :2] >= 0).all()
