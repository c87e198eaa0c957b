"""Label propagation as a model-choice candidate: held-out propagation on the heads' folds, and the choice rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.errors import DataError
from model.heads.candidates import FeatureSource, parse_candidates
from model.heads.selection import CandidateScore, select
from model.neighbors.graph import knn_graph
from model.propagation import held_out, seed_matrix
from model.propagation_choice import (
    BLEND,
    PROPAGATION,
    ChoiceRule,
    blend_probabilities,
    choose,
    decide,
    held_out_scores,
    spread_table,
)
from model.taxonomy import Taxonomy

TAX = Taxonomy.from_nested({"A": ["left", "right"], "B": ["left", "right"]})
LEAVES = [leaf.path for leaf in TAX.leaves()]


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def chains(n_per: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Four curved 1-D manifolds (one per leaf) in 8-D: neighbours along a chain share its leaf, while its class
    mean sits far from its ends (propagation follows the chain, a linear model on the mean does not)."""
    rng = np.random.default_rng(seed)
    out, leaf = [], []
    for c in range(4):
        t = np.linspace(0, 3 * np.pi, n_per)
        base = np.zeros((n_per, 8))
        base[:, 2 * c], base[:, 2 * c + 1] = np.cos(t) * 3, np.sin(t) * 3
        base[:, (2 * c + 2) % 8] = t
        out.append(base + rng.normal(0, 0.05, base.shape))
        leaf += [c] * n_per
    return np.concatenate(out).astype(np.float32), np.array(leaf)


def test_held_out_propagation_never_sees_the_fold_s_own_labels() -> None:
    emb = np.array([[1, 0], [0.99, 0.1], [0, 1], [0.1, 0.99]], dtype=np.float32)
    graph = knn_graph(emb, k=1)  # two pairs: 0-1, 2-3
    y = seed_matrix(4, {0: [LEAVES[0]], 1: [LEAVES[3]], 2: [LEAVES[2]], 3: [LEAVES[2]]}, LEAVES)
    probs, reached = held_out(*graph, y, np.array([0, 1, 0, 1]))
    # row 0 (label A/left) sees only its neighbour's label B/right, and vice versa: each contradicts the other
    assert probs[0].argmax() == 3 and probs[1].argmax() == 0 and reached.all()
    assert probs[2].argmax() == 2 and probs[3].argmax() == 2
    # a row in no fold always seeds and gets no estimate; misaligned folds are refused
    probs, reached = held_out(*graph, y, np.array([0, -1, -1, -1]))
    assert probs[0].argmax() == 3 and reached.tolist() == [True, False, False, False]
    assert probs[1] == pytest.approx(np.full(4, 0.25))
    with pytest.raises(DataError, match="one fold"):
        held_out(*graph, y, np.zeros(3, dtype=np.int64))


def test_propagation_is_scored_on_the_heads_folds_and_wins_where_neighbours_know_best() -> None:
    emb, leaf = chains()
    labelled = np.arange(0, len(emb), 3)  # every third point of each chain is labelled
    targets = TAX.encode_many([LEAVES[leaf[i]] for i in labelled])
    selection = select({FeatureSource.ENCODER: emb[labelled]}, parse_candidates(["encoder+prototypes"]), targets, TAX,
                       folds=3, labelled_index=labelled)
    scores = held_out_scores(selection.cv, knn_graph(emb, k=4), labelled, TAX)
    heads = selection.scores["encoder+prototypes"]
    assert set(scores) == {PROPAGATION, BLEND}
    assert len(scores[PROPAGATION].fold_hf) == len(heads.fold_hf) == 3
    assert scores[PROPAGATION].hf_mean > 0.9 and scores[PROPAGATION].hf_mean > heads.hf_mean + 0.05, (scores, heads)
    for rule in (ChoiceRule.MEAN, ChoiceRule.ONE_SE):
        assert choose(heads, scores, rule).chosen in (PROPAGATION, BLEND)
    assert choose(heads, scores, ChoiceRule.HEADS).chosen == "heads"
    with pytest.raises(DataError, match="graph rows"):
        held_out_scores(selection.cv, knn_graph(emb, k=4), labelled[:-1], TAX)


def test_decide_scores_the_chosen_heads_on_their_folds_and_the_table_keys_every_row_a_label_reached() -> None:
    emb, leaf = chains()
    emb = np.concatenate([emb, np.zeros((2, emb.shape[1]), dtype=np.float32)])  # two rows without an embedding
    labelled = np.arange(0, len(leaf), 3)
    targets = TAX.encode_many([LEAVES[leaf[i]] for i in labelled])
    selection = select({FeatureSource.ENCODER: emb[labelled]}, parse_candidates(["encoder+prototypes"]), targets, TAX,
                       folds=3, labelled_index=np.arange(len(labelled)))
    graph = knn_graph(emb, k=4)
    decision = decide("encoder+prototypes", selection.cv, graph, labelled, TAX, ChoiceRule.ONE_SE)
    assert decision.chosen in (PROPAGATION, BLEND), decision.reason
    assert decision.scores["encoder+prototypes"].fold_hf == pytest.approx(selection.scores["encoder+prototypes"].fold_hf)
    assert decide("encoder+prototypes", selection.cv, graph, labelled, TAX, ChoiceRule.HEADS).chosen == "heads"
    table = spread_table(PROPAGATION, graph, {int(r): [LEAVES[leaf[r]]] for r in labelled}, lambda r: f"h{r}", TAX)
    assert table.hashes == [f"h{r}" for r in range(len(leaf))]  # the rows without an embedding are not in the table
    assert (table.probs.argmax(axis=1) == leaf).mean() > 0.9  # the labels spread along each chain


def score(name: str, folds: list[float]) -> CandidateScore:
    return CandidateScore(name, float(np.mean(folds)), float(np.std(folds)), folds, 0.0, 0.0)


def test_one_standard_error_keeps_the_heads_on_a_noisy_gain_that_the_mean_takes() -> None:
    heads = score("encoder+mlp", [0.50, 0.60, 0.40])
    noisy = {PROPAGATION: score(PROPAGATION, [0.70, 0.55, 0.40])}  # +0.05 on average, fold gains +0.2, -0.05, 0
    assert choose(heads, noisy, ChoiceRule.MEAN).chosen == PROPAGATION
    kept = choose(heads, noisy, ChoiceRule.ONE_SE)
    assert kept.chosen == "heads" and "not above" in kept.reason
    steady = {BLEND: score(BLEND, [0.56, 0.66, 0.47]), PROPAGATION: score(PROPAGATION, [0.4, 0.5, 0.3])}
    chosen = choose(heads, steady, ChoiceRule.ONE_SE)
    assert chosen.chosen == BLEND and chosen.to_dict()["rule"] == "one-se"
    tiny = {BLEND: score(BLEND, [0.503, 0.603, 0.403])}  # a steady gain within the tie margin is a tie
    assert choose(heads, tiny, ChoiceRule.ONE_SE).chosen == "heads"


def test_the_blend_is_the_mean_where_a_label_reached_and_the_heads_elsewhere() -> None:
    heads = np.array([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
    prop = np.array([[0.1, 0.7, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
    mixed = blend_probabilities(heads, prop, np.array([True, False]))
    assert mixed[0] == pytest.approx([0.4, 0.4, 0.1, 0.1]) and mixed[1] == pytest.approx(heads[1])
    with pytest.raises(DataError, match="full paths"):
        blend_probabilities(heads[:, :3], prop, np.array([True, True]))


def test_a_version_chosen_as_propagation_serves_its_table_by_content_hash_and_the_heads_elsewhere(tmp_path) -> None:
    from model.bundle import PROPAGATED, load_live, publish
    from model.encoder.backbone import build_backbone
    from model.encoder.config import Arch, EncoderConfig
    from model.errors import BundleError
    from model.heads.decode import decode
    from model.heads.heads import HeadsConfig
    from model.heads.mlp_training import train_heads
    from model.predictor import Predictor
    from model.propagation_choice import PropagatedTable

    cfg = EncoderConfig(arch=Arch.RESNET18_HALF, input_size=32)
    torch.manual_seed(0)
    state = build_backbone(cfg).state_dict()
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(20, 256)).astype(np.float32)
    heads = train_heads(emb, TAX.encode_many([LEAVES[i % 4] for i in range(20)]), TAX,
                        HeadsConfig(hidden=8, epochs=1, min_steps=3))
    leaf_paths = TAX.candidate_paths(leafs_only=True)[0]
    target = leaf_paths.index(("B", "right"))
    probs = np.full((1, len(leaf_paths)), 0.02)
    probs[0, target] = 0.94
    for kind in (PROPAGATION, BLEND):
        publish(tmp_path / kind, TAX, cfg, state, heads, 1.0, {"n_labelled": 20}, "fp",
                propagated=PropagatedTable(kind, ["h1"], probs))
        bundle = load_live(tmp_path / kind)
        assert bundle.propagated is not None and bundle.propagated.kind == kind
        predictor = Predictor(bundle, cache_dir=None, device="cpu")
        logits = predictor.level_logits(emb[:3])
        preds, top = predictor.decode_rows(logits, ["h1", "h2", None])
        plain = decode(logits, TAX, temperature=1.0)
        assert preds[0].path == ("B", "right") and [p.path for p in preds[1:]] == [p.path for p in plain[1:]]
        if kind == PROPAGATION:
            assert top[0] == pytest.approx(0.94, abs=1e-3) and preds[0].score == pytest.approx(0.94, abs=1e-3)
        else:
            assert 0.47 < top[0] < 0.97 and preds[0].score == pytest.approx(top[0], abs=1e-3)
    (load_live(tmp_path / BLEND).path / PROPAGATED).write_bytes(b"not an npz")
    with pytest.raises(BundleError, match="damaged"):
        load_live(tmp_path / BLEND)
    with pytest.raises(DataError, match="serves"):
        PropagatedTable("heads", ["h1"], probs)


def test_the_training_step_publishes_a_table_when_propagation_wins_and_nothing_when_the_heads_are_kept(tmp_path) -> None:
    from ml_backend.paths import ProjectPaths
    from ml_backend.settings import Settings
    from ml_backend.training.fit import Fit
    from ml_backend.training.propagation_model import choose_propagation
    from model.heads.training import FitResult
    from model.neighbors.index import NeighborIndex

    emb, leaf = chains()
    keys = [f"h{i:03d}" for i in range(len(emb))]
    paths = ProjectPaths(tmp_path, 1)
    NeighborIndex.build(keys, emb).save(paths.neighbor_index("enc1"))
    labelled = np.arange(0, len(emb), 3)
    targets = TAX.encode_many([LEAVES[leaf[i]] for i in labelled])
    candidate = parse_candidates(["encoder+prototypes"])[0]
    selection = select({FeatureSource.ENCODER: emb[labelled]}, [candidate], targets, TAX, folds=3)
    cv = selection.cv

    def fit() -> Fit:
        choice = {**selection.to_dict(), "n_labelled": len(labelled)}
        result = FitResult(candidate.train(emb[labelled], targets, [2, 4]), cv.temperature, cv.oof_level_probs,
                           cv.oof_level_logits, cv.oof_predictions, {**cv.metrics, "model_choice": choice},
                           cv.labelled_index, cv.targets, 0.0, cv.fold_of)
        pairs = [(keys[i], LEAVES[leaf[i]]) for i in labelled]
        return Fit(result, [int(i) for i in labelled], pairs, list(range(len(labelled))), candidate, choice)

    won = fit()
    table = choose_propagation(Settings.from_env(env={}), paths, won, TAX, "enc1")
    decision = won.choice["propagation"]
    assert decision["rule"] == "one-se" and decision["chosen"] in (PROPAGATION, BLEND), decision
    assert won.result.metrics["model_choice"]["propagation"] == decision
    assert table is not None and table.kind == decision["chosen"] and len(table.hashes) == len(emb)
    on_chain = np.array([table.probs[table.hashes.index(k)].argmax() for k in keys])
    assert (on_chain == np.array([TAX.candidate_paths(True)[0].index(LEAVES[c]) for c in leaf])).mean() >= 0.85
    kept = fit()
    assert choose_propagation(Settings.from_env(env={"PROPAGATION_CHOICE": "heads"}), paths, kept, TAX, "enc1") is None
    assert "propagation" not in kept.choice
    again = fit()  # a retrain that keeps the model choice keeps its decision, without scoring again
    again.choice["propagation"] = {"chosen": "heads", "rule": "one-se", "reason": "kept"}
    assert choose_propagation(Settings.from_env(env={}), paths, again, TAX, "enc1") is None
    assert choose_propagation(Settings.from_env(env={}), paths, fit(), TAX, "no-such-encoder") is None
