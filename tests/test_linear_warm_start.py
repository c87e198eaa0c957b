"""The logistic-regression heads started from earlier heads: the start gives the same logits, the solver reaches the
heads of a cold start in fewer iterations, an unseen class starts cold, and a retraining finds the live heads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from ml_backend.paths import ProjectPaths
from ml_backend.settings import Settings
from ml_backend.training.encoder import Encoder
from ml_backend.training.fit import live_start
from model.bundle import publish
from model.encoder.backbone import build_backbone
from model.encoder.config import EncoderConfig
from model.features.extractor import pixel_features_spec
from model.features.pixels import PixelConfig
from model.heads.candidates import CANDIDATES
from model.heads.heads import TaxonomyHeads
from model.heads.linear import logistic_heads, prototype_heads, warm_coefficients
from model.taxonomy import IGNORE, Taxonomy

TAX = Taxonomy.from_nested({"A": ["a1", "a2", "a3"], "B": ["b1", "b2"]})  # level 0 binary, level 1 five leaves
LEAVES = [leaf.path for leaf in TAX.leaves()]
NUM_CLASSES = [TAX.num_classes(k) for k in range(TAX.depth)]


def blobs(n: int, seed: int = 0, dim: int = 40, leaves: list[tuple[str, ...]] | None = None
          ) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping leaf clusters on correlated, differently scaled dimensions (what pixel features look like):
    features ``(n, dim)`` and targets ``(n, 2)``."""
    rng = np.random.default_rng(seed)
    leaves = leaves or LEAVES
    centres = np.random.default_rng(99).normal(0, 1.0, (len(LEAVES), dim))
    mix = np.random.default_rng(98).normal(0, 1, (dim, dim)) * np.linspace(0.2, 3, dim)
    which = rng.integers(0, len(leaves), n)
    x = centres[[LEAVES.index(leaves[i]) for i in which]] + rng.normal(0, 1.6, (n, dim))
    return (x @ mix).astype(np.float32), TAX.encode_many([leaves[i] for i in which])


def probs(heads: TaxonomyHeads, x: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        return [torch.softmax(out, 1).numpy() for out in heads(torch.from_numpy(x))]


@pytest.fixture
def iterations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Solver iterations of every LogisticRegression fit, in order."""
    seen: list[int] = []
    fit = LogisticRegression.fit

    def counted(self: LogisticRegression, *args: object, **kwargs: object) -> LogisticRegression:
        out = fit(self, *args, **kwargs)
        seen.append(int(np.max(self.n_iter_)))
        return out

    monkeypatch.setattr(LogisticRegression, "fit", counted)
    return seen


def test_the_start_gives_the_earlier_heads_logits_on_the_new_normalisation() -> None:
    x, y = blobs(300)
    old = logistic_heads(x[:200], y[:200], NUM_CLASSES)
    new = logistic_heads(x[100:], y[100:], NUM_CLASSES)  # other labelled rows: other standardisation statistics
    assert not torch.allclose(old.mean, new.mean)
    z = new.normalize(torch.from_numpy(x)).double().numpy()  # (N, D) on the new statistics
    with torch.no_grad():
        logits = [out.double().numpy() for out in old(torch.from_numpy(x))]
    for level, kk in enumerate(NUM_CLASSES):
        classes = np.arange(kk)
        start = warm_coefficients(old, new, level, classes)
        assert start is not None
        coef, intercept = start
        if kk == 2:  # scikit-learn's binary form: the logit of class 1 over class 0
            assert coef.shape == (1, x.shape[1]) and intercept.shape == (1,)
            expected = logits[level][:, 1] - logits[level][:, 0]
            np.testing.assert_allclose(z @ coef[0] + intercept[0], expected, atol=1e-3)
        else:
            assert coef.shape == (kk, x.shape[1]) and intercept.shape == (kk,)
            np.testing.assert_allclose(z @ coef.T + intercept, logits[level], atol=1e-3)


def test_a_started_solver_reaches_the_heads_of_a_cold_start_in_fewer_iterations(iterations: list[int]) -> None:
    x, y = blobs(900, seed=1)
    live = logistic_heads(x[:800], y[:800], NUM_CLASSES)  # the live version's heads
    grown = slice(0, 830)  # 30 new labels since
    iterations.clear()
    cold = logistic_heads(x[grown], y[grown], NUM_CLASSES)
    cold_iterations = sum(iterations)
    iterations.clear()
    warm = logistic_heads(x[grown], y[grown], NUM_CLASSES, init=live)
    warm_iterations = sum(iterations)
    assert warm_iterations < 0.6 * cold_iterations, (warm_iterations, cold_iterations)
    for p_cold, p_warm in zip(probs(cold, x), probs(warm, x)):  # one optimum: the same heads to the solver's tolerance
        assert np.abs(p_cold - p_warm).mean() < 2e-3
        assert (p_cold.argmax(1) == p_warm.argmax(1)).mean() > 0.99


def test_a_class_the_start_never_saw_starts_cold_at_its_level() -> None:
    x, y = blobs(400, seed=3, leaves=LEAVES[:4])  # no image of the last leaf yet
    live = logistic_heads(x, y, NUM_CLASSES)
    x2, y2 = blobs(60, seed=4)
    x2, y2 = np.concatenate([x, x2]), np.concatenate([y, y2])
    new = logistic_heads(x2, y2, NUM_CLASSES, init=live)
    classes = np.unique(y2[:, 1][y2[:, 1] != IGNORE])
    assert warm_coefficients(live, new, 0, np.arange(2)) is not None
    assert warm_coefficients(live, new, 1, classes) is None  # the new leaf: no start at that level
    last = TAX.encode_many([LEAVES[4]])[0, 1]
    assert (probs(new, x2)[1].argmax(1) == last).any()  # and it is learnt
    other = prototype_heads(x, y, NUM_CLASSES)  # heads on another normalisation are no start
    assert warm_coefficients(other, new, 0, np.arange(2)) is None


def test_a_retraining_starts_from_the_live_heads_only_when_they_read_the_same_features(tmp_path: Path) -> None:
    settings = Settings.from_env(env={}, model_dir=tmp_path)
    paths = ProjectPaths(tmp_path, 3)
    cfg = EncoderConfig(input_size=32)
    encoder = Encoder(cfg, build_backbone(cfg).state_dict(), "enc-1")
    linear = CANDIDATES["pixels+linear"]
    assert live_start(settings, paths, linear, encoder, TAX) is None  # no version yet
    x, y = blobs(120, dim=PixelConfig().out_dim)
    heads = logistic_heads(x, y, NUM_CLASSES)
    publish(paths.models, TAX, cfg, encoder.state, heads, 1.0, {}, "fp", features=pixel_features_spec())
    start = live_start(settings, paths, linear, encoder, TAX)
    assert start is not None and torch.equal(start.heads[0][0].weight, heads.heads[0][0].weight)
    assert live_start(settings, paths, CANDIDATES["encoder+mlp"], encoder, TAX) is None  # not a linear solver
    other = Taxonomy.from_nested({"A": ["a1", "a2", "a3"], "B": ["b1", "b2", "b3"]})
    assert live_start(settings, paths, linear, encoder, other) is None  # another taxonomy
