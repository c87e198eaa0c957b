"""Disagreement flags, annotator statistics and the training policy of a consensus.

Flag kinds (:class:`FlagKind`), each at one taxonomy level:
    * ``annotators_disagree``: two or more annotators gave different labels; the level is the first where
      they diverge. Informational unless the consensus is also weak.
    * ``label_error_candidate``: one annotation is probably wrong (its estimated probability of being right
      is below ``policy.error_threshold``; with the neighbours' verdict, ``model.crowd.neighbours``, the mean of
      both) and the model confidently contradicts it; one flag per annotation, scored by ``GivenLabel.error_score``.
    * ``low_quality_consensus``: the consensus path itself is uncertain (probability below
      ``policy.min_quality``); the level is the first whose class is uncertain. Blocks training on the item.

Every flag carries a ``score`` in [0, 1] (how likely a label involved is wrong); the review list orders
items by their highest flag score. Items whose consensus comes from ground truth or a review count as
resolved: only label-error candidates about other annotations remain for them.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from model.crowd.findings import BLOCKING, AnnotatorStats, Flag, FlagKind
from model.crowd.types import ConsensusPolicy, ConsensusResult, ItemConsensus, Source
from model.taxonomy import Path, Taxonomy

__all__ = ["annotator_stats", "apply_policy", "find_flags"]


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
            if g.model_prob is None or 1.0 - g.error_score >= policy.error_threshold:
                continue
            if g.model_prob > 1.0 - policy.model_confidence:
                continue
            level = g.first_wrong_level
            if level is None:
                model_code = ic.model_path or ()
                level = next((k for k in range(len(g.paths[0])) if k >= len(model_code) or g.paths[0][k] != model_code[k]), 0)
            neighbours = "" if g.neighbour_prob is None else f", its neighbours {g.neighbour_prob:.2f}"
            flags.append(Flag(
                FlagKind.LABEL_ERROR_CANDIDATE, item, level, g.error_score,
                f"Label {', '.join(_fmt(p) for p in g.paths)} by {g.annotator} is probably wrong "
                f"(p={g.quality:.2f}; the model gives it {g.model_prob:.2f}{neighbours} and prefers "
                f"{_fmt(ic.model_path)}).",
                annotator=g.annotator, given=g.paths, suggested=ic.path,
            ))
    flags.sort(key=lambda f: (-f.score, f.item, f.kind.value))
    return flags


def annotator_stats(result: ConsensusResult, taxonomy: Taxonomy) -> dict[str, AnnotatorStats]:
    """Per annotator: quality, per-level accuracy, count, agreement and the confusions that dominate."""
    qualities: dict[str, list[float]] = {a: [] for a in result.annotator_order}
    agree: dict[str, list[bool]] = {a: [] for a in result.annotator_order}
    wrong_at: dict[str, Counter[int]] = {a: Counter() for a in result.annotator_order}
    confusions: dict[str, Counter[tuple[int, str, str]]] = {a: Counter() for a in result.annotator_order}
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


def _exclusion(ic: ItemConsensus, policy: ConsensusPolicy, flag: Flag | None) -> str | None:
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


