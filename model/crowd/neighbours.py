"""The neighbours' verdict on each given label: a label-error signal from out-of-fold label propagation.

For every labelled item, the labels of the other images spread over the kNN graph of the embeddings, the item's
own label (and its fold's) removed (``model.propagation.held_out``), give a distribution over the leaves: what its
neighbours say it is. A given label that this distribution strongly contradicts is probably wrong (kNN label-noise
detection). :func:`with_neighbours` puts the probability the neighbours give each annotation's paths into its
:class:`~model.crowd.types.GivenLabel` (``neighbour_prob``); its ``error_score``, the mean of ``1 - quality`` and
``1 - neighbour_prob``, then ranks and triggers the label-error flags (``model.crowd.flags``).

On the simulated annotators of ``bench/disagreements.py`` (validation seeds 100-102) this mean ranked wrong
annotations better than ours' ``1 - quality`` alone and than the same propagation mixed into the model's
probabilities; ``bench/results/disagreements_propagation.txt`` has the test seeds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from model.arrays import FloatArray
from model.crowd.types import ItemConsensus
from model.errors import DataError
from model.taxonomy import Path, Taxonomy

__all__ = ["path_mass", "with_neighbours"]


def path_mass(leaf_probs: FloatArray, leaf_paths: list[Path], path: Path) -> float:
    """Probability of ``path`` (a leaf, or every leaf under a prefix) under leaf probabilities ``(C,)``."""
    n = len(path)
    return float(sum(float(p) for p, leaf in zip(leaf_probs, leaf_paths) if tuple(leaf[:n]) == tuple(path)))


def with_neighbours(items: Mapping[int, ItemConsensus], taxonomy: Taxonomy,
                    neighbour_probs: Mapping[int, FloatArray]) -> dict[int, ItemConsensus]:
    """The items with each given label's ``neighbour_prob`` filled where ``neighbour_probs`` has the item.

    Args:
        items: the consensus items.
        taxonomy: the label tree.
        neighbour_probs: item -> ``(C,)`` held-out propagated leaf probabilities, columns in
            ``taxonomy.candidate_paths(True)`` order.

    Raises:
        DataError: a vector of the wrong length.
    """
    leaf_paths = taxonomy.candidate_paths(leafs_only=True)[0]
    out = dict(items)
    for item, probs in neighbour_probs.items():
        ic = items.get(int(item))
        if ic is None or not ic.given:
            continue
        p = np.asarray(probs, dtype=np.float64).reshape(-1)
        if len(p) != len(leaf_paths):
            raise DataError(f"neighbour_probs[{item}] has {len(p)} values for {len(leaf_paths)} leaves; pass the "
                            "propagated leaf probabilities of this taxonomy.")
        given = tuple(dataclasses.replace(g, neighbour_prob=sum(path_mass(p, leaf_paths, q) for q in g.paths)
                                          / max(1, len(g.paths))) for g in ic.given)
        out[int(item)] = dataclasses.replace(ic, given=given)
    return out
