"""Decoding the per-level posteriors of the crowd estimation into one consistent consensus path per item.

The probability of a full path is the product of its level posteriors, renormalised over the taxonomy's
full paths (levels no annotator labelled for an item are left out), so a consensus path is always a child
under its parent. The consensus is the most probable full path cut at the deepest level any annotator
labelled.

How likely a path is right comes from the per-level *review* probabilities (:mod:`model.crowd.pool`: the
posteriors blended with a linear pool, robust to annotators who err together), level by level and never
multiplied across levels (every level sees the same annotations, so a product would count them twice): the
probability that a path is right down to level k is the smallest review probability of its classes at levels
0..k. A class's probability already covers a wrong parent, so chaining levels (parent × child within the parent)
would compound their uncertainties: a lone annotator's labels in a deep taxonomy would fall below the policy's
``min_quality`` and out of training. That gives the consensus quality per level and the probability that each
annotator's label is right; the model's own level probabilities, decoded like the posteriors, give the model's
opinion of each label.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.special import softmax

from model.arrays import BoolArray, FloatArray, IntArray
from model.crowd.dawid_skene import CrowdFit
from model.crowd.types import ConsensusPolicy, GivenLabel, ItemConsensus, Source, Vote
from model.crowd.votes import level_weights, vote_tier
from model.taxonomy import IGNORE, Path, Taxonomy

__all__ = ["CHUNK", "PathDecoder", "first_wrong", "plurality_path"]

CHUNK = 1024
"""Items per block when scoring full paths: ``(CHUNK, P)`` floats at a time."""


class PathDecoder:
    """Joint decoding of level posteriors over the taxonomy's full paths, one item at a time.

    Args:
        taxonomy: the label tree.
        fits: per level, the crowd estimation (posteriors ``(N, K_k)``).
        evidence: ``(N, L)`` whether some annotator labelled level k of item i.
        model: per level ``(N, K_k)`` model probabilities (zero rows: no opinion), or None.
        codes: path -> per-level class indices of every path given.
        review: per level ``(N, K_k)`` review probabilities (:func:`model.crowd.pool.review_posterior`).
    """

    def __init__(
        self, taxonomy: Taxonomy, fits: list[CrowdFit], evidence: FloatArray, model: list[FloatArray] | None,
        codes: Mapping[Path, Sequence[int]], review: list[FloatArray],
    ) -> None:
        self.taxonomy = taxonomy
        self.codes = codes  # path -> (L,) level indices of every path given
        self.class_names = [taxonomy.class_names(k) for k in range(taxonomy.depth)]
        self.paths, self.index = taxonomy.candidate_paths(leafs_only=True)  # P paths, (P, L)
        self.evidence = evidence  # (N, L)
        self.log_post = [np.log(np.clip(f.posterior, 1e-300, None)) for f in fits]  # L x (N, K_k)
        self.review = review  # L x (N, K_k)
        # (N,) whether the model has an opinion on the item
        self.has_model: BoolArray | None = None if model is None else np.any(np.stack([m.sum(axis=1) > 0 for m in model], 1), 1)
        self.model_log = None if model is None else [np.log(np.clip(m, 1e-12, None)) for m in model]
        self._under: dict[Path, tuple[int, ...]] = {}  # path -> candidate rows under it

    def path_probs(self, rows: IntArray) -> tuple[FloatArray, FloatArray | None]:
        """Probabilities of every full path for the item ``rows``.

        Returns:
            crowd: ``(R, P)`` from the level posteriors of the levels each item has labels at.
            model: ``(R, P)`` from the model's level probabilities, or None without a model.
        """
        P = len(self.paths)
        score = np.zeros((len(rows), P))
        for k, log_post in enumerate(self.log_post):
            score += self.evidence[rows, k][:, None] * log_post[rows][:, self.index[:, k]]
        crowd = softmax(score, axis=1)
        if self.model_log is None:
            return crowd, None
        mscore = np.zeros((len(rows), P))
        for k, log_m in enumerate(self.model_log):
            mscore += log_m[rows][:, self.index[:, k]]
        return crowd, softmax(mscore, axis=1)

    def _mass(self, probs: Sequence[float], path: Path) -> float:
        """Probability mass of the full paths under ``path`` (the path itself when it is a leaf)."""
        under = self._under.get(path)
        if under is None:
            n = len(path)
            code = self.taxonomy.encode(path)[:n]
            under = tuple(np.flatnonzero((self.index[:, :n] == code).all(axis=1)).tolist())
            self._under[path] = under
        return float(sum(probs[j] for j in under))

    def level_right(self, i: int, path: Path) -> list[float]:
        """Per level k of ``path``, the probability that it is right down to level k (item row ``i``)."""
        code = self.codes.get(path)
        if code is None:
            code = tuple(self.taxonomy.encode(path).tolist())
        out: list[float] = []
        for k in range(len(path)):
            p = float(self.review[k][i, code[k]])
            out.append(min(out[-1], p) if out else p)
        return out

    def item_consensus(
        self, item: int, i: int, votes: list[Vote], policy: ConsensusPolicy, probs: list[float],
        model_probs: list[float] | None,
    ) -> ItemConsensus:
        """The consensus of item row ``i`` from its votes and its path probabilities ``(P,)`` (crowd, model)."""
        L = self.taxonomy.depth
        depth = int(self.evidence[i].sum())  # evidence covers levels 0..depth-1
        if not votes:
            return ItemConsensus(item, None, 0.0, (), Source.NONE, (), tuple({} for _ in range(L)),
                                 (None,) * L, (None,) * L, None, None)
        if self.has_model is not None and not self.has_model[i]:
            model_probs = None

        source = Source.CROWD
        top = max(vote_tier(v) for v in votes)
        if policy.prefer_ground_truth and top > 0:
            source = Source.GROUND_TRUTH if top == 2 else Source.REVIEWED
            path = plurality_path([v for v in votes if vote_tier(v) == top])
        else:
            best = self.paths[max(range(len(probs)), key=probs.__getitem__)]
            path = best[: min(len(best), depth)]
        level_quality = tuple(self.level_right(i, path))
        quality = level_quality[-1] if level_quality else 0.0

        given = []
        codes = self.codes
        for v in votes:
            q = sum(self.level_right(i, p)[-1] for p in v.paths) / len(v.paths)
            mp = None if model_probs is None else sum(self._mass(model_probs, p) for p in v.paths) / len(v.paths)
            given.append(GivenLabel(v.annotator, v.paths, q, mp, first_wrong(v.paths, path), v.ground_truth, v.reviewed))

        level_votes: list[dict[str, float]] = []
        pairwise: list[float | None] = []
        agreement: list[float | None] = []
        first_div = None
        target = (self.taxonomy.encode(path) if path else np.full(L, IGNORE)).tolist()
        for k in range(L):
            weights = [level_weights(v.paths, codes, k) for v in votes]
            weights = [w for w in weights if w]
            names = self.class_names[k]
            tally: dict[str, float] = {}
            for w in weights:
                for c, x in w.items():
                    tally[names[c]] = tally.get(names[c], 0.0) + x
            level_votes.append(tally)
            if len(weights) >= 2:
                pairs = [
                    sum(wa.get(c, 0.0) * wb.get(c, 0.0) for c in wa) / (sum(wa.values()) * sum(wb.values()))
                    for x, wa in enumerate(weights) for wb in weights[x + 1:]
                ]
                pairwise.append(sum(pairs) / len(pairs))
                if first_div is None and (len(tally) > 1 or any(len(w) > 1 for w in weights)):
                    first_div = k
            else:
                pairwise.append(None)
                if first_div is None and weights and len(weights[0]) > 1:
                    first_div = k
            if weights and target[k] != IGNORE:
                t = int(target[k])
                agreement.append(sum(w.get(t, 0.0) / sum(w.values()) for w in weights) / len(weights))
            else:
                agreement.append(None)
        compatible = [g.first_wrong_level is None for g in given]
        model_path = None if model_probs is None else self.paths[max(range(len(model_probs)), key=model_probs.__getitem__)]
        model_prob = None if model_probs is None or not path else self._mass(model_probs, path)
        return ItemConsensus(
            item=item, path=path, quality=quality, level_quality=level_quality, source=source, given=tuple(given),
            level_votes=tuple(level_votes), pairwise_agreement=tuple(pairwise), agreement=tuple(agreement),
            agreement_overall=sum(compatible) / len(compatible), first_divergence=first_div,
            model_path=model_path, model_prob=model_prob,
        )


def first_wrong(paths: Sequence[Path], target: Path) -> int | None:
    """First level where no path of ``paths`` matches ``target`` (levels both name), or None."""
    worst: int | None = None
    for p in paths:
        n = min(len(p), len(target))
        mismatch = next((k for k in range(n) if p[k] != target[k]), None)
        if mismatch is None:
            return None
        worst = mismatch if worst is None else max(worst, mismatch)
    return worst


def plurality_path(votes: Sequence[Vote]) -> Path:
    """The deepest path most of ``votes`` agree on, level by level (ties: the first given)."""
    path: Path = ()
    while True:
        counts: dict[str, float] = {}
        for v in votes:
            below = [p for p in v.paths if len(p) > len(path) and p[: len(path)] == path]
            for p in below:
                counts[p[len(path)]] = counts.get(p[len(path)], 0.0) + 1.0 / len(below)
        if not counts:
            return path
        path = (*path, max(counts, key=lambda name: counts[name]))
