"""Review probabilities (model.crowd.pool): Dawid-Skene blended with a linear pool, blend chosen on held-out labels."""

from __future__ import annotations

import numpy as np
import pytest

from model.crowd.consensus import consensus
from model.crowd.dawid_skene import CrowdConfig, Observations, fit_crowd
from model.crowd.pool import review_posterior
from model.crowd.report import review_list
from model.crowd.types import Annotation, ConsensusPolicy
from model.taxonomy import Taxonomy

FLAT = Taxonomy.from_nested(["c0", "c1", "c2", "c3"])
K = 4


def _crowd(seed: int, n: int, shared_mistakes: bool) -> tuple[Observations, np.ndarray, np.ndarray]:
    """Three annotators on every item, and model probabilities ``(n, K)``; returns obs, model, truth.

    Independent: each annotator is right with its own accuracy, else uniform (Dawid-Skene's assumption).
    Shared: a third of the items are hard; on them the model prefers a look-alike class and every annotator picks
    it with probability 0.6 (mistakes shared with each other and with the model).
    """
    rng = np.random.default_rng(seed)
    truth = rng.integers(K, size=n)
    lookalike = (truth + 1 + rng.integers(K - 1, size=n)) % K
    hard = rng.random(n) < (1 / 3 if shared_mistakes else 0.0)
    model = np.full((n, K), 0.05)
    model[np.arange(n), truth] = 0.85
    model[hard, truth[hard]] = 0.3
    model[hard, lookalike[hard]] = 0.6
    model /= model.sum(axis=1, keepdims=True)
    item, who, label = [], [], []
    for i in range(n):
        for a, acc in enumerate((0.9, 0.8, 0.7)):
            if hard[i]:
                given = lookalike[i] if rng.random() < 0.6 else truth[i]
            else:
                given = truth[i] if rng.random() < acc else int(rng.integers(K))
            item.append(i), who.append(a), label.append(given)
    obs = Observations(np.array(item), np.array(who), np.array(label), np.ones(len(item)))
    return obs, model, truth


def test_independent_annotators_keep_plain_dawid_skene() -> None:
    obs, model, _ = _crowd(0, 600, shared_mistakes=False)
    fit = fit_crowd(obs, 600, 3, K, model, CrowdConfig())
    review = review_posterior(obs, fit, 600, 3, K, model)
    assert review.blend >= 0.9
    assert review.held_out == len(obs.item)
    np.testing.assert_allclose(review.posterior.sum(axis=1), 1.0)
    assert review.model_weight is not None and review.model_weight > 0
    assert review.annotator_weight[0] > review.annotator_weight[2]  # the more accurate annotator weighs more


def test_shared_mistakes_pull_the_blend_towards_the_pool_and_calibrate_the_quality() -> None:
    obs, model, truth = _crowd(1, 900, shared_mistakes=True)
    fit = fit_crowd(obs, 900, 3, K, model, CrowdConfig())
    review = review_posterior(obs, fit, 900, 3, K, model)
    assert review.blend < 0.9
    cons = fit.posterior.argmax(axis=1)
    wrong = cons != truth
    assert wrong.sum() > 20
    rows = np.arange(900)
    # the blended probabilities are better calibrated: the mean probability of the consensus is nearer its accuracy
    gap_ds = abs(fit.posterior[rows, cons].mean() - (~wrong).mean())
    gap_review = abs(review.posterior[rows, cons].mean() - (~wrong).mean())
    assert gap_review < gap_ds


def test_no_item_with_two_annotators_keeps_the_posterior_blend() -> None:
    obs = Observations(np.arange(6), np.arange(6) % 2, np.arange(6) % K, np.ones(6))
    fit = fit_crowd(obs, 6, 2, K, None, CrowdConfig())
    review = review_posterior(obs, fit, 6, 2, K, None)
    assert review.blend == 1.0 and review.held_out == 0 and review.model_weight is None
    np.testing.assert_allclose(review.posterior, fit.posterior)


def test_a_lone_label_against_a_confident_model_ranks_above_five_agreeing_annotators() -> None:
    """The review list puts "one annotator, contradicted by a confident model" before "five agree with the model"."""
    rng = np.random.default_rng(4)
    anns: list[Annotation] = []
    probs: dict[int, list[np.ndarray]] = {}
    for i in range(300):
        t = int(rng.integers(K))
        p = np.full(K, 0.04)
        p[t] = 0.88
        probs[i] = [p / p.sum()]
        for a in range(1 + i % 5):  # 1-5 annotators, each right 85 % of the time
            given = t if rng.random() < 0.85 else int(rng.integers(K))
            anns.append(Annotation(i, f"u{a}", ((f"c{given}",),)))
    lone, agreed = 1000, 1001
    p = np.full(K, 0.02)
    p[0] = 0.94
    probs[lone] = [p]
    probs[agreed] = [p.copy()]
    anns.append(Annotation(lone, "u0", (("c2",),)))  # the only label, the model says c0
    anns += [Annotation(agreed, f"u{a}", (("c0",),)) for a in range(5)]
    res = consensus(anns, FLAT, ConsensusPolicy(), level_probs=probs)
    assert res.items[agreed].quality > 0.95
    assert res.items[lone].quality < res.items[agreed].quality - 0.15
    review_items = [e["item"] for e in review_list(res)]
    assert lone in review_items and agreed not in review_items
    lone_label = res.items[lone].given[0]
    agreed_label = res.items[agreed].given[0]
    assert lone_label.quality < 0.5 < agreed_label.quality
    assert res.policy_record()["quality_blend"] == [pytest.approx(res.level_reviews[0].blend)]


def test_level_quality_never_exceeds_the_parent_level() -> None:
    tree = Taxonomy.from_nested({"A": ["a1", "a2"], "B": ["b1", "b2"]})
    rng = np.random.default_rng(9)
    leaves = [("A", "a1"), ("A", "a2"), ("B", "b1"), ("B", "b2")]
    anns = [Annotation(i, f"u{a}", (leaves[int(rng.integers(4))],)) for i in range(80) for a in range(3)]
    res = consensus(anns, tree, ConsensusPolicy(exclude_flagged=False))
    for ic in res.items.values():
        assert ic.level_quality[1] <= ic.level_quality[0] + 1e-12 and ic.quality == ic.level_quality[-1]
        for g in ic.given:
            assert 0.0 <= g.quality <= 1.0


def test_many_labels_choose_the_blend_on_a_sample_of_whole_items(monkeypatch: pytest.MonkeyPatch) -> None:
    import model.crowd.pool as pool

    obs, model, _ = _crowd(1, 900, shared_mistakes=True)
    fit = fit_crowd(obs, 900, 3, K, model, CrowdConfig())
    monkeypatch.setattr(pool, "MAX_HELD_OUT_CELLS", K * 600)
    review = pool.review_posterior(obs, fit, 900, 3, K, model)
    assert review.held_out == 600  # 200 whole items of 3 labels
    assert review.blend < 0.9


@pytest.mark.parametrize("depth", [2, 3])
def test_a_lone_annotator_keeps_its_labels_in_training(depth: int) -> None:
    """One person labelling a project alone: nothing to compare with, so nothing is flagged or left out."""
    tree = Taxonomy.from_nested({"Warm": ["Red", "Orange"], "Cold": ["Blue"]} if depth == 2 else
                                {"Warm": {"Red": ["r1", "r2"], "Orange": ["o1"]}, "Cold": {"Blue": ["b1", "b2"]}})
    leaves = [n.path for n in tree.leaves()]
    for n_items in (9, 300):
        anns = [Annotation(i, "admin", (leaves[i % len(leaves)],)) for i in range(n_items)]
        res = consensus(anns, tree, ConsensusPolicy())
        assert not res.excluded and not res.flags, (n_items, next(iter(res.excluded.values()), None))
