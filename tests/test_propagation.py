"""The kNN graph (against brute force) and label propagation (spreading, consistency of the levels)."""

from __future__ import annotations

import numpy as np
import pytest

from model.neighbors.graph import knn_graph
from model.propagation import leaf_probabilities, level_probs, path_predictions, propagate, seed_matrix, spread


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


# ---- serving propagated paths: soft seeds, unreached components, consistent paths --------------------------

LEAVES = [("Warm", "Red"), ("Warm", "Orange"), ("Cold", "Blue")]


def test_seed_matrix_spreads_a_prefix_label_over_its_leaves_and_ignores_unknown_paths() -> None:
    y = seed_matrix(4, {0: [("Warm", "Red")], 1: [("Warm",)], 2: [("Warm", "Red"), ("Cold", "Blue")],
                        3: [("Nowhere",)]}, LEAVES)
    assert y.tolist() == [[1, 0, 0], [0.5, 0.5, 0], [1, 0, 1], [0, 0, 0]]


def test_a_component_without_labels_gets_no_prediction_and_the_others_consistent_paths() -> None:
    emb, leaf = _clusters()
    idx, sim = knn_graph(emb, k=5)
    seeds = seed_matrix(len(emb), {0: [LEAVES[0]], 20: [LEAVES[1]]}, LEAVES)  # cluster 2 (Cold/Blue) unlabelled
    probs, reached = leaf_probabilities(spread(idx, sim, seeds))
    assert reached[:40].all() and not reached[40:].any()  # clusters are separate components of the 5-NN graph
    preds = path_predictions(probs, reached, LEAVES, leafs_only=True)
    assert [p.path for p in preds[:40]] == [LEAVES[c] for c in leaf[:40]]
    assert all(p is None for p in preds[40:])
    for p, row in zip(preds[:40], probs[:40]):
        assert p.score == pytest.approx(row.max(), abs=1e-6)
        assert p.level_scores[0] >= p.level_scores[1] == pytest.approx(p.score)  # a child never beats its parent
        assert p.level_scores[0] == pytest.approx(row[0] + row[1], abs=1e-6)  # Warm = Red + Orange


def test_without_leafs_only_a_path_stops_at_the_deepest_prefix_that_reaches_the_threshold() -> None:
    probs = np.array([[0.45, 0.40, 0.15], [0.9, 0.05, 0.05], [0.3, 0.3, 0.4]], dtype=np.float32)
    reached = np.array([True, True, True])
    preds = path_predictions(probs, reached, LEAVES, leafs_only=False, prefix_threshold=0.5)
    # row 2: the best leaf (Blue, 0.4) names the path, as model.heads.decode does; Cold reaches only 0.4 < 0.5, and
    # a path keeps at least its top level
    assert [p.path for p in preds] == [("Warm",), ("Warm", "Red"), ("Cold",)]
    assert [p.score for p in preds] == pytest.approx([0.85, 0.9, 0.4])
    assert path_predictions(probs, reached, LEAVES, leafs_only=False, prefix_threshold=0.2)[0].path == ("Warm", "Red")


def test_propagate_keeps_its_hard_label_form() -> None:
    emb, leaf = _clusters()
    seeds = np.full(len(emb), -1)
    seeds[[0, 20, 40]] = [0, 1, 2]
    soft = seed_matrix(len(emb), {0: [LEAVES[0]], 20: [LEAVES[1]], 40: [LEAVES[2]]}, LEAVES)
    graph = knn_graph(emb, k=5)
    assert propagate(*graph, seeds, n_classes=3) == pytest.approx(leaf_probabilities(spread(*graph, soft))[0])
