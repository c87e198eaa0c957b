"""Disagreement flags, annotator statistics, the training policy and the review list of a consensus.

Flag kinds (:class:`FlagKind`), each at one taxonomy level:
    * ``annotators_disagree``: two or more annotators gave different labels; the level is the first where
      they diverge. Informational unless the consensus is also weak.
    * ``label_error_candidate``: one annotation is probably wrong (its estimated probability of being right
      is below ``policy.error_threshold``) and the model confidently contradicts it; one flag per annotation.
    * ``low_quality_consensus``: the consensus path itself is uncertain (probability below
      ``policy.min_quality``); the level is the first whose class is uncertain. Blocks training on the item.

Every flag carries a ``score`` in [0, 1] (how likely a label involved is wrong); the review list orders
items by their highest flag score. Items whose consensus comes from ground truth or a review count as
resolved: only label-error candidates about other annotations remain for them.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from model.crowd.consensus import ConsensusResult, ItemConsensus, Source
from model.taxonomy import Path, Taxonomy


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

    def to_json(self) -> dict:
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


def _fmt(path: Path | None) -> str:
    return "/".join(path) if path else "(none)"


def find_flags(result: ConsensusResult, taxonomy: Taxonomy) -> list[Flag]:
    """Every flag of every item, highest score first."""
    policy = result.policy
    flags: list[Flag] = []
    for item, ic in result.items.items():
        if ic.path is None:
            continue
        resolved = ic.source in (Source.GROUND_TRUTH, Source.REVIEWED)
        if not resolved and ic.first_divergence is not None and ic.n_annotators >= 2:
            k = ic.first_divergence
            votes = ", ".join(f"{name} ×{n:g}" for name, n in sorted(ic.level_votes[k].items(), key=lambda t: -t[1]))
            lq = ic.level_quality[k] if k < len(ic.level_quality) else ic.quality
            flags.append(Flag(
                FlagKind.ANNOTATORS_DISAGREE, item, k, 1.0 - lq,
                f"Annotators disagree at level {k}: {votes}; consensus {_fmt(ic.path)} (p={ic.quality:.2f}).",
                suggested=ic.path,
            ))
        if not resolved and ic.quality < policy.min_quality:
            k = next((k for k, q in enumerate(ic.level_quality) if q < policy.min_quality), len(ic.path) - 1)
            flags.append(Flag(
                FlagKind.LOW_QUALITY_CONSENSUS, item, k, 1.0 - ic.quality,
                f"Uncertain consensus {_fmt(ic.path)}: p={ic.quality:.2f} < {policy.min_quality:.2f} "
                f"({ic.n_annotators} annotator(s)). Add an annotation or mark a ground truth.",
                suggested=ic.path,
            ))
        for g in ic.given:
            if g.ground_truth and resolved:
                continue
            if g.model_prob is None or g.quality >= policy.error_threshold:
                continue
            if g.model_prob > 1.0 - policy.model_confidence:
                continue
            k = g.first_wrong_level
            if k is None:
                model_code = ic.model_path or ()
                k = next((k for k in range(len(g.paths[0])) if k >= len(model_code) or g.paths[0][k] != model_code[k]), 0)
            flags.append(Flag(
                FlagKind.LABEL_ERROR_CANDIDATE, item, k, 1.0 - g.quality,
                f"Label {', '.join(_fmt(p) for p in g.paths)} by {g.annotator} is probably wrong "
                f"(p={g.quality:.2f}; the model gives it {g.model_prob:.2f} and prefers {_fmt(ic.model_path)}).",
                annotator=g.annotator, given=g.paths, suggested=ic.path,
            ))
    flags.sort(key=lambda f: (-f.score, f.item, f.kind.value))
    return flags


def annotator_stats(result: ConsensusResult, taxonomy: Taxonomy) -> dict[str, AnnotatorStats]:
    """Per annotator: quality, per-level accuracy, count, agreement and the confusions that dominate."""
    qualities: dict[str, list[float]] = {a: [] for a in result.annotator_order}
    agree: dict[str, list[bool]] = {a: [] for a in result.annotator_order}
    wrong_at: dict[str, Counter] = {a: Counter() for a in result.annotator_order}
    confusions: dict[str, Counter] = {a: Counter() for a in result.annotator_order}
    for ic in result.items.values():
        if ic.path is None:
            continue
        for g in ic.given:
            qualities[g.annotator].append(g.quality)
            agree[g.annotator].append(g.first_wrong_level is None)
            k = g.first_wrong_level
            if k is not None:
                wrong_at[g.annotator][k] += 1
                given = next((p for p in g.paths if len(p) > k), g.paths[0])
                confusions[g.annotator][(k, _fmt(given[: k + 1]), _fmt(ic.path[: k + 1]))] += 1
    stats: dict[str, AnnotatorStats] = {}
    for j, a in enumerate(result.annotator_order):
        level_acc: list[float | None] = []
        for fit in result.level_fits:
            level_acc.append(float(fit.accuracy[j]) if np.isfinite(fit.accuracy[j]) and fit.accuracy[j] > 0 else None)
        worst = wrong_at[a].most_common(1)[0][0] if wrong_at[a] else None
        top = tuple(
            (g, c, n) for (k, g, c), n in confusions[a].most_common() if k == worst
        )[:3]
        stats[a] = AnnotatorStats(
            annotator=a,
            quality=float(np.mean(qualities[a])) if qualities[a] else 0.0,
            level_accuracy=tuple(level_acc),
            n_labeled=len(qualities[a]),
            agreement_with_consensus=float(np.mean(agree[a])) if agree[a] else 0.0,
            worst_level=worst,
            confusions=top,
        )
    return stats


def apply_policy(result: ConsensusResult) -> None:
    """Fill ``result.labels`` and ``result.excluded`` from the items, the flags and the policy."""
    policy = result.policy
    blocking: dict[int, Flag] = {}
    for f in result.flags:
        if f.kind in BLOCKING and f.item not in blocking:
            blocking[f.item] = f
    for item, ic in result.items.items():
        reason = _exclusion(ic, policy, blocking.get(item))
        if reason is None:
            assert ic.path is not None
            result.labels[item] = ic.path
        else:
            result.excluded[item] = reason


def _exclusion(ic: ItemConsensus, policy, flag: Flag | None) -> str | None:
    if ic.path is None:
        return "no label: every annotation is cancelled, empty, or uses labels no longer in the label config"
    if ic.source in (Source.GROUND_TRUTH, Source.REVIEWED):
        return None
    if ic.n_annotators < policy.min_annotators:
        return f"{ic.n_annotators} annotator(s) labelled it; the policy needs {policy.min_annotators}"
    if ic.agreement_overall is not None and ic.agreement_overall < policy.min_agreement:
        return (f"{ic.agreement_overall:.0%} of annotators agree with the consensus; the policy needs "
                f"{policy.min_agreement:.0%}")
    if policy.exclude_flagged and flag is not None:
        return (f"flagged {flag.kind.value} at level {flag.level}: resolve it in Label Studio "
                "(add an annotation, mark a ground truth or review it)")
    if policy.exclude_flagged and not ic.agreement_overall:
        return "no annotator gave the consensus label (the model outweighs them): review it in Label Studio"
    return None


def review_list(result: ConsensusResult) -> list[dict]:
    """Items to review, most urgent first: ``{"item", "score", "kinds", "level", "consensus", "quality", "messages"}``."""
    by_item: dict[int, list[Flag]] = {}
    for f in result.flags:
        by_item.setdefault(f.item, []).append(f)
    entries = []
    for item, flags in by_item.items():
        ic = result.items[item]
        top = max(flags, key=lambda f: f.score)
        entries.append({
            "item": item, "score": round(top.score, 6), "kinds": sorted({f.kind.value for f in flags}),
            "level": top.level, "consensus": None if ic.path is None else list(ic.path),
            "quality": round(ic.quality, 6), "excluded": result.excluded.get(item),
            "messages": [f.message for f in sorted(flags, key=lambda f: -f.score)],
        })
    entries.sort(key=lambda e: (-e["score"], e["item"]))
    return entries


def _item_json(ic: ItemConsensus) -> dict:
    return {
        "item": ic.item, "consensus": None if ic.path is None else list(ic.path), "quality": round(ic.quality, 6),
        "level_quality": [round(q, 6) for q in ic.level_quality], "source": ic.source.value,
        "n_annotators": ic.n_annotators,
        "given": [
            {"annotator": g.annotator, "paths": [list(p) for p in g.paths], "quality": round(g.quality, 6),
             "model_prob": None if g.model_prob is None else round(g.model_prob, 6),
             "first_wrong_level": g.first_wrong_level, "ground_truth": g.ground_truth, "reviewed": g.reviewed}
            for g in ic.given
        ],
        "level_votes": list(ic.level_votes),
        "pairwise_agreement": [None if x is None else round(x, 6) for x in ic.pairwise_agreement],
        "agreement": [None if x is None else round(x, 6) for x in ic.agreement],
        "agreement_overall": None if ic.agreement_overall is None else round(ic.agreement_overall, 6),
        "first_divergence": ic.first_divergence,
        "model_path": None if ic.model_path is None else list(ic.model_path),
        "model_prob": None if ic.model_prob is None else round(ic.model_prob, 6),
    }


def result_to_json(result: ConsensusResult) -> dict:
    """The whole result as JSON-ready dicts (the report's data)."""
    counts = Counter(f.kind.value for f in result.flags)
    return {
        "summary": {
            "items": len(result.items), "trained": len(result.labels), "excluded": len(result.excluded),
            "annotators": len(result.annotators), "flags": dict(counts), "used_model": result.used_model,
            "items_with_disagreement": sum(1 for ic in result.items.values() if ic.first_divergence is not None),
        },
        "policy": result.policy_record(),
        "review": review_list(result),
        "flags": [f.to_json() for f in result.flags],
        "annotators": [
            {**asdict(s), "quality": round(s.quality, 6),
             "agreement_with_consensus": round(s.agreement_with_consensus, 6),
             "confusions": [{"given": g, "consensus": c, "count": n} for g, c, n in s.confusions]}
            for s in sorted(result.annotators.values(), key=lambda s: s.quality)  # type: ignore[attr-defined]
        ],
        "items": [_item_json(ic) for ic in result.items.values()],
        "excluded": {str(k): v for k, v in result.excluded.items()},
        "problems": list(result.problems),
    }
