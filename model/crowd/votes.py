"""Annotations to votes: each annotator's paths on an item resolved, prefix-collapsed and weighted per level."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from model.crowd.types import Annotation, Vote
from model.errors import TaxonomyError
from model.taxonomy import IGNORE, Path, Taxonomy  # Path: a taxonomy path, one class name per level

__all__ = ["level_weights", "vote_tier"]


def vote_tier(v: Vote) -> int:
    """Precedence of a vote: 2 ground truth, 1 reviewed, 0 plain."""
    return 2 if v.ground_truth else 1 if v.reviewed else 0


def _collect(
    annotations: Sequence[Annotation], taxonomy: Taxonomy, problems: list[str]
) -> tuple[dict[int, dict[str, Vote]], list[int]]:
    """Resolved, prefix-collapsed votes per item and annotator (one per annotator: highest tier, then last)."""
    votes: dict[int, dict[str, Vote]] = {}
    order: list[int] = []
    for ann in annotations:
        item = int(ann.item)
        if item not in votes:
            votes[item] = {}
            order.append(item)
        resolved: list[Path] = []
        for raw in ann.paths:
            try:
                path = taxonomy.resolve(raw)
            except TaxonomyError as exc:
                problems.append(f"item {item}, annotator {ann.annotator}: {exc}")
                continue
            if path not in resolved:
                resolved.append(path)
        deepest = tuple(p for p in resolved if not any(len(q) > len(p) and q[: len(p)] == p for q in resolved))
        if not deepest:
            continue
        vote = Vote(str(ann.annotator), deepest, bool(ann.ground_truth), bool(ann.reviewed))
        old = votes[item].get(vote.annotator)
        if old is None or vote_tier(vote) >= vote_tier(old):
            votes[item][vote.annotator] = vote
    return votes, order


def level_weights(paths: Sequence[Path], codes: Mapping[Path, Sequence[int]], level: int) -> dict[int, float]:
    """Class index -> weight at ``level`` for one vote (each path weighs 1/len(paths); prefixes stop early)."""
    out: dict[int, float] = {}
    share = 1.0 / len(paths)
    for p in paths:
        c = codes[p][level]
        if c != IGNORE:
            out[c] = out.get(c, 0.0) + share
    return out
