"""fit(): out-of-fold calibration and evaluation, final heads, few-label fallbacks and error messages."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.errors import DataError, TaxonomyError
from model.heads.heads import HeadsConfig
from model.heads.training import cross_validate, fit, predict, stratified_folds
from model.taxonomy import Taxonomy

TAX = Taxonomy.from_nested({"wild": ["bear", "zebra"], "pet": ["cat", "dog"], "bird": None})
FAST = HeadsConfig(hidden=32, epochs=5, min_steps=60, batch_size=64)
LEAVES = [leaf.path for leaf in TAX.leaves()]


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def clustered(n: int, noise: float = 0.7, seed: int = 0) -> tuple[np.ndarray, list[tuple[str, ...]]]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(LEAVES), 12)) * 2
    which = np.arange(n) % len(LEAVES)
    emb = (centres[which] + rng.normal(size=(n, 12)) * noise).astype(np.float32)
    return emb, [LEAVES[i] for i in which]


def test_fit_gives_out_of_fold_predictions_and_good_final_heads() -> None:
    emb, paths = clustered(160)
    labels: list = list(paths)
    for i in range(0, 160, 4):
        labels[i] = None  # unlabelled images are ignored
    labels[1] = ("pet",)  # an annotator stopped at the top level
    result = fit(emb, labels, TAX, FAST, folds=4)
    assert result.labelled_index.tolist() == [i for i in range(160) if i % 4]
    n_lab = 120
    assert [p.shape for p in result.oof_level_probs] == [(n_lab, 3), (n_lab, 5)]
    assert all(np.allclose(p.sum(1), 1, atol=1e-5) for p in result.oof_level_probs)
    assert len(result.oof_predictions) == n_lab and result.targets.shape == (n_lab, 2)
    assert sorted(np.bincount(result.fold_of).tolist()) == [30, 30, 30, 30]
    m = result.metrics
    json.dumps(m)
    assert m["folds"] == 4 and m["n_labelled"] == n_lab and m["path_accuracy"] > 0.9
    assert m["hierarchical"]["hF"] > 0.9 and 0.05 < result.temperature < 20
    preds = predict(result.heads, result.temperature, emb[::4], TAX)
    assert np.mean([p.path == t for p, t in zip(preds, paths[::4])]) > 0.9
    nodes = predict(result.heads, result.temperature, emb[::4], TAX, leafs_only=False, prefix_threshold=0.99)
    assert all(p.score >= 0.99 or len(p.path) == 1 for p in nodes)
    assert result.seconds > 0


def test_a_reused_temperature_skips_cross_validation_and_gives_the_same_heads() -> None:
    emb, paths = clustered(120)
    full = fit(emb, paths, TAX, FAST, folds=3)
    quick = fit(emb, paths, TAX, FAST, folds=3, temperature=full.temperature)
    assert quick.temperature == full.temperature and quick.oof_level_probs == [] and quick.fold_of.size == 0
    assert quick.metrics == {"n_labelled": 120}
    for name, tensor in full.heads.state_dict().items():  # the final heads do not depend on the folds
        assert torch.equal(tensor, quick.heads.state_dict()[name]), name
    later = cross_validate(emb, paths, TAX, FAST, folds=3)  # what the quick fit left out, run afterwards
    assert later.temperature == full.temperature and later.metrics == full.metrics
    assert all(np.array_equal(a, b) for a, b in zip(later.oof_level_probs, full.oof_level_probs))


def test_out_of_fold_accuracy_is_honest_on_random_labels() -> None:
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(150, 32)).astype(np.float32)
    paths = [LEAVES[i] for i in rng.integers(0, len(LEAVES), 150)]
    result = fit(emb, paths, TAX, HeadsConfig(hidden=64, epochs=1, min_steps=200, dropout=0.0), folds=5)
    train_acc = np.mean([p.path == t for p, t in zip(predict(result.heads, 1.0, emb, TAX), paths)])
    assert train_acc > 0.8  # the final heads memorise the training set ...
    assert result.metrics["path_accuracy"] < 0.4  # ... but out-of-fold predictions are near chance (0.2)
    # Calibration pulls the overconfident out-of-fold scores towards the chance level.
    assert result.temperature > 1.0 and result.metrics["calibration"]["ece"] < result.metrics["ece_uncalibrated"]


def test_two_labels_per_class_fall_back_gracefully() -> None:
    emb, paths = clustered(10)  # 5 leaves x 2 labels
    result = fit(emb, paths, TAX, FAST, folds=5)
    assert result.metrics["folds"] == 5 and len(result.oof_predictions) == 10
    two = fit(emb[:2], paths[:2], TAX, FAST, folds=5)  # two images of two classes: 2 folds
    assert two.metrics["folds"] == 2
    assert len(predict(two.heads, two.temperature, emb, TAX)) == 10


def test_one_class_only_is_refused_with_advice() -> None:
    emb, _ = clustered(6)
    with pytest.raises(DataError, match=r"same class \(wild/bear\).*another class.*pet"):
        fit(emb, [("wild", "bear")] * 3 + [None] * 3, TAX, FAST)
    with pytest.raises(DataError, match="No image is labelled"):
        fit(emb, [None] * 6, TAX, FAST)
    deep = Taxonomy.from_nested({"all": ["x", "y"]})
    with pytest.raises(DataError, match=r"all/x.*'all/y'"):
        fit(emb, [("all", "x")] * 6, deep, FAST)


def test_input_validation() -> None:
    emb, paths = clustered(10)
    with pytest.raises(DataError, match="one path"):
        fit(emb[:5], paths, TAX, FAST)
    with pytest.raises(TaxonomyError, match="Unknown taxonomy path"):
        fit(emb, [("pet", "hamster")] + paths[1:], TAX, FAST)
    result = fit(emb, paths, TAX, FAST, folds=1)  # folds=1: no calibration, still trained
    assert result.temperature == 1.0 and result.oof_level_probs == [] and result.metrics == {"n_labelled": 10}
    with pytest.raises(DataError, match="dimension 12"):
        predict(result.heads, 1.0, np.zeros((2, 7), np.float32), TAX)


def test_stratified_folds_spread_every_class() -> None:
    strata = np.array([0] * 7 + [1] * 2 + [2] * 11)
    fold_of = stratified_folds(strata, 3, seed=0)
    counts = np.bincount(fold_of)
    assert counts.max() - counts.min() <= 1
    for s in (0, 1, 2):
        per_fold = np.bincount(fold_of[strata == s], minlength=3)
        assert per_fold.max() - per_fold.min() <= 1
    assert not np.array_equal(fold_of, stratified_folds(strata, 3, seed=1))


def test_predict_on_no_embeddings_is_empty() -> None:
    emb, paths = clustered(10)
    result = fit(emb, paths, TAX, FAST, folds=1)
    assert predict(result.heads, 1.0, emb[:0], TAX) == []
