"""Consistent best-path decoding and temperature calibration, checked against brute-force references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from model.errors import DataError
from model.heads.calibration import fit_temperature, path_nll
from model.heads.decode import decode, path_log_probs
from model.taxonomy import IGNORE, Taxonomy

TWO_BY_TWO = Taxonomy.from_nested({"A": ["a1", "a2"], "B": ["b1", "b2"]})
RAGGED = Taxonomy.from_nested({"pet": {"cat": ["tabby", "siamese"], "dog": None}, "bird": None})


def logits_from_probs(*levels: list[float]) -> list[np.ndarray]:
    return [np.log(np.asarray([p], dtype=np.float64)) for p in levels]


def brute_force_paths(level_logits: list[np.ndarray], taxonomy: Taxonomy, t: float = 1.0) -> dict[tuple, float]:
    """Reference: product of level softmaxes for every leaf, renormalised, written as a plain loop."""
    probs = []
    for a in level_logits:
        e = np.exp(a[0] / t - (a[0] / t).max())
        probs.append(e / e.sum())
    raw = {}
    for leaf in taxonomy.leaves():
        idx = taxonomy.encode(leaf.path)
        raw[leaf.path] = float(np.prod([probs[k][idx[k]] for k in range(taxonomy.depth)]))
    z = sum(raw.values())
    return {p: v / z for p, v in raw.items()}


def greedy(level_logits: list[np.ndarray], taxonomy: Taxonomy) -> tuple[str, ...]:
    names = [taxonomy.class_names(k)[int(np.argmax(a[0]))] for k, a in enumerate(level_logits)]
    return tuple(names[-1].split("/"))


def test_best_path_beats_inconsistent_greedy() -> None:
    # Level 0 prefers A, level 1 prefers B/b1: greedy per level names a child outside its parent.
    logits = logits_from_probs([0.6, 0.4], [0.25, 0.25, 0.5, 0.0 + 1e-12])
    assert greedy(logits, TWO_BY_TWO) == ("B", "b1")  # level-1 argmax, inconsistent with level-0 "A"
    assert TWO_BY_TWO.class_names(0)[int(np.argmax(logits[0][0]))] == "A"
    (pred,) = decode(logits, TWO_BY_TWO)
    ref = brute_force_paths(logits, TWO_BY_TWO)
    assert pred.path == max(ref, key=ref.get) == ("B", "b1")
    assert pred.score == pytest.approx(ref[("B", "b1")]) and pred.score == pytest.approx(0.2 / 0.5)
    assert pred.level_scores[0] == pytest.approx(ref[("B", "b1")] + ref[("B", "b2")])


def test_best_path_beats_top_down_greedy() -> None:
    # Top-down greedy: A (0.55), then its best child a1 -> 0.55*0.3 = 0.165 < B/b1 0.45*0.4 = 0.18.
    logits = logits_from_probs([0.55, 0.45], [0.3, 0.3, 0.4, 1e-9])
    (pred,) = decode(logits, TWO_BY_TWO)
    assert pred.path == ("B", "b1")
    ref = brute_force_paths(logits, TWO_BY_TWO)
    assert pred.score == pytest.approx(ref[("B", "b1")])


def test_path_log_probs_match_reference_on_ragged_tree() -> None:
    rng = np.random.default_rng(0)
    logits = [rng.normal(size=(1, RAGGED.num_classes(k))) * 2 for k in range(RAGGED.depth)]
    for t in (0.5, 1.0, 3.0):
        paths, logp = path_log_probs(logits, RAGGED, temperature=t)
        ref = brute_force_paths(logits, RAGGED, t)
        assert set(paths) == set(ref)
        for p, lp in zip(paths, logp[0]):
            assert np.exp(lp) == pytest.approx(ref[p])
        assert np.exp(logp).sum() == pytest.approx(1.0)
    (pred,) = decode(logits, RAGGED)
    assert pred.path == max(ref, key=ref.get)
    assert len(pred.level_scores) == len(pred.path)


def test_ragged_leaf_above_the_last_level_is_predicted() -> None:
    # bird (a leaf at level 0) needs END at levels 1 and 2.
    k1, k2 = RAGGED.num_classes(1), RAGGED.num_classes(2)
    l0 = np.log([[0.1, 0.9]])  # pet, bird
    l1 = np.full((1, k1), -5.0)
    l1[0, RAGGED.end_index(1)] = 5.0
    l2 = np.full((1, k2), -5.0)
    l2[0, RAGGED.end_index(2)] = 5.0
    (pred,) = decode([l0, l1, l2], RAGGED)
    assert pred.path == ("bird",) and pred.score > 0.8


def test_inner_nodes_get_marginals_and_threshold_cuts_back() -> None:
    logits = logits_from_probs([0.9, 0.1], [0.45, 0.45, 0.05, 0.05])
    paths, logp = path_log_probs(logits, TWO_BY_TWO, leafs_only=False)
    probs = dict(zip(paths, np.exp(logp[0])))
    ref = brute_force_paths(logits, TWO_BY_TWO)
    assert probs[("A",)] == pytest.approx(ref[("A", "a1")] + ref[("A", "a2")])
    assert sum(v for p, v in probs.items() if len(p) == 1) == pytest.approx(1.0)
    assert sum(v for p, v in probs.items() if len(p) == 2) == pytest.approx(1.0)
    (pred,) = decode(logits, TWO_BY_TWO, leafs_only=False, prefix_threshold=0.5)
    assert pred.path == ("A",) and pred.score == pytest.approx(probs[("A",)])
    (full,) = decode(logits, TWO_BY_TWO, leafs_only=False, prefix_threshold=0.4)
    assert len(full.path) == 2 and full.score == pytest.approx(probs[full.path])
    (low,) = decode(logits, TWO_BY_TWO, leafs_only=False, prefix_threshold=0.99)
    assert low.path == ("A",)  # always at least the top-level label of the best path


def test_scores_are_probabilities_and_top_k_is_sorted() -> None:
    rng = np.random.default_rng(1)
    logits = [rng.normal(size=(50, RAGGED.num_classes(k))) * 3 for k in range(RAGGED.depth)]
    paths, logp = path_log_probs(logits, RAGGED)
    assert np.all(np.exp(logp).sum(axis=1) <= 1 + 1e-9)
    preds = decode(logits, RAGGED, top_k=3)
    for i, p in enumerate(preds):
        chain = [p, *p.alternatives]
        assert len(chain) == 3 and len({c.path for c in chain}) == 3
        scores = [c.score for c in chain]
        assert scores == sorted(scores, reverse=True) and sum(scores) <= 1 + 1e-9
        assert p.score == pytest.approx(np.exp(logp[i]).max())
        assert all(a >= b - 1e-12 for a, b in zip(p.level_scores, p.level_scores[1:]))
    nodes = decode(logits, RAGGED, leafs_only=False, prefix_threshold=0.5, top_k=2)
    for p in nodes:
        assert p.score <= 1 + 1e-9 and (p.score >= 0.5 or len(p.path) == 1)


def test_torch_input_and_shape_errors() -> None:
    logits = [torch.randn(4, TWO_BY_TWO.num_classes(k)) for k in range(2)]
    preds = decode(logits, TWO_BY_TWO)
    assert len(preds) == 4 and all(len(p.path) == 2 for p in preds)
    with pytest.raises(DataError, match="levels"):
        decode(logits[:1], TWO_BY_TWO)
    with pytest.raises(DataError, match="shape"):
        decode([logits[0], torch.randn(4, 3)], TWO_BY_TWO)


def ece(conf: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in itertools.pairwise(edges):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.mean() * abs(conf[m].mean() - correct[m].mean())
    return total


def overconfident_sample(n: int, taxonomy: Taxonomy, scale: float, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Logits whose softmax is the true sampling distribution, then multiplied by ``scale`` (overconfident)."""
    rng = np.random.default_rng(seed)
    true_logits = [rng.normal(size=(n, taxonomy.num_classes(k))) * 1.2 for k in range(taxonomy.depth)]
    _, logp = path_log_probs(true_logits, taxonomy)
    paths, _ = taxonomy.candidate_paths(True)
    cum = np.exp(logp).cumsum(axis=1)
    draws = (rng.random((n, 1)) > cum).sum(axis=1)
    targets = taxonomy.encode_many([paths[min(j, len(paths) - 1)] for j in draws])
    return [a * scale for a in true_logits], targets


def test_temperature_lowers_calibration_error() -> None:
    logits, targets = overconfident_sample(3000, RAGGED, scale=3.0, seed=2)
    t = fit_temperature(logits, targets, RAGGED)
    assert 2.2 < t < 4.0  # the true temperature is 3
    paths, _ = RAGGED.candidate_paths(True)
    before = decode(logits, RAGGED)
    after = decode(logits, RAGGED, temperature=t)
    true_paths = [paths[int(np.flatnonzero((RAGGED.encode_many(paths) == r).all(axis=1))[0])] for r in targets]
    for_ece = [
        (np.array([p.score for p in preds]), np.array([p.path == tp for p, tp in zip(preds, true_paths)], float))
        for preds in (before, after)
    ]
    e_before, e_after = ece(*for_ece[0]), ece(*for_ece[1])
    assert e_after < 0.5 * e_before
    assert np.nanmean(path_nll(logits, targets, RAGGED, t)) < np.nanmean(path_nll(logits, targets, RAGGED, 1.0))


def test_temperature_uses_prefix_targets_and_skips_unlabelled() -> None:
    logits, targets = overconfident_sample(2000, RAGGED, scale=0.4, seed=3)  # underconfident: T < 1
    t_full = fit_temperature(logits, targets, RAGGED)
    partial = targets.copy()
    partial[::2, 1:] = IGNORE  # half the rows are known only at the top level
    partial[::7] = IGNORE  # and some rows are unlabelled
    t_partial = fit_temperature(logits, partial, RAGGED)
    assert t_full < 0.6 and t_partial < 0.7
    nll = path_nll(logits, partial, RAGGED)
    assert np.isnan(nll[::7]).all() and np.isfinite(nll[1::7]).all()
    assert fit_temperature([a[:0] for a in logits], targets[:0], RAGGED) == 1.0


def test_few_labels_keep_the_temperature_near_one() -> None:
    logits, targets = overconfident_sample(3, RAGGED, scale=1.0, seed=4)
    paths, _ = RAGGED.candidate_paths(True)
    # Three confident correct predictions: without a prior the NLL would push T to its lower bound.
    sharp = [np.where(np.arange(a.shape[1])[None, :] == np.maximum(targets[:, [k]], 0), 3.0, 0.0)
             for k, a in enumerate(logits)]
    t = fit_temperature(sharp, targets, RAGGED)
    assert 0.6 < t < 1.0
    assert fit_temperature(sharp, targets, RAGGED, prior_std=100.0) < 0.3
    with pytest.raises(DataError, match="prefix_threshold"):
        decode(sharp, RAGGED, leafs_only=False, prefix_threshold=1.5)
