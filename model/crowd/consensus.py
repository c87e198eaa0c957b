"""One training label per item from the annotations of several annotators, with its quality.

How annotations are read:
    * Every annotation is one annotator's set of taxonomy paths for one item. A path that is a prefix of
      another path of the same annotation is dropped (``[["A"], ["A", "B"]]`` means ``A/B``).
    * A *prefix* annotation (``["A"]`` in a deeper tree) is a vote at level 0 only; it says nothing below.
    * A *multi-path* annotation (``[["A", "B"], ["C"]]``) splits one vote evenly between its paths: the
      heads learn one path per item, so several paths are read as the annotator's uncertainty.
    * An annotation with no paths (cancelled, empty, or only labels that left the config) gives no vote;
      an item that has nothing else is reported as excluded with the reason.

How the consensus is found (see :mod:`model.crowd.dawid_skene`): per taxonomy level, Dawid–Skene EM estimates a
confusion matrix per annotator and a posterior over the true class per item, with the model's
out-of-sample level probabilities as one more annotator when given. The level posteriors are then
decoded jointly over the taxonomy's full paths (path score = sum of level log-posteriors, so every
consensus path is a child under its parent) and cut at the deepest level any annotator labelled.

Ground-truth annotations (then reviewed ones) take precedence when the policy says so: the consensus of
such an item is the vote among those annotations alone.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from model.crowd.dawid_skene import CrowdConfig, CrowdFit, Observations, fit_crowd
from model.errors import ConfigError, TaxonomyError
from model.taxonomy import IGNORE, Path, Taxonomy

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
        exclude_flagged: keep items with a blocking flag (see ``model.crowd.flags.BLOCKING``) out of training
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
        quality: estimated probability that the label is right (path posterior mass under its paths).
        model_prob: the model's probability of the same paths, or None without a model.
        first_wrong_level: first level where it differs from the consensus, or None.
        ground_truth: the annotation is marked ground truth.
        reviewed: the annotation was accepted by a reviewer.
    """

    annotator: str
    paths: tuple[Path, ...]
    quality: float
    model_prob: float | None
    first_wrong_level: int | None
    ground_truth: bool = False
    reviewed: bool = False


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
        annotators: annotator -> ``model.crowd.flags.AnnotatorStats``.
        flags: every ``model.crowd.flags.Flag``, most urgent first.
        policy: the policy applied.
        problems: messages about input that could not be used (unknown labels, ...).
        level_fits: per level, the crowd estimation (confusion matrices, posteriors), rows in ``item_order``.
        item_order: item ids in the row order of ``level_fits``.
        annotator_order: annotator ids in the order of ``level_fits`` confusion matrices.
        used_model: whether model probabilities took part.
        level_probs: the model probabilities given (item -> per level ``(K_k,)``), or None.
    """

    labels: dict[int, Path]
    excluded: dict[int, str]
    items: dict[int, ItemConsensus]
    annotators: dict[str, object]
    flags: list
    policy: ConsensusPolicy
    problems: list[str] = field(default_factory=list)
    level_fits: list[CrowdFit] = field(default_factory=list, repr=False)
    item_order: list[int] = field(default_factory=list, repr=False)
    annotator_order: list[str] = field(default_factory=list, repr=False)
    used_model: bool = False
    level_probs: Mapping[int, Sequence[np.ndarray]] | None = field(default=None, repr=False)

    def policy_record(self) -> dict:
        """What the model manifest records about the training labels."""
        return {
            "consensus_method": "dawid-skene per level" + (" + model" if self.used_model else "") + ", taxonomy-decoded",
            "policy": asdict(self.policy),
            "items_seen": len(self.items),
            "items_trained": len(self.labels),
            "items_excluded": len(self.excluded),
            "flags": len(self.flags),
        }

    def review_list(self) -> list:
        """The flags to review, most urgent first (one entry per flag; see ``model.crowd.flags.review_list``)."""
        from model.crowd.flags import review_list

        return review_list(self)

    def to_json(self) -> dict:
        """A JSON-ready dict: summary, items, annotators, flags and the review list."""
        from model.crowd.flags import result_to_json

        return result_to_json(self)


# ----- reading annotations --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Vote:
    """One annotator's resolved, prefix-collapsed paths on one item (what the estimation uses)."""

    annotator: str
    paths: tuple[Path, ...]
    ground_truth: bool
    reviewed: bool


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


# ----- the consensus ----------------------------------------------------------------------------------
def consensus(
    annotations: Sequence[Annotation],
    taxonomy: Taxonomy,
    policy: ConsensusPolicy = ConsensusPolicy(),
    level_probs: Mapping[int, Sequence[np.ndarray]] | None = None,
    crowd_config: CrowdConfig = CrowdConfig(),
) -> ConsensusResult:
    """Consensus paths, their quality, annotator statistics and flags for all items.

    Args:
        annotations: every usable annotation (cancelled ones left out by the caller; an annotation with no
            paths still makes its item known, so that it can be reported as excluded).
        taxonomy: the project's label tree; paths are resolved against it (unknown ones reported).
        policy: which consensus labels training may use, and the flag thresholds.
        level_probs: optional model opinion, item -> list over levels of ``(K_k,)`` out-of-sample
            probability vectors (``K_k = taxonomy.num_classes(k)``). Items missing here have no model opinion.
        crowd_config: settings of the per-level estimation.

    Returns:
        The :class:`ConsensusResult`.

    Raises:
        ConfigError: an invalid policy.
        TaxonomyError: level probabilities whose shape does not match the taxonomy.
    """
    from model.crowd.flags import annotator_stats, apply_policy, find_flags
    from model.crowd.path_decode import CHUNK, PathDecoder

    policy.validate()
    problems: list[str] = []
    votes, order = _collect(annotations, taxonomy, problems)
    items = order
    row = {item: i for i, item in enumerate(items)}
    annotators = sorted({a for per in votes.values() for a in per})
    col = {a: j for j, a in enumerate(annotators)}
    L = taxonomy.depth
    all_paths = sorted({p for per in votes.values() for v in per.values() for p in v.paths})
    codes = {p: tuple(taxonomy.encode(p).tolist()) for p in all_paths}
    N, A = len(items), len(annotators)

    model = _model_matrices(level_probs, items, row, taxonomy) if level_probs else None
    fits: list[CrowdFit] = []
    evidence = np.zeros((N, L), dtype=bool)  # (N, L) some annotator labelled level k of item i
    for k in range(L):
        entries = [
            (row[item], col[vote.annotator], c, weight)
            for item, per in votes.items()
            for vote in per.values()
            for c, weight in level_weights(vote.paths, codes, k).items()
        ]
        table = np.asarray(entries, dtype=np.float64).reshape(-1, 4)  # (E, 4): item row, annotator, class, weight
        idx = table[:, :3].astype(np.int64)
        obs = Observations(idx[:, 0], idx[:, 1], idx[:, 2], table[:, 3])
        evidence[obs.item, k] = True
        fits.append(fit_crowd(obs, N, A, taxonomy.num_classes(k), None if model is None else model[k], crowd_config))

    decoder = PathDecoder(taxonomy, fits, evidence, model, codes)
    details: dict[int, ItemConsensus] = {}
    for start in range(0, N, CHUNK):
        rows = np.arange(start, min(start + CHUNK, N))
        crowd_p, model_p = decoder.path_probs(rows)  # (R, P) each
        for r, i in enumerate(rows):
            item = items[i]
            details[item] = decoder.item_consensus(
                item, int(i), list(votes[item].values()), policy, crowd_p[r].tolist(),
                None if model_p is None else model_p[r].tolist(),
            )

    result = ConsensusResult(
        labels={}, excluded={}, items=details, annotators={}, flags=[], policy=policy, problems=problems,
        level_fits=fits, item_order=items, annotator_order=annotators, used_model=model is not None,
        level_probs=level_probs or None,
    )
    result.flags = find_flags(result, taxonomy)
    result.annotators = annotator_stats(result, taxonomy)
    apply_policy(result)
    return result


def _model_matrices(
    level_probs: Mapping[int, Sequence[np.ndarray]], items: list[int], row: dict[int, int], taxonomy: Taxonomy
) -> list[np.ndarray]:
    """Per level ``(N, K_k)`` model probabilities (rows of zeros where the model has no opinion)."""
    mats = [np.zeros((len(items), taxonomy.num_classes(k))) for k in range(taxonomy.depth)]
    for item, probs in level_probs.items():
        if int(item) not in row:
            continue
        if len(probs) != taxonomy.depth:
            raise TaxonomyError(
                f"level_probs[{item}] has {len(probs)} levels but the taxonomy has {taxonomy.depth}; pass the "
                "probabilities of the model trained on this taxonomy."
            )
        for k, p in enumerate(probs):
            p = np.asarray(p, dtype=np.float64).reshape(-1)
            if p.shape[0] != taxonomy.num_classes(k):
                raise TaxonomyError(
                    f"level_probs[{item}][{k}] has {p.shape[0]} classes, the taxonomy's level {k} has "
                    f"{taxonomy.num_classes(k)}; retrain the model after a label config change."
                )
            total = p.sum()
            if total > 0:
                mats[k][row[int(item)]] = p / total
    return mats
