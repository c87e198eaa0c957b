"""Linear taxonomy heads fitted in closed form or by a library solver, robust with very few labels.

Both give an ordinary :class:`~model.heads.heads.TaxonomyHeads` with ``hidden=0`` (one ``Linear`` per level),
so decoding, calibration, bundles and the predictor treat them exactly like the MLP heads:

* :func:`prototype_heads`: nearest class mean (prototypes) on the normalised embeddings. Per level,
  ``logit_c = -s * ||z - mu_c||^2`` up to a constant, i.e. weights ``2 s mu_c`` and bias ``-s ||mu_c||^2``, with
  ``s`` one over the mean squared distance of the labelled rows to their own class mean (logits of order 1, so
  the calibration temperature has room). Works from one label per class.
* :func:`logistic_heads`: multinomial logistic regression per level (``sklearn.linear_model.LogisticRegression``,
  L-BFGS) on standardised features: the "pixels + logistic regression" baseline. The L2-penalised problem is
  strictly convex, so its optimum does not depend on where the solver starts: given earlier linear heads of the same
  features (``init``: the live version's) L-BFGS starts from them (:func:`warm_coefficients`) and reaches the same
  heads in a fraction of the iterations.

A class without a label at a level gets zero weights and the bias :data:`UNSEEN_BIAS`: it is never predicted
(exactly what the MLP heads learn for it, only certain).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from model.arrays import FloatArray, IntArray
from model.errors import DataError
from model.heads.heads import Normalization, TaxonomyHeads
from model.heads.threads import one_thread_when_small
from model.taxonomy import IGNORE

__all__ = ["UNSEEN_BIAS", "logistic_heads", "prototype_heads", "warm_coefficients"]

UNSEEN_BIAS = -1e4
"""Bias of a class no labelled image has: its probability is 0 after any calibration temperature."""


def _start(emb: FloatArray, targets: IntArray, num_classes: Sequence[int], normalization: Normalization
           ) -> tuple[TaxonomyHeads, FloatArray, FloatArray]:
    x = np.asarray(emb, dtype=np.float32)  # (N, D)
    y = np.asarray(targets, dtype=np.int64)  # (N, L)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y) or y.shape[1] != len(num_classes):
        raise DataError(f"Linear heads need embeddings (N, D) and targets (N, {len(num_classes)}); got {x.shape} and "
                        f"{y.shape}.")
    keep = (y != IGNORE).any(axis=1)
    x, y = x[keep], y[keep]
    if len(x) == 0:
        raise DataError("No labelled embeddings to fit the heads on; label at least two images of two classes.")
    heads = TaxonomyHeads(x.shape[1], num_classes, hidden=0, dropout=0.0, normalization=normalization)
    t = torch.from_numpy(x)
    heads.fit_normalization(t)
    with torch.no_grad():
        z = heads.normalize(t).numpy().astype(np.float64)  # (N, D)
    return heads, z, y


def _set_level(heads: TaxonomyHeads, level: int, weight: FloatArray, bias: FloatArray) -> None:
    """Load ``weight (K, D)`` and ``bias (K,)`` into the level's linear layer."""
    layer = heads.heads[level][0]  # type: ignore[index]  # ModuleList items are typed Module; each is a Sequential
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight.astype(np.float32)))
        layer.bias.copy_(torch.from_numpy(bias.astype(np.float32)))


def prototype_heads(emb: FloatArray, targets: IntArray, num_classes: Sequence[int],
                    normalization: Normalization = Normalization.L2_STANDARDIZE) -> TaxonomyHeads:
    """Nearest-class-mean heads (see the module docstring).

    Args:
        emb: labelled embeddings ``(N, D)``.
        targets: ``(N, L)`` from ``Taxonomy.encode_many`` (IGNORE where unknown).
        num_classes: classes per level.
        normalization: embedding normalisation before the means (statistics from ``emb``).
    """
    heads, z, y = _start(emb, targets, num_classes, normalization)
    for k, kk in enumerate(num_classes):
        weight = np.zeros((kk, z.shape[1]))  # (K, D)
        bias = np.full(kk, UNSEEN_BIAS)
        known = y[:, k] != IGNORE
        classes = np.unique(y[known, k])
        if len(classes):
            means = np.stack([z[known & (y[:, k] == c)].mean(0) for c in classes])  # (C, D)
            own = means[np.searchsorted(classes, y[known, k])]  # (n, D)
            spread = float(((z[known] - own) ** 2).sum(1).mean())
            if spread <= 1e-12:  # one image per class: the spread of all images around their mean instead
                spread = float(((z - z.mean(0)) ** 2).sum(1).mean()) or 1.0
            s = 1.0 / spread
            weight[classes] = 2 * s * means
            bias[classes] = -s * (means ** 2).sum(1)
        _set_level(heads, k, weight, bias)
    return heads.eval()


def warm_coefficients(init: TaxonomyHeads, new: TaxonomyHeads, level: int, classes: IntArray
                      ) -> tuple[FloatArray, FloatArray] | None:
    """A start for ``LogisticRegression`` at ``level`` on the given ``classes`` from linear heads ``init``, re-expressed
    on ``new``'s normalisation statistics (the same logits for every embedding).

    Returns ``(coef, intercept)`` in scikit-learn's shapes, ``(C, D)`` and ``(C,)``, or ``(1, D)`` and ``(1,)`` for two
    classes; None when ``init`` cannot seed it (not linear, other dimensions or normalisation, or one of ``classes``
    unseen by ``init``).
    """
    if (init.hidden != 0 or init.in_dim != new.in_dim or list(init.num_classes) != list(new.num_classes)
            or init.normalization is not new.normalization
            or new.normalization not in (Normalization.NONE, Normalization.STANDARDIZE)):
        return None
    layer = init.heads[level][0]  # type: ignore[index]  # a Sequential holding one Linear
    w = layer.weight.detach().double().numpy()  # (K, D)
    b = layer.bias.detach().double().numpy()  # (K,)
    if (b[classes] <= UNSEEN_BIAS / 2).any():
        return None
    if new.normalization is Normalization.STANDARDIZE:  # logits = w (x - mu) / sd + b, for the old and the new stats
        w_raw = w / init.std.double().numpy()
        b = b - w_raw @ init.mean.double().numpy()
        w = w_raw * new.std.double().numpy()
        b = b + w_raw @ new.mean.double().numpy()
    w, b = w[classes], b[classes]
    if len(classes) == 2:  # the stored pair is (-coef / 2, coef / 2)
        return (w[1] - w[0])[None, :], np.array([b[1] - b[0]])
    return w, b


def logistic_heads(emb: FloatArray, targets: IntArray, num_classes: Sequence[int], c: float = 1.0,
                   max_iter: int = 300, normalization: Normalization = Normalization.STANDARDIZE,
                   init: TaxonomyHeads | None = None) -> TaxonomyHeads:
    """Multinomial logistic regression per level (L2 penalty ``1 / c``) on normalised features.

    Args: as for :func:`prototype_heads`, plus ``c`` (inverse regularisation strength), ``max_iter`` and ``init``:
        earlier linear heads of the same features to start the solver from (the optimum is the same).
    """
    from sklearn.linear_model import LogisticRegression  # about 1 s of imports: paid by trainings, not the server

    heads, z, y = _start(emb, targets, num_classes, normalization)
    for k, kk in enumerate(num_classes):
        weight = np.zeros((kk, z.shape[1]))  # (K, D)
        bias = np.full(kk, UNSEEN_BIAS)
        known = y[:, k] != IGNORE
        classes = np.unique(y[known, k])
        if len(classes) == 1:
            bias[classes] = 0.0
        elif len(classes) > 1:
            start = warm_coefficients(init, heads, k, classes) if init is not None else None
            model = LogisticRegression(C=c, max_iter=max_iter, warm_start=start is not None)
            if start is not None:  # scikit-learn's warm start begins from coef_ and intercept_
                model.coef_, model.intercept_ = start
            with one_thread_when_small(int(z[known].size)):
                model.fit(z[known], y[known, k])
            coef, intercept = model.coef_, model.intercept_  # (C, D), (C,) or (1, D), (1,) for two classes
            if len(classes) == 2:
                coef = np.concatenate([-coef / 2, coef / 2])
                intercept = np.concatenate([-intercept / 2, intercept / 2])
            weight[model.classes_] = coef
            bias[model.classes_] = intercept
        _set_level(heads, k, weight, bias)
    return heads.eval()
