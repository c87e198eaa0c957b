"""Temperature calibration of path probabilities: one temperature T divides every level's logits.

:func:`fit_temperature` chooses T on held-out (out-of-fold) logits by minimising the negative log-likelihood
of the true paths (``scipy.optimize.minimize_scalar`` over log T, bounded), so the scores
:func:`model.heads.decode.decode` returns are calibrated probabilities. :func:`path_nll` is the per-row loss.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, logsumexp

from model.arrays import FloatArray, IntArray
from model.errors import DataError
from model.heads.decode import LevelLogits, as_float64, full_path_log_probs, target_membership
from model.taxonomy import IGNORE, Taxonomy

__all__ = ["fit_temperature", "path_nll"]


def path_nll(
    level_logits: LevelLogits, targets: IntArray, taxonomy: Taxonomy, temperature: float = 1.0
) -> FloatArray:
    """Negative log-likelihood of each row's known (prefix of its) path, ``(N,)``; NaN for unlabelled rows."""
    logp_full = full_path_log_probs(level_logits, taxonomy, temperature)
    targets = np.asarray(targets)
    member = target_membership(targets, taxonomy)  # (N, P_full)
    labelled = (targets != IGNORE).any(axis=1)
    masked = np.where(member, logp_full, -np.inf)
    nll = -logsumexp(masked, axis=1)
    return np.where(labelled, nll, np.nan)


def fit_temperature(
    level_logits: LevelLogits,
    targets: IntArray,
    taxonomy: Taxonomy,
    bounds: tuple[float, float] = (0.05, 20.0),
    prior_std: float = 1.0,
) -> float:
    """The temperature minimising the mean NLL of the true paths on held-out (out-of-fold) logits.

    Rows known only down to a prefix contribute the NLL of that prefix (the sum over the full paths under it).
    A Gaussian prior on log T (mean 0, std ``prior_std``) keeps T near 1 when only a handful of rows are
    labelled (a few confident hits must not sharpen every later score); with hundreds of rows it is negligible.
    A coarse grid over log T finds the basin, then ``scipy.optimize.minimize_scalar`` (bounded) refines it.

    Args:
        level_logits: L arrays ``(N, K_k)`` of held-out predictions.
        targets: ``(N, L)`` from ``Taxonomy.encode_many``; all-IGNORE rows are skipped.
        taxonomy: the taxonomy of the heads.
        bounds: the search range of T.
        prior_std: standard deviation of the prior on log T.

    Returns:
        T > 0 (1.0 when no row is labelled).
    """
    targets = np.asarray(targets)
    arrays = as_float64(level_logits, taxonomy)
    if targets.shape != (arrays[0].shape[0], taxonomy.depth):
        raise DataError(
            f"Targets have shape {targets.shape}, expected ({arrays[0].shape[0]}, {taxonomy.depth}); pass "
            "Taxonomy.encode_many of the same rows as the logits."
        )
    rows = (targets != IGNORE).any(axis=1)
    if not rows.any():
        return 1.0
    arrays = [a[rows] for a in arrays]
    member = target_membership(targets[rows], taxonomy)  # (n, P_full)
    _, index = taxonomy.candidate_paths(leafs_only=True)  # (P_full, L)

    def loss(log_t: float) -> float:
        t = float(np.exp(log_t))
        logp = np.zeros((arrays[0].shape[0], index.shape[0]))  # (n, P_full)
        for k, a in enumerate(arrays):
            logp += log_softmax(a / t, axis=1)[:, index[:, k]]
        logp -= logsumexp(logp, axis=1)[:, None]
        nll = -logsumexp(np.where(member, logp, -np.inf), axis=1)  # (n,)
        return float(nll.mean() + 0.5 * (log_t / prior_std) ** 2 / len(nll))

    grid = np.linspace(np.log(bounds[0]), np.log(bounds[1]), 25)
    values = [loss(g) for g in grid]
    b = int(np.argmin(values))
    lo, hi = grid[max(b - 1, 0)], grid[min(b + 1, len(grid) - 1)]
    best = minimize_scalar(loss, bounds=(lo, hi), method="bounded", options={"xatol": 1e-4})
    log_t = float(best.x) if best.success and best.fun <= values[b] else float(grid[b])
    return float(np.exp(log_t))
