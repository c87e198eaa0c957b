"""Consensus of several annotators: known answers on seeded synthetic annotators, and the edge cases."""

from __future__ import annotations

import numpy as np
import pytest

from model.crowd.consensus import consensus
from model.crowd.dawid_skene import CrowdConfig, Observations, fit_crowd
from model.crowd.report import result_to_json
from model.crowd.types import Annotation, ConsensusPolicy, Source
from model.errors import ConfigError, DataError, TaxonomyError
from model.taxonomy import Taxonomy

TREE = Taxonomy.from_nested({"A": ["a1", "a2"], "B": ["b1", "b2"], "C": None})  # ragged: C is a leaf at level 0
LEAVES = [("A", "a1"), ("A", "a2"), ("B", "b1"), ("B", "b2"), ("C",)]


def _majority(anns: list[Annotation], items: list[int]) -> dict[int, tuple[str, ...]]:
    out = {}
    for item in items:
        votes: dict[tuple[str, ...], int] = {}
        for a in anns:
            if a.item == item:
                votes[a.paths[0]] = votes.get(a.paths[0], 0) + 1
        out[item] = max(votes, key=lambda p: (votes[p], -LEAVES.index(p)))
    return out


def _simulate(seed: int, n_items: int = 150) -> tuple[list[Annotation], dict[int, tuple[str, ...]]]:
    """Three annotators per item from a pool: one expert, three careless ones with a favourite mistake per
    class (mostly under the same parent), two spammers."""
    rng = np.random.default_rng(seed)
    truth = {i: LEAVES[int(rng.integers(len(LEAVES)))] for i in range(n_items)}
    pool = {"expert": 0.95, "careless-1": 0.7, "careless-2": 0.7, "careless-3": 0.7, "spammer-1": 0.0, "spammer-2": 0.0}
    favourite = {
        who: {t: LEAVES[int(rng.integers(len(LEAVES)))] if t == ("C",) else (t[0], t[1][0] + ("2" if t[1][1] == "1" else "1"))
              for t in LEAVES}
        for who in pool
    }
    anns = []
    for i, t in truth.items():
        for who in rng.choice(list(pool), size=3, replace=False, p=[0.3, 0.15, 0.15, 0.15, 0.125, 0.125]):
            if pool[who] == 0.0:
                label = LEAVES[int(rng.integers(len(LEAVES)))]
            elif rng.random() < pool[who]:
                label = t
            else:
                label = favourite[who][t] if rng.random() < 0.5 else LEAVES[int(rng.integers(len(LEAVES)))]
            anns.append(Annotation(i, str(who), (label,)))
    return anns, truth


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_consensus_beats_majority_vote_on_seeded_annotators(seed: int) -> None:
    anns, truth = _simulate(seed)
    res = consensus(anns, TREE, ConsensusPolicy(exclude_flagged=False))
    ours = np.mean([res.items[i].path == truth[i] for i in truth])
    mv = _majority(anns, list(truth))
    majority = np.mean([mv[i] == truth[i] for i in truth])
    assert ours >= 0.84, ours
    assert ours > majority + 0.04, (ours, majority)
    q = {a: s.quality for a, s in res.annotators.items()}
    assert q["expert"] == max(q.values())
    assert max(q["spammer-1"], q["spammer-2"]) < min(q["careless-1"], q["careless-2"], q["careless-3"])
    assert sum(s.n_labeled for s in res.annotators.values()) == 3 * len(truth)
    careless = res.annotators["careless-1"]
    assert careless.worst_level in (0, 1) and careless.confusions and careless.confusions[0][2] >= 2
    assert res.annotators["expert"].agreement_with_consensus > careless.agreement_with_consensus


def test_every_consensus_path_is_valid_and_level_quality_decreases() -> None:
    rng = np.random.default_rng(7)
    nodes = [n.path for n in TREE.nodes()]  # prefixes and leaves
    anns = []
    for i in range(60):
        for who in ("u1", "u2", "u3"):
            if rng.random() < 0.8:
                k = int(rng.integers(1, 3))
                paths = tuple(nodes[int(j)] for j in rng.choice(len(nodes), size=k, replace=False))
                anns.append(Annotation(i, who, paths))
    res = consensus(anns, TREE, ConsensusPolicy())
    assert res.items
    for ic in res.items.values():
        assert ic.path is not None
        assert TREE.resolve(ic.path) == ic.path  # a child always under its parent
        assert len(ic.level_quality) == len(ic.path)
        assert all(x >= y - 1e-9 for x, y in zip(ic.level_quality, ic.level_quality[1:]))
        assert abs(ic.level_quality[-1] - ic.quality) < 1e-9
        assert 0.0 <= ic.quality <= 1.0


def test_one_annotator_only() -> None:
    anns = [Annotation(i, "solo", (LEAVES[i % 5],)) for i in range(10)]
    res = consensus(anns, TREE, ConsensusPolicy())
    assert res.labels == {i: LEAVES[i % 5] for i in range(10)}
    assert not res.flags
    assert all(ic.first_divergence is None and ic.n_annotators == 1 for ic in res.items.values())
    assert res.annotators["solo"].agreement_with_consensus == 1.0
    strict = consensus(anns, TREE, ConsensusPolicy(min_annotators=2))
    assert not strict.labels and "policy needs 2" in strict.excluded[0]


def test_annotators_who_never_overlap() -> None:
    anns = [Annotation(i, f"user-{i % 3}", (LEAVES[(i * 7) % 5],)) for i in range(30)]
    res = consensus(anns, TREE, ConsensusPolicy())
    assert res.labels == {i: LEAVES[(i * 7) % 5] for i in range(30)}
    assert all(s.n_labeled == 10 for s in res.annotators.values())
    assert all(ic.pairwise_agreement == (None, None) for ic in res.items.values())


def test_all_annotators_disagree() -> None:
    anns = [Annotation(1, "u1", (("A", "a1"),)), Annotation(1, "u2", (("B", "b1"),)), Annotation(1, "u3", (("C",),))]
    anns += [Annotation(i, u, (("A", "a2"),)) for i in range(2, 8) for u in ("u1", "u2", "u3")]  # calibrates
    res = consensus(anns, TREE, ConsensusPolicy())
    ic = res.items[1]
    assert ic.first_divergence == 0
    assert ic.pairwise_agreement[0] == 0.0
    assert ic.agreement_overall == pytest.approx(1 / 3)
    assert ic.quality < 0.6
    kinds = {f.kind.value for f in res.flags if f.item == 1}
    assert kinds == {"annotators_disagree", "low_quality_consensus"}
    assert 1 in res.excluded and "low_quality_consensus" in res.excluded[1]
    assert 1 in consensus(anns, TREE, ConsensusPolicy(exclude_flagged=False)).labels


def test_item_with_only_cancelled_or_empty_annotations_is_excluded_with_reason() -> None:
    anns = [Annotation(1, "u1", ()), Annotation(1, "u2", ()), Annotation(2, "u1", (("C",),))]
    res = consensus(anns, TREE, ConsensusPolicy())
    assert res.labels == {2: ("C",)}
    assert "cancelled" in res.excluded[1]
    assert res.items[1].path is None and res.items[1].n_annotators == 0
    assert res.annotators["u1"].n_labeled == 1 and "u2" not in res.annotators


def test_label_no_longer_in_config_is_reported_and_skipped() -> None:
    anns = [Annotation(1, "u1", (("A", "gone"),)), Annotation(1, "u2", (("A", "a1"),)), Annotation(2, "u1", (("Z",),))]
    res = consensus(anns, TREE, ConsensusPolicy())
    assert res.labels == {1: ("A", "a1")}
    assert len(res.problems) == 2 and "'gone' is not a label under A" in res.problems[0]
    assert "no label" in res.excluded[2]


def test_prefix_and_multi_path_annotations() -> None:
    anns = [
        # [["A"], ["A", "a1"]] is read as A/a1
        Annotation(1, "u1", (("A",), ("A", "a1"))), Annotation(1, "u2", (("A", "a1"),)),
        # everyone stops at A: the consensus is the prefix A
        Annotation(2, "u1", (("A",),)), Annotation(2, "u2", (("A",),)),
        # a prefix vote agrees with a deeper one: consensus goes as deep as anyone labelled
        Annotation(3, "u1", (("B",),)), Annotation(3, "u2", (("B", "b2"),)),
        # a two-path annotation splits its vote
        Annotation(4, "u1", (("A", "a1"), ("B", "b1"))), Annotation(4, "u2", (("A", "a1"),)),
        # aliases / values resolve to canonical paths
        Annotation(5, "u1", (("C",),)), Annotation(5, "u2", (("C",),)),
    ]
    res = consensus(anns, TREE, ConsensusPolicy())
    assert res.items[1].given[0].paths == (("A", "a1"),)
    assert res.items[1].first_divergence is None
    assert res.labels[1] == ("A", "a1")
    assert res.labels[2] == ("A",)
    assert res.labels[3] == ("B", "b2")
    assert res.items[3].first_divergence is None  # the prefix vote says nothing at level 1
    assert res.items[3].agreement_overall == 1.0
    assert res.items[4].path == ("A", "a1")
    assert res.items[4].level_votes[0] == {"A": 1.5, "B": 0.5}
    assert res.items[4].first_divergence == 0
    assert res.labels[5] == ("C",)
    assert res.items[5].level_votes[1] == {"<end>": 2.0}


def test_ground_truth_and_review_take_precedence() -> None:
    anns = [Annotation(1, u, (("A", "a1"),)) for u in ("u1", "u2", "u3")]
    anns.append(Annotation(1, "lead", (("B", "b1"),), ground_truth=True))
    anns += [Annotation(2, u, (("A", "a1"),)) for u in ("u1", "u2")]
    anns += [Annotation(2, "u3", (("A", "a2"),), reviewed=True)]
    anns += [Annotation(3, "u1", (("C",),), reviewed=True), Annotation(3, "u2", (("A", "a1"),), ground_truth=True)]
    res = consensus(anns, TREE, ConsensusPolicy(min_annotators=5, min_agreement=0.9))
    assert res.labels == {1: ("B", "b1"), 2: ("A", "a2"), 3: ("A", "a1")}
    assert res.items[1].source is Source.GROUND_TRUTH
    assert res.items[2].source is Source.REVIEWED
    assert not [f for f in res.flags if f.kind.value != "label_error_candidate"]  # resolved items are not re-flagged
    crowd = consensus(anns, TREE, ConsensusPolicy(prefer_ground_truth=False))
    assert crowd.labels[1] == ("A", "a1") and crowd.items[1].source is Source.CROWD


def test_model_probabilities_help_and_flag_a_contradicted_single_label() -> None:
    rng = np.random.default_rng(3)
    anns, probs, truth = [], {}, {}
    for i in range(60):
        t = LEAVES[i % 4]
        truth[i] = t
        code = TREE.encode(t)
        probs[i] = []
        for k in range(TREE.depth):
            p = np.full(TREE.num_classes(k), 0.02)
            p[code[k]] = 1.0
            probs[i].append(p / p.sum())
        anns.append(Annotation(i, "u1", (t,)))
        if i >= 10:
            anns.append(Annotation(i, "u2", (t,)))
    anns[0] = Annotation(0, "u1", (("B", "b2"),))  # a single, wrong label the model contradicts
    res = consensus(anns, TREE, ConsensusPolicy(), level_probs=probs)
    assert res.used_model
    assert res.items[0].path == truth[0]
    flags = [f for f in res.flags if f.kind.value == "label_error_candidate"]
    assert [(f.item, f.annotator, f.level) for f in flags] == [(0, "u1", 0)]
    assert flags[0].given == (("B", "b2"),) and flags[0].suggested == truth[0]
    # the consensus no annotator gave stays out of training: one annotator against the model is no certainty
    assert 0 in res.excluded and res.items[0].quality < ConsensusPolicy().min_quality
    without = consensus(anns, TREE, ConsensusPolicy())
    assert without.labels[0] == ("B", "b2")  # without the model nothing contradicts it
    assert res.level_fits[0].model_temperature is not None and res.level_fits[0].model_temperature > 0.5
    assert "model" in res.policy_record()["consensus_method"]
    del rng


def test_level_probs_must_match_the_taxonomy() -> None:
    anns = [Annotation(1, "u1", (("C",),))]
    with pytest.raises(TaxonomyError, match="classes"):
        consensus(anns, TREE, ConsensusPolicy(), level_probs={1: [np.ones(3), np.ones(4)]})
    with pytest.raises(TaxonomyError, match="levels"):
        consensus(anns, TREE, ConsensusPolicy(), level_probs={1: [np.ones(3)]})


def test_invalid_policy_names_the_field() -> None:
    with pytest.raises(ConfigError, match="min_annotators"):
        consensus([], TREE, ConsensusPolicy(min_annotators=0))
    with pytest.raises(ConfigError, match="min_agreement"):
        consensus([], TREE, ConsensusPolicy(min_agreement=1.5))


def test_policy_record_and_agreement_threshold() -> None:
    anns = [Annotation(1, "u1", (("A", "a1"),)), Annotation(1, "u2", (("A", "a1"),)), Annotation(1, "u3", (("A", "a2"),))]
    anns += [Annotation(2, u, (("C",),)) for u in ("u1", "u2", "u3")]
    res = consensus(anns, TREE, ConsensusPolicy(min_agreement=0.8, exclude_flagged=False))
    assert res.labels == {2: ("C",)}
    assert "67% of annotators agree" in res.excluded[1]
    rec = res.policy_record()
    assert rec["items_trained"] == 1 and rec["items_excluded"] == 1 and rec["policy"]["min_agreement"] == 0.8


def test_crowd_recovers_confusions_and_ignores_a_useless_model() -> None:
    rng = np.random.default_rng(0)
    n, k = 400, 3
    truth = rng.integers(k, size=n)
    acc = np.array([0.9, 0.75, 1 / 3])
    item, who, lab = [], [], []
    for i in range(n):
        for a in range(3):
            item.append(i), who.append(a)
            lab.append(truth[i] if rng.random() < acc[a] else int(rng.integers(k)))
    obs = Observations(np.array(item), np.array(who), np.array(lab), np.ones(len(item)))
    noise = rng.dirichlet(np.ones(k), size=n)  # a model that knows nothing
    fit = fit_crowd(obs, n, 3, k, noise, CrowdConfig())
    assert fit.posterior.shape == (n, k) and fit.confusion.shape == (3, k, k)
    np.testing.assert_allclose(fit.confusion.sum(axis=2), 1.0)
    true_acc = [np.mean(np.array(lab)[np.array(who) == a] == truth) for a in range(3)]
    np.testing.assert_allclose(fit.accuracy, true_acc, atol=0.06)
    assert fit.model_temperature is not None and fit.model_temperature < 0.3
    assert (fit.posterior.argmax(1) == truth).mean() > 0.9


def test_many_classes_use_the_one_coin_model_without_dense_confusions() -> None:
    classes = [f"c{i}" for i in range(3000)]
    flat = Taxonomy.from_nested(classes)
    rng = np.random.default_rng(5)
    anns = []
    for i in range(200):
        t = classes[int(rng.integers(3000))]
        anns += [Annotation(i, "u1", ((t,),)), Annotation(i, "u2", ((t,),))]
        anns.append(Annotation(i, "u3", ((classes[int(rng.integers(3000))],),)))
    res = consensus(anns, flat, ConsensusPolicy(exclude_flagged=False))
    fit = res.level_fits[0]
    assert fit.confusion is None and not fit.full_confusion and fit.posterior.shape == (200, 3000)
    assert all(res.labels[i] == anns[3 * i].paths[0] for i in range(200))
    assert res.annotators["u3"].quality < 0.1 < 0.9 < res.annotators["u1"].quality


def _contradicted_single_label() -> tuple[list[Annotation], dict[int, list[np.ndarray]], dict[int, tuple[str, ...]]]:
    """The set-up above: item 0's only label (B/b2) is wrong and the model gives its true path A/a1."""
    anns, probs, truth = [], {}, {}
    for i in range(60):
        t = LEAVES[i % 4]
        truth[i] = t
        code = TREE.encode(t)
        probs[i] = []
        for k in range(TREE.depth):
            p = np.full(TREE.num_classes(k), 0.02)
            p[code[k]] = 1.0
            probs[i].append(p / p.sum())
        anns.append(Annotation(i, "u1", (t,)))
        if i >= 10:
            anns.append(Annotation(i, "u2", (t,)))
    anns[0] = Annotation(0, "u1", (("B", "b2"),))
    return anns, probs, truth


def test_the_neighbours_verdict_scores_label_errors_without_changing_the_consensus() -> None:
    anns, probs, truth = _contradicted_single_label()
    leaf_paths = TREE.candidate_paths(leafs_only=True)[0]
    b2 = leaf_paths.index(("B", "b2"))

    def neighbours(p_given: float) -> dict[int, np.ndarray]:
        out = {}
        for i, t in truth.items():
            v = np.zeros(len(leaf_paths))
            v[leaf_paths.index(t)] = 1.0
            out[i] = v
        out[0] = np.full(len(leaf_paths), (1 - p_given) / (len(leaf_paths) - 1))
        out[0][b2] = p_given
        return out

    alone = consensus(anns, TREE, ConsensusPolicy(), level_probs=probs)
    contradicted = consensus(anns, TREE, ConsensusPolicy(), level_probs=probs, neighbour_probs=neighbours(0.0))
    confirmed = consensus(anns, TREE, ConsensusPolicy(), level_probs=probs, neighbour_probs=neighbours(1.0))
    assert contradicted.labels == alone.labels == confirmed.labels and contradicted.excluded == alone.excluded
    given = {r: next(g for g in res.items[0].given) for r, res in
             (("alone", alone), ("contradicted", contradicted), ("confirmed", confirmed))}
    assert given["alone"].neighbour_prob is None and given["alone"].error_score == pytest.approx(1 - given["alone"].quality)
    assert given["contradicted"].neighbour_prob == pytest.approx(0.0)
    assert given["contradicted"].error_score == pytest.approx(1 - given["alone"].quality / 2)

    def error_flags(res):
        return [f for f in res.flags if f.kind.value == "label_error_candidate"]

    assert [f.item for f in error_flags(contradicted)] == [0] and "its neighbours 0.00" in error_flags(contradicted)[0].message
    assert error_flags(contradicted)[0].score > error_flags(alone)[0].score
    assert error_flags(confirmed) == []  # neighbours that agree with the label outweigh the doubt of the crowd
    report = result_to_json(contradicted)
    assert next(i for i in report["items"] if i["item"] == 0)["given"][0]["neighbour_prob"] == 0.0


def test_neighbour_probs_count_a_prefix_label_s_leaves_and_must_match_the_leaves() -> None:
    from model.crowd.neighbours import path_mass

    leaf_paths = TREE.candidate_paths(leafs_only=True)[0]
    p = np.array([0.1, 0.2, 0.3, 0.15, 0.25])
    assert path_mass(p, leaf_paths, ("A",)) == pytest.approx(sum(p[j] for j, leaf in enumerate(leaf_paths) if leaf[0] == "A"))
    anns = [Annotation(1, "u1", (("C",),))]
    with pytest.raises(DataError, match="leaves"):
        consensus(anns, TREE, ConsensusPolicy(), neighbour_probs={1: np.ones(3)})
