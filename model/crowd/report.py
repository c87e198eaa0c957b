"""A consensus result as JSON: summary, items, annotators, flags, and the review list (most urgent first)."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from typing import Any

from model.crowd.findings import Flag
from model.crowd.types import ConsensusResult, ItemConsensus

__all__ = ["result_to_json", "review_list"]


def review_list(result: ConsensusResult) -> list[dict[str, Any]]:
    """Items to review, most urgent first: ``{"item", "score", "kinds", "level", "consensus", "quality", "messages"}``."""
    by_item: dict[int, list[Flag]] = {}
    for f in result.flags:
        by_item.setdefault(f.item, []).append(f)
    entries: list[dict[str, Any]] = []
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


def _item_json(ic: ItemConsensus) -> dict[str, Any]:
    return {
        "item": ic.item, "consensus": None if ic.path is None else list(ic.path), "quality": round(ic.quality, 6),
        "level_quality": [round(q, 6) for q in ic.level_quality], "source": ic.source.value,
        "n_annotators": ic.n_annotators,
        "given": [
            {"annotator": g.annotator, "paths": [list(p) for p in g.paths], "quality": round(g.quality, 6),
             "model_prob": None if g.model_prob is None else round(g.model_prob, 6),
             "neighbour_prob": None if g.neighbour_prob is None else round(g.neighbour_prob, 6),
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


def result_to_json(result: ConsensusResult) -> dict[str, Any]:
    """The whole result as JSON-ready dicts (the report's data)."""
    counts = Counter(f.kind.value for f in result.flags)
    return {
        "summary": {
            "items": len(result.items), "trained": len(result.labels), "excluded": len(result.excluded),
            "annotators": len(result.annotators), "flags": dict(counts), "used_model": result.used_model,
            "items_with_disagreement": sum(1 for ic in result.items.values() if ic.first_divergence is not None),
            "quality_blend": [round(r.blend, 3) for r in result.level_reviews],
        },
        "policy": result.policy_record(),
        "review": review_list(result),
        "flags": [f.to_json() for f in result.flags],
        "annotators": [
            {**asdict(s), "quality": round(s.quality, 6),
             "agreement_with_consensus": round(s.agreement_with_consensus, 6),
             "confusions": [{"given": g, "consensus": c, "count": n} for g, c, n in s.confusions]}
            for s in sorted(result.annotators.values(), key=lambda s: s.quality)
        ],
        "items": [_item_json(ic) for ic in result.items.values()],
        "excluded": {str(k): v for k, v in result.excluded.items()},
        "problems": list(result.problems),
    }
