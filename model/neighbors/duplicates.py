"""Near-duplicate groups of a project's images, and duplicates whose labels disagree.

Two items are duplicates when their images are byte-identical (same content hash: *exact*) or when their
embeddings' cosine similarity reaches a threshold (*near*: re-encoded, resized, slightly cropped or flipped
copies). Groups are the connected components of that relation (single linkage, ``scipy.sparse.csgraph``),
built from the index's range search (:func:`near_pairs`, incremental: only rows added since the last call).

The threshold (:func:`auto_threshold`, the default): the similarity that at most 0.5 % of the project's images
reach with their most similar other image (a sample of up to :data:`AUTO_SAMPLE` rows of the index), calibrated again
for each encoder, and never above :data:`~model.neighbors.AUTO_THRESHOLD_CAP` (0.9996). The rule is
``bench/similarity.py``'s calibration without its knowledge of which images are copies: there (animal-mnist, 10,000
28 px silhouettes with injected exact, 1 px crop, flip and JPEG-75 copies) the negatives are each original's most
similar image of other content and the threshold the smallest value that at most 0.5 % of them reach
(:func:`calibrate_threshold`): precision first, because a false pair sends unrelated tasks to review and, grouped by
single linkage, chains groups together. A threshold is a property of the encoder: that calibration gives 0.9996 for
an encoder of the product's default 20-minute budget (median nearest-distinct similarity 0.994) and 0.9785 for one
of 1 minute (median 0.888), where a fixed 0.9996 finds no JPEG copy at all. In a project the nearest other image of
a real near-duplicate is its copy: copies fewer than 0.5 % of the images do not move the quantile; many more push it
up among the copies themselves (2,000 copies in 12,000 images: 7.7 % of the images reach 0.9996), which the cap stops. Measured
(``bench/results/similarity*.txt``): the automatic threshold equals the calibration with known copies for the
default encoder at 25 copies per kind, keeps 0.9996 at 500 per kind (JPEG recall 0.80, precision 0.98), and for the
1-minute encoder finds 86 % of the JPEG copies at precision 0.98 where 0.9996 finds none (but 6 % with 500 copies
per kind: many copies and a weak encoder together still defeat it). Near-duplicates found are
re-encoded or re-saved copies: every encoder measured puts 1 px crops and flips of a 28 px silhouette about as close
as two different silhouettes. ``NEAR_DUPLICATE_THRESHOLD`` set above 0 fixes the value instead.
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
from model.neighbors import AUTO_THRESHOLD_CAP, NEAR_DUPLICATE_THRESHOLD
from model.neighbors.index import NeighborIndex

__all__ = [
    "AUTO_FALSE_POSITIVE_RATE",
    "AUTO_THRESHOLD_CAP",
    "AUTO_SAMPLE",
    "NEAR_DUPLICATE_THRESHOLD",
    "DuplicateGroup",
    "DuplicateKind",
    "Threshold",
    "auto_threshold",
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


AUTO_FALSE_POSITIVE_RATE = 0.005
"""Share of the images whose most similar other image may reach the automatic threshold."""
AUTO_SAMPLE = 5000
"""Rows of the index whose nearest other row the automatic threshold reads (all of a smaller index)."""


def near_pairs(index: NeighborIndex, threshold: float, start: int = 0) -> list[tuple[str, str, float]]:
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


def auto_threshold(index: NeighborIndex, max_false_positive_rate: float = AUTO_FALSE_POSITIVE_RATE,
                   sample: int = AUTO_SAMPLE, seed: int = 0, cap: float = AUTO_THRESHOLD_CAP) -> Threshold:
    """The near-duplicate threshold for this index's encoder: the smallest similarity at most
    ``max_false_positive_rate`` of the (sampled) rows reach with their most similar other row, and at most ``cap``
    (see the module).

    ``recall`` is NaN (no known copies). An index of fewer than two rows gives ``cap``.
    """
    n = len(index)
    if n < 2:
        return Threshold(value=cap, false_positive_rate=0.0, recall=float("nan"))
    rows = np.arange(n) if n <= sample else np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
    keys = index.keys
    sims, found = index.search(index.vectors([keys[int(r)] for r in rows]), 2)  # (S, 2), (S, 2)
    nearest = np.where(found[:, 0] == rows, sims[:, 1], sims[:, 0])  # (S,) the most similar *other* row
    # an identical vector stored under another key may come first: then row 0 is that other row, as wanted
    nearest = nearest[np.isfinite(nearest)]
    value = min(calibrate_threshold(np.empty(0), nearest, max_false_positive_rate).value, cap)
    return Threshold(value=value, false_positive_rate=float((nearest >= value).mean()), recall=float("nan"))


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
