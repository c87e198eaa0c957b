"""The data of the consensus: annotations in, votes, per-item and per-level consensus out (its flags and annotator
stats: ``model.crowd.findings``).

Shapes: per level, the annotator label matrix is ``(N_items, M_annotators)`` with -1 where an annotator did not
label; the model's probabilities are ``(K_k,)`` per item and level.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from model.arrays import FloatArray
from model.crowd.dawid_skene import CrowdFit
from model.crowd.findings import AnnotatorStats, Flag
from model.crowd.pool import ReviewFit
from model.errors import ConfigError
from model.taxonomy import Path  # a taxonomy path: one class name per level

__all__ = [
    "Annotation",
    "ConsensusPolicy",
    "ConsensusResult",
    "GivenLabel",
    "ItemConsensus",
    "Source",
    "Vote",
]


@dataclass(frozen=True)
class Annotation:
    """One annotator's labels for one item.

    Attributes:
        item: the item (Label Studio task id).
        annotator: who labelled (e.g. the Label Studio user id as a string).
        paths: taxonomy paths given (names or Choice values); empty when the annotation holds no label.
        ground_truth: marked as ground truth in Label Studio.
        reviewed: accepted by a reviewer.
    """

    item: int
    annotator: str
    paths: tuple[tuple[str, ...], ...]
    ground_truth: bool = False
    reviewed: bool = False


@dataclass(frozen=True)
class ConsensusPolicy:
    """Which consensus labels training may use.

    Attributes:
        min_annotators: annotators with a label an item needs (ground truth / reviewed items excepted).
        min_agreement: fraction of an item's annotators whose label agrees with the consensus path.
        prefer_ground_truth: ground-truth, then reviewed annotations decide their items alone.
        exclude_flagged: keep items with a blocking flag (see ``model.crowd.findings.BLOCKING``) out of training
            until a ground-truth or reviewed annotation resolves them.
        min_quality: a consensus whose estimated probability of being right is below this is flagged as
            low quality.
        error_threshold: an annotation whose probability of being right is below this, and that the model
            contradicts, is a label-error candidate.
        model_confidence: the model "confidently contradicts" a label when it gives that label at most
            ``1 - model_confidence``.
    """

    min_annotators: int = 1
    min_agreement: float = 0.0
    prefer_ground_truth: bool = True
    exclude_flagged: bool = True
    min_quality: float = 0.6
    error_threshold: float = 0.5
    model_confidence: float = 0.7

    def validate(self) -> None:
        """Raises ConfigError naming the bad field and its valid range."""
        if self.min_annotators < 1:
            raise ConfigError(f"min_annotators={self.min_annotators}: set CONSENSUS_MIN_ANNOTATORS to 1 or more.")
        for name in ("min_agreement", "min_quality", "error_threshold", "model_confidence"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name}={value}: the consensus policy needs a fraction in [0, 1].")


class Source(str, enum.Enum):
    """Where an item's consensus comes from."""

    CROWD = "crowd"
    GROUND_TRUTH = "ground_truth"
    REVIEWED = "reviewed"
    NONE = "none"


@dataclass(frozen=True)
class GivenLabel:
    """One annotator's label on one item, with how likely it is right.

    Attributes:
        annotator: who gave it.
        paths: the canonical paths given (deepest only).
        quality: estimated probability that the label is right (its paths' review probability, see
            ``model.crowd.path_decode``; the mean over its paths).
        model_prob: the model's probability of the same paths, or None without a model.
        first_wrong_level: first level where it differs from the consensus, or None.
        ground_truth: the annotation is marked ground truth.
        reviewed: the annotation was accepted by a reviewer.
        neighbour_prob: the probability its neighbours in the embedding give the same paths (held-out label
            propagation, ``model.crowd.neighbours``), or None without that signal.
    """

    annotator: str
    paths: tuple[Path, ...]
    quality: float
    model_prob: float | None
    first_wrong_level: int | None
    ground_truth: bool = False
    reviewed: bool = False
    neighbour_prob: float | None = None

    @property
    def error_score(self) -> float:
        """How likely the label is wrong: ``1 - quality``, averaged with ``1 - neighbour_prob`` when known."""
        if self.neighbour_prob is None:
            return 1.0 - self.quality
        return 1.0 - (self.quality + self.neighbour_prob) / 2


@dataclass(frozen=True)
class ItemConsensus:
    """Everything known about one item's labels.

    Attributes:
        item: the item id.
        path: the consensus path (a valid, possibly prefix, path), or None when no annotator labelled it.
        quality: estimated probability that ``path`` is right.
        level_quality: per level of ``path``, the probability its class at that level is right.
        source: where the consensus comes from.
        given: the labels given, one per annotator with a label.
        level_votes: per level, class name -> votes (fractions for multi-path annotations).
        pairwise_agreement: per level, the fraction of annotator pairs agreeing (None with < 2 labels there).
        agreement: per level, the fraction of annotators labelling that level who agree with the consensus.
        agreement_overall: fraction of annotators whose label is compatible with the consensus path.
        first_divergence: first level where the annotators' labels differ, or None.
        model_path: the model's most likely full path, or None without a model.
        model_prob: the model's probability of the consensus path, or None.
    """

    item: int
    path: Path | None
    quality: float
    level_quality: tuple[float, ...]
    source: Source
    given: tuple[GivenLabel, ...]
    level_votes: tuple[dict[str, float], ...]
    pairwise_agreement: tuple[float | None, ...]
    agreement: tuple[float | None, ...]
    agreement_overall: float | None
    first_divergence: int | None
    model_path: Path | None = None
    model_prob: float | None = None

    @property
    def n_annotators(self) -> int:
        return len(self.given)


@dataclass
class ConsensusResult:
    """The outcome of :func:`consensus`.

    Attributes:
        labels: item -> consensus path to train on (policy applied).
        excluded: item -> reason it is not trained on.
        items: item -> :class:`ItemConsensus` for every item seen.
        annotators: annotator -> ``model.crowd.findings.AnnotatorStats``.
        flags: every ``model.crowd.findings.Flag``, most urgent first.
        policy: the policy applied.
        problems: messages about input that could not be used (unknown labels, ...).
        level_fits: per level, the crowd estimation (confusion matrices, posteriors), rows in ``item_order``.
        level_reviews: per level, the review probabilities behind every quality (``model.crowd.pool``).
        item_order: item ids in the row order of ``level_fits``.
        annotator_order: annotator ids in the order of ``level_fits`` confusion matrices.
        used_model: whether model probabilities took part.
        level_probs: the model probabilities given (item -> per level ``(K_k,)``), or None.
    """

    labels: dict[int, Path]
    excluded: dict[int, str]
    items: dict[int, ItemConsensus]
    annotators: dict[str, AnnotatorStats]
    flags: list[Flag]
    policy: ConsensusPolicy
    problems: list[str] = field(default_factory=list)
    level_fits: list[CrowdFit] = field(default_factory=list, repr=False)
    level_reviews: list[ReviewFit] = field(default_factory=list, repr=False)
    item_order: list[int] = field(default_factory=list, repr=False)
    annotator_order: list[str] = field(default_factory=list, repr=False)
    used_model: bool = False
    level_probs: Mapping[int, Sequence[FloatArray]] | None = field(default=None, repr=False)

    def policy_record(self) -> dict[str, Any]:
        """What the model manifest records about the training labels."""
        return {
            "consensus_method": "dawid-skene per level" + (" + model" if self.used_model else "") + ", taxonomy-decoded",
            "quality_method": "dawid-skene posterior blended with a linear pool, blend chosen on held-out labels",
            "quality_blend": [round(r.blend, 3) for r in self.level_reviews],
            "policy": asdict(self.policy),
            "items_seen": len(self.items),
            "items_trained": len(self.labels),
            "items_excluded": len(self.excluded),
            "flags": len(self.flags),
        }


# ----- reading annotations --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Vote:
    """One annotator's resolved, prefix-collapsed paths on one item (what the estimation uses)."""

    annotator: str
    paths: tuple[Path, ...]
    ground_truth: bool
    reviewed: bool
