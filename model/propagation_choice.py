"""Label propagation as a candidate of the training's model choice, scored on the heads' own folds.

The heads' candidates are cross-validated on folds of the labelled images (``model.heads.selection``). Two more
models are scored on the **same folds**: ``propagation`` (the labels of the other folds spread over the kNN graph of
all images, ``model.propagation.held_out``: a held-out image's own label, and its fold's, e.g. its duplicates', are
removed from the seeds) and ``heads+propagation`` (the mean of the chosen heads' calibrated out-of-fold full-path
probabilities and the propagated leaf probabilities). Each is decoded to its most probable leaf path and scored by
the same per-fold micro hierarchical F1 as the heads.

Cross-validation on the labelled images alone overestimated propagation against the heads by 5-10 points at 2 and 5
labels per class (``bench/results/label_propagation.txt``): the heads lose more than propagation when a fold's labels
are held out. :func:`choose` therefore corrects for that bias by :class:`ChoiceRule`:

* ``heads`` (no propagation model is ever chosen),
* ``mean`` (the highest mean hF wins, the biased estimate, kept as the measured baseline),
* ``one-se`` (a propagation model wins only when its mean per-fold gain over the heads exceeds one standard error of
  those paired gains, and :data:`~model.paired_gain.TIE_MARGIN`; ``model.paired_gain``, shared with the heads' choice).

``bench/label_propagation.py`` measures what each rule picks and the leaf accuracy of the pick on the unlabelled
images against the heads alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from model.arrays import BoolArray, FloatArray, IntArray
from model.errors import DataError
from model.evaluation import hierarchical_prf, true_paths
from model.heads.decode import full_path_log_probs
from model.heads.selection import CandidateScore
from model.heads.training import CrossValidation
from model.paired_gain import GainRule, paired_gain, required_gain
from model.propagation import held_out, leaf_probabilities, path_predictions, seed_matrix, spread
from model.taxonomy import Taxonomy

__all__ = ["BLEND", "PROPAGATION", "ChoiceRule", "PropagationChoice", "PropagatedTable", "blend_probabilities",
           "choose", "decide", "fold_scores", "held_out_scores", "spread_table"]

PROPAGATION = "propagation"
BLEND = "heads+propagation"


class ChoiceRule(str, Enum):
    """How the heads' winner and the propagation models are compared (see the module)."""

    HEADS = "heads"
    MEAN = "mean"
    ONE_SE = "one-se"


@dataclass
class PropagatedTable:
    """What a published version chosen as :data:`PROPAGATION` or :data:`BLEND` serves beside its heads: the leaf
    probabilities propagated from every training label to each indexed image, by content hash.

    Attributes:
        kind: :data:`PROPAGATION` (served as they are) or :data:`BLEND` (averaged with the heads' probabilities).
        hashes: ``(M,)`` content hashes; ``probs`` ``(M, P_full)`` their leaf probabilities
            (``Taxonomy.candidate_paths(True)`` order). An image not in the table (new since the version was
            published) gets the heads' prediction.
    """

    kind: str
    hashes: list[str]
    probs: FloatArray

    def __post_init__(self) -> None:
        if self.kind not in (PROPAGATION, BLEND):
            raise DataError(f"A propagated table serves {PROPAGATION!r} or {BLEND!r}, not {self.kind!r}.")
        if len(self.hashes) != len(self.probs):
            raise DataError(f"{len(self.hashes)} hashes for {len(self.probs)} probability rows; give one row per hash.")
        self._row = {h: i for i, h in enumerate(self.hashes)}

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._row

    def served(self, heads_paths: FloatArray, hashes: Sequence[str | None]) -> FloatArray:
        """Full-path probabilities served for rows with ``heads_paths (N, P_full)`` and their content hashes."""
        out = np.array(heads_paths, dtype=np.float64)
        for i, h in enumerate(hashes):
            row = self._row.get(h) if h else None
            if row is None:
                continue
            prop = np.asarray(self.probs[row], dtype=np.float64)
            out[i] = prop if self.kind == PROPAGATION else (out[i] + prop) / 2
        return out


@dataclass
class PropagationChoice:
    """What :func:`choose` decided: ``chosen`` is ``"heads"``, :data:`PROPAGATION` or :data:`BLEND`."""

    chosen: str
    reason: str
    rule: ChoiceRule
    scores: dict[str, CandidateScore]

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "rule": self.rule.value, "reason": self.reason,
                "candidates": {n: s.to_dict() for n, s in self.scores.items()}}


def blend_probabilities(heads_paths: FloatArray, propagated: FloatArray, reached: BoolArray) -> FloatArray:
    """Mean of the heads' full-path probabilities and the propagated leaf probabilities ``(N, P_full)`` (the same
    column order, ``Taxonomy.candidate_paths(True)``); the heads' alone where no label reached a row."""
    heads_paths = np.asarray(heads_paths, dtype=np.float64)
    if heads_paths.shape != propagated.shape:
        raise DataError(f"Heads probabilities {heads_paths.shape} and propagated ones {propagated.shape} differ; "
                        "give both over the taxonomy's full paths.")
    mixed: FloatArray = np.where(np.asarray(reached)[:, None], (heads_paths + propagated) / 2, heads_paths)
    return mixed


def fold_scores(name: str, paths: Sequence[tuple[str, ...]], cv: CrossValidation, taxonomy: Taxonomy
                 ) -> CandidateScore:
    truths = true_paths(cv.targets, taxonomy)
    per_fold = []
    for f in np.unique(cv.fold_of):
        rows = np.flatnonzero(cv.fold_of == f)
        hier = hierarchical_prf([truths[i][0] for i in rows], [paths[i] for i in rows], [truths[i][1] for i in rows])
        per_fold.append(float(hier["hF"]))
    exact = float(np.mean([tuple(p) == tuple(t) for p, (t, _) in zip(paths, truths)])) if truths else 0.0
    return CandidateScore(name, float(np.mean(per_fold)), float(np.std(per_fold)), per_fold, exact, 0.0)


def held_out_scores(cv: CrossValidation, graph: tuple[IntArray, FloatArray], graph_rows: IntArray,
                    taxonomy: Taxonomy) -> dict[str, CandidateScore]:
    """Cross-validated scores of :data:`PROPAGATION` and :data:`BLEND` on the folds of the heads' ``cv``.

    Args:
        cv: the chosen heads' cross-validation (``Selection.cv``): folds, targets, calibrated out-of-fold logits.
        graph: ``(idx, sim)`` kNN graph of every image (labelled or not), e.g. ``model.neighbors.graph.knn_graph``.
        graph_rows: ``(N_lab,)`` graph row of each labelled row of ``cv``.
        taxonomy: the label tree.
    """
    idx, sim = graph
    graph_rows = np.asarray(graph_rows)
    if len(graph_rows) != len(cv.targets) or len(cv.fold_of) != len(cv.targets):
        raise DataError(f"{len(graph_rows)} graph rows and {len(cv.fold_of)} folds for {len(cv.targets)} labelled "
                        "rows; pass the cross-validation of the same labelled rows.")
    leaf_paths = taxonomy.candidate_paths(leafs_only=True)[0]
    truths = true_paths(cv.targets, taxonomy)
    y = seed_matrix(len(idx), {int(r): [t] for r, (t, _) in zip(graph_rows, truths)}, leaf_paths)
    fold_of = np.full(len(idx), -1, dtype=np.int64)
    fold_of[graph_rows] = cv.fold_of
    probs, reached = held_out(idx, sim, y, fold_of)
    prop, prop_reached = probs[graph_rows].astype(np.float64), reached[graph_rows]
    heads = np.exp(full_path_log_probs(cv.oof_level_logits, taxonomy, cv.temperature))  # (N_lab, P_full)
    mixed = blend_probabilities(heads, prop, prop_reached)
    out: dict[str, CandidateScore] = {}
    for name, p, hit in ((PROPAGATION, prop, prop_reached), (BLEND, mixed, np.ones(len(mixed), dtype=bool))):
        preds = path_predictions(p, hit, leaf_paths)
        out[name] = fold_scores(name, [tuple(q.path) if q is not None else () for q in preds], cv, taxonomy)
    return out


def choose(heads: CandidateScore, others: dict[str, CandidateScore], rule: ChoiceRule) -> PropagationChoice:
    """The heads' winner (``heads``) or one of the propagation models (``others``, on the same folds) by ``rule``."""
    scores = {heads.name: heads, **others}
    if rule is ChoiceRule.HEADS or not others:
        return PropagationChoice("heads", "propagation models are not offered (rule heads)", rule, scores)
    k = len(heads.fold_hf)
    bar = GainRule(rule.value)
    gain, need = {}, {}
    for n, s in others.items():
        gain[n], se = paired_gain(s.fold_hf, heads.fold_hf)
        need[n] = required_gain(bar, se)
    winners = [n for n in others if gain[n] > need[n]]
    if not winners:
        best = max(others, key=lambda n: gain[n])
        return PropagationChoice("heads", f"{heads.name} kept: {best} gains {gain[best]:+.3f} hF over "
                                 f"{k} folds, not above {need[best]:.3f} (rule {rule.value})", rule, scores)
    best = max(winners, key=lambda n: gain[n])
    return PropagationChoice(best, f"{best} gains {gain[best]:+.3f} hF over {heads.name} on the same {k} "
                             f"folds, above {need[best]:.3f} (rule {rule.value})", rule, scores)


def decide(heads_name: str, cv: CrossValidation, graph: tuple[IntArray, FloatArray], graph_rows: IntArray,
           taxonomy: Taxonomy, rule: ChoiceRule) -> PropagationChoice:
    """A training's propagation choice: the chosen heads ``heads_name``, cross-validated as ``cv``, against
    :data:`PROPAGATION` and :data:`BLEND` on the same folds (:func:`held_out_scores`; arguments as there)."""
    heads = fold_scores(heads_name, [tuple(p.path) for p in cv.oof_predictions], cv, taxonomy)
    if rule is ChoiceRule.HEADS:
        return choose(heads, {}, rule)
    return choose(heads, held_out_scores(cv, graph, graph_rows, taxonomy), rule)


def spread_table(kind: str, graph: tuple[IntArray, FloatArray], seeds: dict[int, list[tuple[str, ...]]],
                 key: Callable[[int], str], taxonomy: Taxonomy) -> PropagatedTable:
    """The table a version chosen as ``kind`` serves: every training label spread over the graph.

    Args:
        kind: :data:`PROPAGATION` or :data:`BLEND` (what :func:`decide` chose).
        graph: ``(idx, sim)`` kNN graph of every image.
        seeds: graph row -> the leaf paths given to that image.
        key: the content hash of a graph row (the table's key).
        taxonomy: the label tree.

    Returns:
        The rows some label reached, with their ``(M, P_full)`` leaf probabilities.
    """
    idx, sim = graph
    leaf_paths = taxonomy.candidate_paths(leafs_only=True)[0]
    probs, reached = leaf_probabilities(spread(idx, sim, seed_matrix(len(idx), seeds, leaf_paths)))
    keep = np.flatnonzero(reached)
    return PropagatedTable(kind, [key(int(i)) for i in keep], probs[keep])
