"""The evaluation protocol of ``bench/ssl_vs_baseline.py``: splits, label budgets, metrics and verdicts.

- **Splits** (:func:`split`): exact duplicates are grouped first (``bench.datasets.content_groups``), then each
  leaf class's groups are dealt into test / validation / train pool in fixed shares, so no image content is on
  two sides. The split does not depend on the method or the seed.
- **Budgets** (:class:`Budget`, :func:`labelled_subset`): ``k`` labels per leaf class, or a share of the whole
  dataset spread over the classes as evenly as possible; drawn from the train pool, nested (a smaller budget's
  labels are inside a larger one's for the same seed).
- **Metrics** (:func:`scores`): micro hierarchical F1 over full paths (``model.evaluation.hierarchical_prf``) and
  leaf macro-F1 (``model.evaluation.level_metrics``), on the test split only.
- **Verdict** (:func:`verdict`): ours against the best baseline, paired over seeds: a win or a miss only when
  the mean difference exceeds its spread over seeds (at least ``MIN_MARGIN``), else a tie.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from model.evaluation import hierarchical_prf, level_metrics
from model.taxonomy import Path, Taxonomy

__all__ = ["MIN_MARGIN", "Budget", "Split", "labelled_subset", "scores", "split", "verdict"]

MIN_MARGIN = 0.005
"""hF differences at most this are ties whatever the spread (one seed, or identical runs)."""


@dataclass(frozen=True)
class Split:
    """Sorted int64 indices of the three disjoint parts."""

    test: np.ndarray
    validation: np.ndarray
    pool: np.ndarray


def split(leaf: np.ndarray, groups: np.ndarray, test_share: float, val_share: float, seed: int = 0) -> Split:
    """Per leaf class, its content groups in random order are dealt to test, then validation, then the pool.

    Args:
        leaf: leaf class per image ``(N,)``.
        groups: content id per image ``(N,)``; equal ids stay on one side.
        test_share: share of each class's images in the test split.
        val_share: share in the validation split.
        seed: split seed.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[], [], []]
    for c in np.unique(leaf):
        members = np.flatnonzero(leaf == c)
        quota = [test_share * len(members), (test_share + val_share) * len(members)]
        taken = 0
        for g in rng.permutation(np.unique(groups[members])):
            rows = np.flatnonzero(groups == g).tolist()
            side = 0 if taken < quota[0] else 1 if taken < quota[1] else 2
            parts[side] += rows
            taken += len(rows)
    test, val, pool = (np.array(sorted(set(p)), dtype=np.int64) for p in parts)
    assert not (set(groups[test]) & set(groups[pool]) or set(groups[val]) & set(groups[pool])
                or set(groups[test]) & set(groups[val])), "a duplicate straddles two splits"
    return Split(test, val, pool)


@dataclass(frozen=True)
class Budget:
    """How many labels a run gets: ``per_class`` labels per leaf, or ``share`` of the whole dataset."""

    per_class: int | None = None
    share: float | None = None

    @property
    def name(self) -> str:
        return f"{self.per_class}/class" if self.per_class is not None else f"{100 * self.share:g} %"

    def counts(self, n_classes: int, n_total: int, seed: int) -> np.ndarray:
        """Labels per class ``(K,)``; a share is spread evenly, the remainder to random classes (``seed``)."""
        if self.per_class is not None:
            return np.full(n_classes, self.per_class)
        total = max(n_classes, int(round(self.share * n_total)))
        out = np.full(n_classes, total // n_classes)
        out[np.random.default_rng(5000 + seed).permutation(n_classes)[: total % n_classes]] += 1
        return out


def labelled_subset(leaf: np.ndarray, pool: np.ndarray, counts: np.ndarray, seed: int) -> np.ndarray:
    """The first ``counts[c]`` images of class ``c`` in a per-seed random order of the pool (nested in k).

    Returns:
        sorted int64 indices into the dataset.
    """
    rng = np.random.default_rng(1000 + seed)
    classes = np.unique(leaf[pool])
    picked = [rng.permutation(pool[leaf[pool] == c])[: int(counts[i])] for i, c in enumerate(classes)]
    return np.sort(np.concatenate(picked))


def scores(true: Sequence[Path], pred: Sequence[Path], taxonomy: Taxonomy) -> dict[str, float]:
    """``hF`` (micro hierarchical F1 of full paths) and ``leaf_f1`` (macro-F1 over the leaf classes)."""
    leaves = [n.path for n in taxonomy.leaves()]
    pos = {p: i for i, p in enumerate(leaves)}
    hier = hierarchical_prf(list(true), list(pred), [False] * len(true))
    leaf = level_metrics(np.array([pos[tuple(p)] for p in true]), np.array([pos[tuple(p)] for p in pred]),
                         ["/".join(p) for p in leaves])
    return {"hF": float(hier["hF"]), "leaf_f1": float(leaf["macro"]["f1"])}


def verdict(ours: Sequence[float], best: Sequence[float]) -> tuple[str, float, float]:
    """``(word, mean difference, margin)`` of ours vs the best baseline, paired per seed.

    The word is ``win`` / ``miss`` when ``|mean difference|`` exceeds the margin (the standard deviation of the
    per-seed differences, at least :data:`MIN_MARGIN`), else ``tie``.
    """
    diff = np.asarray(ours, dtype=float) - np.asarray(best, dtype=float)
    mean = float(diff.mean())
    margin = max(MIN_MARGIN, float(diff.std(ddof=1)) if len(diff) > 1 else 0.0)
    word = "win" if mean > margin else "miss" if mean < -margin else "tie"
    return word, mean, margin
