"""Near-duplicate groups of a project's images, and duplicates whose labels disagree.

Two items are duplicates when their images are byte-identical (same content hash: *exact*) or when their
embeddings' cosine similarity reaches a threshold (*near*: re-encoded, resized, slightly cropped or flipped
copies). Groups are the connected components of that relation (single linkage, ``scipy.sparse.csgraph``),
built from the index's range search (:func:`near_pairs`, incremental: only rows added since the last call).

How :data:`NEAR_DUPLICATE_THRESHOLD` was chosen (``bench/similarity.py``, ``bench/results/similarity.txt``):
animal-mnist (10,000 28 px silhouettes, 284 of them repeated byte for byte) embedded by a MoCo v2 encoder
pretrained on it (resnet18-half at 32 px, 6 CPU-minutes, 30 epochs; the README's folder example), with 500
injected copies of each kind — exact, a 1 px crop of two sides resized back, a horizontal flip, JPEG at quality
75. Positives: the copies of half of the originals; negatives: for each of those originals, its similarity to the
most similar image of other content (its hardest distinct pair). The threshold is the smallest value that at
most 0.5 % of the negatives reach (:func:`calibrate_threshold`): precision first, because a false pair sends
unrelated tasks to review and, grouped by single linkage, chains groups together. It came out at 0.9996; on the
whole set the grouping then has pair precision 0.95, finds every exact copy and 80 % of the JPEG copies, and
almost none of the crops and flips: this encoder puts 1 px crops and flips of a 28 px silhouette (median
similarity to the original 0.996 / 0.992) about as close as two different silhouettes (median similarity of an
image to its most similar distinct one 0.995); lower thresholds chain thousands of images into one group. So
near-duplicates here means re-encoded or re-saved copies; a project whose encoder separates images better
(larger images, longer pretraining) can lower ``NEAR_DUPLICATE_THRESHOLD`` after checking ``GET /duplicates``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from model.arrays import FloatArray
from model.errors import ConfigError
from model.neighbors import NEAR_DUPLICATE_THRESHOLD
from model.neighbors.index import NeighborIndex

__all__ = [
    "NEAR_DUPLICATE_THRESHOLD",
    "DuplicateGroup",
    "DuplicateKind",
    "Threshold",
    "calibrate_threshold",
    "conflicting_groups",
    "duplicate_groups",
    "near_pairs",
]


class DuplicateKind(str, enum.Enum):
    """How the members of a group are duplicates."""

    EXACT = "exact"  # all members' images are byte-identical
    NEAR = "near"  # at least two different images, joined by embedding similarity


@dataclass(frozen=True)
class DuplicateGroup:
    """Items whose images are duplicates of each other.

    Attributes:
        items: the member items (task ids), ascending; at least two.
        kind: exact (one content) or near (several contents).
        similarity: the weakest similarity that joined the group (1.0 for exact groups).
        keys: the distinct content keys of the members, ascending.
    """

    items: tuple[int, ...]
    kind: DuplicateKind
    similarity: float
    keys: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"items": list(self.items), "kind": self.kind.value, "similarity": round(self.similarity, 4),
                "keys": list(self.keys)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DuplicateGroup:
        """The inverse of :meth:`to_dict`."""
        return cls(tuple(int(i) for i in data["items"]), DuplicateKind(data["kind"]), float(data["similarity"]),
                   tuple(str(k) for k in data.get("keys", ())))


def near_pairs(index: NeighborIndex, threshold: float = NEAR_DUPLICATE_THRESHOLD, start: int = 0
               ) -> list[tuple[str, str, float]]:
    """Pairs of indexed keys whose embeddings' cosine similarity reaches ``threshold``.

    Args:
        index: the embeddings.
        threshold: cosine similarity from which two different images are near-duplicates.
        start: only pairs involving rows added at or after this row (incremental update; see
            :meth:`NeighborIndex.pairs_above`).

    Returns:
        ``(key_a, key_b, similarity)`` with ``key_a`` the earlier row.
    """
    _check_threshold(threshold)
    pairs, sims = index.pairs_above(threshold, start=start)  # (P, 2), (P,)
    keys = index.keys
    return [(keys[int(a)], keys[int(b)], float(s)) for (a, b), s in zip(pairs, sims)]


def duplicate_groups(items: Sequence[int], keys: Sequence[str], near: Iterable[tuple[str, str, float]] = ()
                     ) -> list[DuplicateGroup]:
    """Group items whose images are exact or near duplicates.

    Args:
        items: N item ids (task ids).
        keys: N content keys (image content hashes); equal keys are exact duplicates.
        near: near-duplicate pairs of content keys (:func:`near_pairs`); pairs naming a key of no item are
            ignored. None given: exact grouping only.

    Returns:
        Groups of at least two items, largest first (then by first item).
    """
    if len(items) != len(keys):
        raise ConfigError(f"{len(items)} items but {len(keys)} keys; pass one content key per item.")
    distinct = sorted(set(keys))
    node = {k: i for i, k in enumerate(distinct)}
    edges = [(node[a], node[b], s) for a, b, s in near if a in node and b in node and a != b]
    n = len(distinct)
    a = np.array([e[0] for e in edges], dtype=np.int64)
    b = np.array([e[1] for e in edges], dtype=np.int64)
    graph = coo_matrix((np.ones(len(edges)), (a, b)), shape=(n, n))
    _, component = connected_components(graph, directed=False)  # (n,) component per distinct key
    members: dict[int, list[int]] = {}
    contents: dict[int, set[str]] = {}
    for item, key in zip(items, keys):
        c = int(component[node[key]])
        members.setdefault(c, []).append(int(item))
        contents.setdefault(c, set()).add(key)
    low: dict[int, float] = {}
    for x, _, s in edges:
        c = int(component[x])
        low[c] = min(low.get(c, 1.0), s)
    groups = []
    for c, its in members.items():
        if len(its) < 2:
            continue
        kind = DuplicateKind.EXACT if len(contents[c]) == 1 else DuplicateKind.NEAR
        sim = 1.0 if kind is DuplicateKind.EXACT else low.get(c, 1.0)
        groups.append(DuplicateGroup(tuple(sorted(set(its))), kind, sim, tuple(sorted(contents[c]))))
    groups.sort(key=lambda g: (-len(g.items), g.items[0]))
    return groups


def _check_threshold(threshold: float) -> None:
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"near-duplicate threshold {threshold} is outside (0, 1]; a cosine similarity is needed.")


def conflicting_groups(groups: Sequence[DuplicateGroup], labels: Mapping[int, Any]) -> list[DuplicateGroup]:
    """Groups whose labelled members carry different labels (at least two labelled members).

    Args:
        groups: duplicate groups.
        labels: item -> its label (e.g. the consensus taxonomy path); items without one are left out.
    """
    out = []
    for group in groups:
        given = {tuple(labels[i]) if isinstance(labels[i], (list, tuple)) else labels[i]
                 for i in group.items if labels.get(i) is not None}
        if len(given) > 1:
            out.append(group)
    return out


@dataclass(frozen=True)
class Threshold:
    """A calibrated threshold and what it achieves on the calibration data."""

    value: float
    false_positive_rate: float  # share of the negatives at or above the value
    recall: float  # share of the positives at or above the value


def calibrate_threshold(positives: FloatArray, negatives: FloatArray, max_false_positive_rate: float = 0.005
                        ) -> Threshold:
    """The smallest similarity at which at most ``max_false_positive_rate`` of the negatives reach it.

    Args:
        positives: ``(P,)`` similarities of true duplicate pairs (copy vs original).
        negatives: ``(M,)`` similarities of distinct pairs (each image's most similar other image).
        max_false_positive_rate: the share of negatives allowed at or above the threshold.
    """
    neg = np.sort(np.asarray(negatives, dtype=np.float64))
    pos = np.asarray(positives, dtype=np.float64)
    if neg.size == 0:
        raise ConfigError("calibrate_threshold needs distinct pairs (negatives) to bound the false positives.")
    allowed = int(np.floor(max_false_positive_rate * neg.size))  # negatives allowed at or above the threshold
    value = float(np.nextafter(neg[neg.size - allowed - 1], np.inf))  # just above the highest excluded negative
    value = min(value, 1.0)
    return Threshold(value=value, false_positive_rate=float((neg >= value).mean()),
                     recall=float((pos >= value).mean()) if pos.size else float("nan"))
