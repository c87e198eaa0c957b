"""Consistent best-path decoding of per-level logits into calibrated path probabilities.

Each level head gives a softmax over its classes. The probability of a full path (root to leaf, END classes
below a leaf of a ragged tree) is the product of its level probabilities, renormalised over all valid full
paths, so a predicted child is always under its predicted parent. An inner node's probability is the sum over
the full paths under it. The prediction is the most probable full path (not the greedy argmax per level);
with ``leafs_only=False`` it is cut back to its deepest prefix that is probable enough. One temperature T
divides every level's logits; :func:`fit_temperature` chooses it on held-out logits so the returned scores
are calibrated probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.special import log_softmax, logsumexp

from model.arrays import BoolArray, FloatArray, IntArray
from model.errors import DataError
from model.taxonomy import IGNORE, Path, Taxonomy

__all__ = [
    "LevelLogits",
    "PathPrediction",
    "as_float64",
    "decode",
    "full_path_log_probs",
    "path_log_probs",
    "target_membership",
]

LevelLogits = Sequence[FloatArray | torch.Tensor]


@dataclass
class PathPrediction:
    """The decoded prediction for one image.

    Attributes:
        path: names from the root, a full path or (with ``leafs_only=False``) a prefix.
        score: calibrated probability of ``path`` (its marginal when a prefix); what Label Studio sorts by.
        level_scores: marginal probability of each prefix ``path[:k+1]``, non-increasing.
        alternatives: the next most probable distinct paths (``top_k > 1``), best first.
    """

    path: tuple[str, ...]
    score: float
    level_scores: list[float]
    alternatives: list[PathPrediction] = field(default_factory=list)


def as_float64(level_logits: LevelLogits, taxonomy: Taxonomy) -> list[FloatArray]:
    arrays = [
        (t.detach().cpu().double().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, dtype=np.float64))
        for t in level_logits
    ]
    if len(arrays) != taxonomy.depth:
        raise DataError(
            f"Got logits for {len(arrays)} levels but the taxonomy has {taxonomy.depth}; the heads were trained "
            "for another taxonomy: retrain after the label config changed."
        )
    n = arrays[0].shape[0] if arrays and arrays[0].ndim == 2 else -1
    for k, a in enumerate(arrays):
        if a.ndim != 2 or a.shape != (n, taxonomy.num_classes(k)):
            raise DataError(
                f"Level {k} logits have shape {a.shape}, expected ({n}, {taxonomy.num_classes(k)}); the heads do "
                "not match the taxonomy: retrain them for the current label config."
            )
    return arrays


def full_path_log_probs(level_logits: LevelLogits, taxonomy: Taxonomy, temperature: float = 1.0) -> FloatArray:
    """Log-probabilities of every full path (``taxonomy.candidate_paths(True)`` order), renormalised.

    Args:
        level_logits: L arrays ``(N, K_k)``.
        taxonomy: the taxonomy the heads were trained for.
        temperature: divides every logit; > 0.

    Returns:
        ``(N, P_full)`` float64, each row's ``exp`` sums to 1.
    """
    if not temperature > 0:
        raise DataError(f"The temperature must be positive, got {temperature}; fit it with fit_temperature.")
    arrays = as_float64(level_logits, taxonomy)
    _, index = taxonomy.candidate_paths(leafs_only=True)  # (P_full, L), no IGNORE
    logp = np.zeros((arrays[0].shape[0], index.shape[0]))  # (N, P_full)
    for k, a in enumerate(arrays):
        logp += log_softmax(a / temperature, axis=1)[:, index[:, k]]
    return logp - logsumexp(logp, axis=1)[:, None]


def target_membership(targets: IntArray, taxonomy: Taxonomy) -> BoolArray:
    """``(N, P_full)`` bool: full path j agrees with every known (non-IGNORE) level of row i."""
    _, index = taxonomy.candidate_paths(leafs_only=True)  # (P_full, L)
    known = targets != IGNORE  # (N, L)
    agree = (index[None, :, :] == targets[:, None, :]) | ~known[:, None, :]  # (N, P_full, L)
    return np.asarray(agree.all(axis=2))


def _membership(taxonomy: Taxonomy, leafs_only: bool) -> BoolArray:
    """``(P, P_full)`` bool: full path j lies under (or is) candidate path i of ``candidate_paths(leafs_only)``."""
    _, index = taxonomy.candidate_paths(leafs_only=leafs_only)  # (P, L), IGNORE below inner nodes
    return target_membership(index, taxonomy)


def _marginals(logp_full: FloatArray, member: BoolArray) -> FloatArray:
    """Log marginals ``(N, P)`` of candidate sets ``member (P, P_full)`` from full-path log-probs ``(N, P_full)``."""
    m = logp_full.max(axis=1, keepdims=True)  # (N, 1)
    with np.errstate(divide="ignore"):
        marginals: FloatArray = np.log(np.exp(logp_full - m) @ member.T.astype(np.float64)) + m
    return marginals


def path_log_probs(
    level_logits: LevelLogits, taxonomy: Taxonomy, leafs_only: bool = True, temperature: float = 1.0
) -> tuple[list[Path], FloatArray]:
    """Log-probability of every candidate path.

    Args:
        level_logits: L arrays/tensors ``(N, K_k)``, one per taxonomy level.
        taxonomy: the taxonomy the heads were trained for.
        leafs_only: candidates are the full paths only; else every node, inner nodes getting the marginal
            (sum over the full paths under them).
        temperature: divides every logit before the softmax.

    Returns:
        paths: the P candidate paths (``taxonomy.candidate_paths(leafs_only)`` order).
        logp: ``(N, P)`` float64; with ``leafs_only`` the rows' probabilities sum to 1.
    """
    logp_full = full_path_log_probs(level_logits, taxonomy, temperature)  # (N, P_full)
    if leafs_only:
        return taxonomy.candidate_paths(leafs_only=True)[0], logp_full
    paths, _ = taxonomy.candidate_paths(leafs_only=False)
    return paths, _marginals(logp_full, _membership(taxonomy, leafs_only=False))


def decode(
    level_logits: LevelLogits,
    taxonomy: Taxonomy,
    leafs_only: bool = True,
    prefix_threshold: float = 0.5,
    temperature: float = 1.0,
    top_k: int = 1,
) -> list[PathPrediction]:
    """The most probable consistent path per image.

    Args:
        level_logits: L arrays/tensors ``(N, K_k)``.
        taxonomy: the taxonomy the heads were trained for.
        leafs_only: return full paths only. When False, the deepest prefix of the best full path whose
            marginal probability is ``>= prefix_threshold`` (at least its top-level label).
        prefix_threshold: see ``leafs_only``.
        temperature: calibration temperature (from :func:`fit_temperature`).
        top_k: also list the next ``top_k - 1`` distinct paths in each prediction's ``alternatives``.

    Returns:
        One :class:`PathPrediction` per row, in order.
    """
    if top_k < 1:
        raise DataError(f"top_k must be >= 1, got {top_k}.")
    if not 0.0 <= prefix_threshold <= 1.0:
        raise DataError(f"prefix_threshold is a probability, got {prefix_threshold}; use a value in [0, 1].")
    full, _ = taxonomy.candidate_paths(leafs_only=True)
    logp_full = full_path_log_probs(level_logits, taxonomy, temperature)  # (N, P_full)
    nodes, _ = taxonomy.candidate_paths(leafs_only=False)
    node_pos = {p: i for i, p in enumerate(nodes)}
    marg = np.exp(_marginals(logp_full, _membership(taxonomy, leafs_only=False)))  # (N, P_nodes)
    order = np.argsort(-logp_full, axis=1, kind="stable")  # (N, P_full)

    out: list[PathPrediction] = []
    for i in range(logp_full.shape[0]):
        preds: list[PathPrediction] = []
        seen: set[Path] = set()
        for j in order[i]:
            path = full[j]
            scores = [float(marg[i, node_pos[path[: d + 1]]]) for d in range(len(path))]
            if not leafs_only:
                depth = max([d + 1 for d, s in enumerate(scores) if s >= prefix_threshold], default=1)
                path, scores = path[:depth], scores[:depth]
            if path in seen:
                continue
            seen.add(path)
            score = float(np.exp(logp_full[i, j])) if leafs_only else scores[-1]
            preds.append(PathPrediction(tuple(path), score, scores))
            if len(preds) == top_k:
                break
        best = preds[0]
        best.alternatives = preds[1:]
        out.append(best)
    return out


