"""What a consensus finds: flags about items (:class:`Flag`, of a :class:`FlagKind`; the kinds that block training:
``BLOCKING``) and how each annotator labels (:class:`AnnotatorStats`). ``model.crowd.flags`` computes them."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from model.taxonomy import Path  # a taxonomy path: one class name per level

__all__ = ["AnnotatorStats", "BLOCKING", "Flag", "FlagKind"]


class FlagKind(str, enum.Enum):
    """What a flag says about an item."""

    ANNOTATORS_DISAGREE = "annotators_disagree"
    LABEL_ERROR_CANDIDATE = "label_error_candidate"
    LOW_QUALITY_CONSENSUS = "low_quality_consensus"


BLOCKING: frozenset[FlagKind] = frozenset({FlagKind.LOW_QUALITY_CONSENSUS})
"""Kinds that keep an item out of training (with ``policy.exclude_flagged``) until it is resolved."""


@dataclass(frozen=True)
class Flag:
    """One finding about one item.

    Attributes:
        kind: what was found.
        item: the item id.
        level: the taxonomy level concerned (0-based).
        score: in [0, 1], how likely a label involved is wrong (review priority).
        message: one line for people, naming labels and annotators.
        annotator: the annotator concerned (label-error candidates), else None.
        given: the label concerned (label-error candidates: the annotator's paths), else None.
        suggested: the consensus path at the time of flagging.
    """

    kind: FlagKind
    item: int
    level: int
    score: float
    message: str
    annotator: str | None = None
    given: tuple[Path, ...] | None = None
    suggested: Path | None = None

    @property
    def key(self) -> str:
        """Stable identity of the finding (the same finding on a later run has the same key)."""
        labels = "|".join("/".join(p) for p in self.given or ())
        return f"{self.kind.value}:{self.item}:{self.level}:{self.annotator or ''}:{labels}"

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value, "item": self.item, "level": self.level, "score": round(self.score, 6),
            "message": self.message, "annotator": self.annotator,
            "given": None if self.given is None else [list(p) for p in self.given],
            "suggested": None if self.suggested is None else list(self.suggested), "key": self.key,
        }


@dataclass(frozen=True)
class AnnotatorStats:
    """How one annotator labels.

    Attributes:
        annotator: the annotator id.
        quality: mean estimated probability that their labels are right, in [0, 1].
        level_accuracy: per level, the estimated accuracy from their confusion matrix (None: no labels there).
        n_labeled: items they labelled.
        agreement_with_consensus: fraction of their labels compatible with the consensus path.
        worst_level: the level where they disagree with the consensus most, or None.
        confusions: their most frequent disagreements at ``worst_level``: ``(given, consensus, count)``.
    """

    annotator: str
    quality: float
    level_accuracy: tuple[float | None, ...]
    n_labeled: int
    agreement_with_consensus: float
    worst_level: int | None
    confusions: tuple[tuple[str, str, int], ...]
