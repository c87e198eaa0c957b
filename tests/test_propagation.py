"""The kNN graph (against brute force) and label propagation (spreading, consistency of the levels)."""

from __future__ import annotations

import numpy as np
import pytest

from model.neighbors.index import knn_graph
from model.propagation import level_probs, propagate


def _clusters(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three tight clusters of 20 points in 6-D (leaf 0, 1, 2), one NaN row (an unreadable image) at the end."""
    rng = np.random.default_rng(seed)
    centres = np.eye(6)[:3] * 5
    emb = np.concatenate([c + rng.normal(0, 0.3, (20, 6)) for c in centres] + [np.full((1, 6), np.nan)])
    return emb.astype(np.float32), np.array([0] * 20 + [1] * 20 + [2] * 20 + [-1])


def test_knn_graph_matches_brute_force_cosine_and_skips_unreadable_rows() -> None:
    emb, _ = _clusters()
    idx, sim = knn_graph(emb, k=5)
    unit = emb[:60] / np.linalg.norm(emb[:60], axis=1, keepdims=True)
    cos = unit @ unit.T
    np.fill_diagonal(cos, -np.inf)
    expected = np.argsort(-cos, axis=1)[:, :5]
    assert (np.sort(idx[:60], axis=1) == np.sort(expected, axis=1)).all()
    assert sim[:60] == pytest.approx(np.take_along_axis(cos, idx[:60], axis=1), abs=1e-5)
    assert (idx[60] == -1).all() and not (idx[:60] == 60).any()


def test_labels_spread_within_their_cluster_and_levels_are_sums_of_leaves() -> None:
    emb, leaf = _clusters()
    seeds = np.full(len(emb), -1)
    seeds[[0, 20, 40]] = [0, 1, 2]  # one label per cluster
    probs = propagate(*knn_graph(emb, k=5), seeds, n_classes=3)
    assert probs.shape == (61, 3) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert (probs[:60].argmax(axis=1) == leaf[:60]).all()
    assert probs[60] == pytest.approx(np.full(3, 1 / 3))  # nothing reaches an unreadable image
    leaf_paths = [("Warm", "Red"), ("Warm", "Orange"), ("Cold", "Blue")]
    top, nodes = level_probs(probs, leaf_paths, level=0)
    assert nodes == [("Warm",), ("Cold",)]
    assert top[:, 0] == pytest.approx(probs[:, 0] + probs[:, 1]) and top[:, 1] == pytest.approx(probs[:, 2])
    # a class without any label gets no mass: the others keep theirs
    seeds[40] = -1
    probs = propagate(*knn_graph(emb, k=5), seeds, n_classes=3)
    assert probs[:40, 2].max() < 0.05 and (probs[:40].argmax(axis=1) == leaf[:40]).all()
