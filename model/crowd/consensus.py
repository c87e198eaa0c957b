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

How likely each consensus path and each given label is right (the qualities behind the flags and the review
list) comes from the per-level review probabilities of :mod:`model.crowd.pool`: the posterior blended with a
linear pool of the model and the annotators, which stays calibrated when annotators and the model err together;
the blend is chosen per level on held-out labels.

Ground-truth annotations (then reviewed ones) take precedence when the policy says so: the consensus of
such an item is the vote among those annotations alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from model.arrays import FloatArray
from model.crowd.dawid_skene import CrowdConfig, CrowdFit, Observations, fit_crowd
from model.crowd.flags import annotator_stats, apply_policy, find_flags
from model.crowd.neighbours import with_neighbours
from model.crowd.path_decode import CHUNK, PathDecoder
from model.crowd.pool import ReviewFit, review_posterior
from model.crowd.types import Annotation, ConsensusPolicy, ConsensusResult, ItemConsensus
from model.crowd.votes import _collect, level_weights
from model.errors import TaxonomyError
from model.taxonomy import Taxonomy

__all__ = ["consensus"]


# ----- the consensus ----------------------------------------------------------------------------------
def consensus(
    annotations: Sequence[Annotation],
    taxonomy: Taxonomy,
    policy: ConsensusPolicy = ConsensusPolicy(),
    level_probs: Mapping[int, Sequence[FloatArray]] | None = None,
    crowd_config: CrowdConfig = CrowdConfig(),
    neighbour_probs: Mapping[int, FloatArray] | None = None,
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
        neighbour_probs: optional held-out label propagation, item -> ``(C,)`` leaf probabilities
            (``taxonomy.candidate_paths(True)`` order): the neighbours' verdict that joins the label-error flags
            (``model.crowd.neighbours``); it changes no consensus.

    Returns:
        The :class:`ConsensusResult`.

    Raises:
        ConfigError: an invalid policy.
        TaxonomyError: level probabilities whose shape does not match the taxonomy.
    """
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
    reviews: list[ReviewFit] = []
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
        level_model = None if model is None or not crowd_config.use_model else model[k]
        fits.append(fit_crowd(obs, N, A, taxonomy.num_classes(k), level_model, crowd_config))
        reviews.append(review_posterior(obs, fits[-1], N, A, taxonomy.num_classes(k), level_model))

    decoder = PathDecoder(taxonomy, fits, evidence, model, codes, [r.posterior for r in reviews])
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

    if neighbour_probs:
        details = with_neighbours(details, taxonomy, neighbour_probs)
    result = ConsensusResult(
        labels={}, excluded={}, items=details, annotators={}, flags=[], policy=policy, problems=problems,
        level_fits=fits, level_reviews=reviews, item_order=items, annotator_order=annotators, used_model=model is not None,
        level_probs=level_probs or None,
    )
    result.flags = find_flags(result, taxonomy)
    result.annotators = annotator_stats(result, taxonomy)
    apply_policy(result)
    return result


def _model_matrices(
    level_probs: Mapping[int, Sequence[FloatArray]], items: list[int], row: dict[int, int], taxonomy: Taxonomy
) -> list[FloatArray]:
    """Per level ``(N, K_k)`` model probabilities (rows of zeros where the model has no opinion)."""
    mats: list[FloatArray] = [np.zeros((len(items), taxonomy.num_classes(k))) for k in range(taxonomy.depth)]
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
