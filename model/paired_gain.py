"""Whether one model beats another on the same cross-validation folds: the paired per-fold gain against a bar.

Both model choices of a training use it: the heads' candidates (``model.heads.selection``) and the propagation
models against the chosen heads (``model.propagation_choice``). Scores are per-fold hierarchical F1 on the **same**
folds, so the fold-to-fold difficulty cancels in the paired gains ``challenger - incumbent``; what is left is the
noise of the comparison. Two bars:

* ``mean``: the mean gain must exceed :data:`TIE_MARGIN` (the highest mean wins, ties to the incumbent);
* ``one-se``: the mean gain must also exceed one standard error of the paired gains (``std(ddof=1) / sqrt(k)``):
  a gain that the folds do not agree on is a tie, and a tie goes to the incumbent (the simpler model).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

import numpy as np

from model.errors import DataError

__all__ = ["TIE_MARGIN", "GainRule", "paired_gain", "required_gain"]

TIE_MARGIN = 0.005
"""Mean hF gains up to this are ties under every rule; a tie goes to the incumbent (the lower-rank model)."""


class GainRule(str, Enum):
    """The bar a challenger's paired gain must clear (see the module)."""

    MEAN = "mean"
    ONE_SE = "one-se"


def paired_gain(challenger: Sequence[float], incumbent: Sequence[float]) -> tuple[float, float]:
    """Mean of the per-fold gains ``challenger - incumbent`` and its standard error (0 with one fold).

    Raises:
        DataError: the two were not scored on the same number of folds.
    """
    c, i = np.asarray(challenger, dtype=np.float64), np.asarray(incumbent, dtype=np.float64)
    if c.shape != i.shape or c.ndim != 1 or len(c) == 0:
        raise DataError(f"Paired gains need scores on the same folds; got {c.shape} and {i.shape} fold scores.")
    gains = c - i
    se = float(np.std(gains, ddof=1) / np.sqrt(len(gains))) if len(gains) > 1 else 0.0
    return float(gains.mean()), se


def required_gain(rule: GainRule, se: float) -> float:
    """The mean paired gain a challenger must exceed under ``rule``, given the gains' standard error ``se``."""
    return TIE_MARGIN if rule is GainRule.MEAN else max(TIE_MARGIN, se)
