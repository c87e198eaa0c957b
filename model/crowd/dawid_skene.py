"""Estimating true classes and annotator reliability from several noisy annotators, one taxonomy level at a time.

The method is Dawid–Skene expectation maximisation (Dawid & Skene, 1979) with three additions:

* **soft labels**: an annotation may spread a total weight of at most 1 over several classes (an annotator
  who gave two paths votes half for each);
* **the model as one more, calibrated witness**: its out-of-sample probability vectors are temperature-scaled
  (``q = softmax(beta * log p)``, ``beta`` fitted in every M-step to the annotators' own posterior, the model
  left out) and enter as the likelihood ratio ``q(c) / prior(c)``, so the model counts exactly as much
  as it is reliable (the idea CROWDLAB weighs with its model weight) without being trusted more as EM
  converges on its own votes;
* **two stages and shrinkage**: EM first fits the one-coin model (one accuracy per annotator, errors spread
  evenly), which is robust on small projects, then the full confusion matrices starting from its answer,
  each row shrunk towards the annotator's one-coin row (``shrinkage`` pseudo-labels), and keeps the full
  model only when its likelihood gain pays for its extra parameters (Akaike's criterion). Small projects
  thus get the one-coin answer, large ones the class-specific confusions, and a few systematic mistakes
  cannot turn EM to a degenerate, overconfident solution.

Everything is a sparse matrix product, so 10k items × 3 annotators fit in well under a second.

Arrays:
    ``G``: ``(N, A*K)`` sparse, ``G[i, a*K + j]`` = weight annotator ``a`` gave class ``j`` on item ``i``.
    ``posterior``: ``(N, K)`` probability of each true class per item.
    ``confusion``: ``(A, K, K)``, row = true class, column = given class, rows sum to 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.special import log_softmax, softmax

from model.arrays import FloatArray, IntArray

__all__ = ["CrowdConfig", "CrowdFit", "Observations", "fit_crowd"]


@dataclass(frozen=True)
class CrowdConfig:
    """Settings of the estimation.

    Attributes:
        max_iter: EM iterations at most.
        tol: stop when no posterior entry moves by more than this.
        diag_prior: Beta pseudo-count of correct labels in each annotator's accuracy ("mostly right").
        off_prior: Beta pseudo-count of wrong labels in each annotator's accuracy.
        shrinkage: pseudo-labels per confusion row pulling it towards the annotator's one-coin row.
        one_coin_iter: EM iterations of the one-coin stage at most (0 skips it).
        prior_count: pseudo-items per class in the class prior, so that a few items cannot make a class
            frequent enough to decide items whose annotators all disagree.
        max_full_cells: largest ``A*K*K`` for which full confusion matrices are estimated (levels with many
            classes keep the one-coin model, in memory ``O(N*K + A*K)``).
        use_model: let the model's probabilities take part (when given).
    """

    max_iter: int = 100
    tol: float = 1e-4
    diag_prior: float = 2.0
    off_prior: float = 1.0
    shrinkage: float = 5.0
    one_coin_iter: int = 50
    prior_count: float = 10.0
    max_full_cells: int = 20_000_000
    use_model: bool = True


@dataclass(frozen=True)
class Observations:
    """The labels of one level, one entry per (item, annotator, class).

    Attributes:
        item: ``(E,)`` int64 item rows in ``[0, N)``.
        annotator: ``(E,)`` int64 annotator columns in ``[0, A)``.
        label: ``(E,)`` int64 given class in ``[0, K)``.
        weight: ``(E,)`` float64 in ``(0, 1]``; the weights of one annotator on one item sum to at most 1.
    """

    item: IntArray
    annotator: IntArray
    label: IntArray
    weight: FloatArray

    def matrix(self, n_items: int, n_annotators: int, n_classes: int) -> sparse.csr_matrix:
        """``G``: shape ``(N, A*K)``, duplicate entries summed."""
        cols = self.annotator * n_classes + self.label
        return sparse.csr_matrix(
            (self.weight.astype(np.float64), (self.item, cols)), shape=(n_items, n_annotators * n_classes)
        )


@dataclass(frozen=True)
class CrowdFit:
    """Result of :func:`fit_crowd` for one level.

    Attributes:
        posterior: ``(N, K)`` probability of each true class per item.
        confusion: ``(A, K, K)`` per annotator, row = true class, column = given class (the one-coin
            matrices when those were kept); None when ``A*K*K`` exceeds ``max_full_cells``.
        prior: ``(K,)`` class frequencies.
        full_confusion: whether the full confusion matrices were kept (else the one-coin model).
        model_temperature: ``beta``, the inverse temperature applied to the model's log-probabilities
            (0: the model is ignored, 1: taken as calibrated), or None when no model took part.
        accuracy: ``(A,)`` each annotator's estimated accuracy on the items they labelled.
        iterations: EM iterations run.
    """

    posterior: FloatArray
    confusion: FloatArray | None
    prior: FloatArray
    model_temperature: float | None
    full_confusion: bool
    accuracy: FloatArray
    iterations: int


def _normalise_rows(counts: FloatArray) -> FloatArray:
    rows: FloatArray = counts / counts.sum(axis=-1, keepdims=True)
    return rows


def fit_crowd(
    obs: Observations,
    n_items: int,
    n_annotators: int,
    n_classes: int,
    model_probs: FloatArray | None = None,
    config: CrowdConfig = CrowdConfig(),
) -> CrowdFit:
    """Estimate each item's true class and each annotator's confusion matrix.

    Args:
        obs: the level's labels (see :class:`Observations`).
        n_items: N, rows of the result (items without labels get the prior, or the model's view).
        n_annotators: A.
        n_classes: K, classes of the level.
        model_probs: ``(N, K)`` out-of-sample class probabilities of the model, rows summing to 1, or None.
            Rows of all zeros mean "no model opinion on this item".
        config: estimation settings.

    Returns:
        The :class:`CrowdFit`.
    """
    N, A, K = n_items, n_annotators, n_classes
    G = obs.matrix(N, A, K)  # (N, A*K)
    col_class = np.tile(np.arange(K), A)  # class of each column of G
    col_annot = np.repeat(np.arange(A), K)  # annotator of each column of G
    to_class = sparse.csr_matrix((np.ones(A * K), (np.arange(A * K), col_class)), shape=(A * K, K))
    to_annot = sparse.csr_matrix((np.ones(A * K), (np.arange(A * K), col_annot)), shape=(A * K, A))
    votes = (G @ to_class).toarray()  # (N, K) weighted vote counts
    given = (G @ to_annot).tocsr()  # (N, A) weight each annotator gave each item
    w_sum = np.bincount(obs.annotator, weights=obs.weight, minlength=A)  # (A,)
    labelled = votes.sum(axis=1) > 0  # (N,) items some annotator labelled at this level
    P = None
    if config.use_model and model_probs is not None:
        P = np.asarray(model_probs, dtype=np.float64)  # (N, K)
        assert P.shape == (N, K), (P.shape, (N, K))
        has_model = P.sum(axis=1) > 0  # (N,)
        log_p = np.log(np.clip(P, 1e-12, None))  # (N, K)
        fit_rows = has_model & labelled

    # Start from the majority vote (the model breaks ties and covers unlabelled items).
    T = _normalise_rows(votes + 1e-3 * (P if P is not None else 0.0) + 1e-9)
    beta: float | None = None
    prior: FloatArray = np.full(K, 1.0 / K)
    full_allowed = A * K * K <= config.max_full_cells
    iterations = 0
    fits: list[tuple[FloatArray, FloatArray, FloatArray | None, FloatArray, float | None, float]] = []
    for one_coin, budget in ((True, config.one_coin_iter), (False, config.max_iter if full_allowed else 0)):
        loglik = 0.0
        confusion: FloatArray | None = None
        for _ in range(budget):
            iterations += 1
            # M-step: class prior, one-coin accuracies, and (second stage) the full confusion matrices.
            prior = (T.sum(axis=0) + config.prior_count) / (N + K * config.prior_count)
            right = np.bincount(obs.annotator, weights=obs.weight * T[obs.item, obs.label], minlength=A)
            acc: FloatArray = (right + config.diag_prior) / (w_sum + config.diag_prior + config.off_prior)  # (A,)
            off = (1.0 - acc) / max(K - 1, 1)  # (A,) probability of each particular wrong class
            if one_coin:
                # E-step, one-coin: sum over labels of log(off) + [given == c] * log(acc / off).
                gain = sparse.csr_matrix((np.log(acc / off)[col_annot], (np.arange(A * K), col_class)), shape=(A * K, K))
                logits = (G @ gain).toarray() + (given @ np.log(off))[:, None] + np.log(prior)  # (N, K)
            else:
                counts = np.asarray(G.T @ T).reshape(A, K, K).transpose(0, 2, 1)  # [a, true, given]
                eye = np.eye(K)
                coin = acc[:, None, None] * eye + off[:, None, None] * (1.0 - eye)  # (A, K, K)
                confusion = _normalise_rows(counts + config.shrinkage * coin)
                log_conf = np.log(confusion).transpose(0, 2, 1).reshape(A * K, K)  # [a*K + given, true]
                logits = np.asarray(G @ log_conf) + np.log(prior)  # (N, K) the annotators' view
            if P is not None:
                beta = _fit_temperature(log_p[fit_rows], softmax(logits[fit_rows], axis=1), beta or 1.0)
                model_term = log_softmax(beta * log_p, axis=1) - np.log(prior)
                logits = logits + np.where(has_model[:, None], model_term, 0.0)
            z = logits.max(axis=1, keepdims=True)
            loglik = float((z[:, 0] + np.log(np.exp(logits - z).sum(axis=1)))[labelled].sum())
            T_new = softmax(logits, axis=1)
            delta = float(np.abs(T_new - T).max()) if N else 0.0
            T = T_new
            if delta < config.tol:
                break
        if budget:
            fits.append((T, acc, confusion, prior, beta, loglik))
    if len(fits) == 2:
        # Keep the full confusions only when they explain the labels better than their extra parameters
        # cost (Akaike: one nat per parameter): small projects keep the one-coin answer.
        extra = A * K * (K - 1) - A
        if fits[1][5] - fits[0][5] < extra:
            fits = fits[:1]
    full = len(fits) == 2 or (config.one_coin_iter == 0 and bool(fits))
    acc = np.full(A, np.nan)
    confusion = None
    if fits:
        T, acc, confusion, prior, beta, _ = fits[-1]
    if full:
        assert confusion is not None
        # Expected accuracy on the items they labelled: sum_c T[i,c] * confusion[a,c,c].
        diag = np.einsum("akk->ak", confusion)  # (A, K)
        per_entry = (T[obs.item] * diag[obs.annotator]).sum(axis=1) * obs.weight
        acc = np.bincount(obs.annotator, weights=per_entry, minlength=A) / np.maximum(w_sum, 1e-12)
    elif A * K * K <= config.max_full_cells and fits:
        eye = np.eye(K)
        off = (1.0 - acc) / max(K - 1, 1)
        confusion = acc[:, None, None] * eye + off[:, None, None] * (1.0 - eye)
    return CrowdFit(T, confusion, prior, beta, full, acc, iterations)


def _fit_temperature(log_p: FloatArray, target: IntArray, beta: float, steps: int = 20) -> float:
    """``beta >= 0`` maximising sum ``target * log softmax(beta * log_p)`` (Newton steps; the objective is concave).

    Args:
        log_p: ``(R, K)`` the model's log-probabilities.
        target: ``(R, K)`` soft targets (the annotators' posterior).
        beta: starting value.
    """
    if len(log_p) == 0:
        return 1.0
    expected = (target * log_p).sum()
    for _ in range(steps):
        q = np.exp(log_softmax(beta * log_p, axis=1))  # (R, K)
        mean = (q * log_p).sum(axis=1)  # (R,)
        grad = expected - mean.sum()
        hess = -((q * log_p**2).sum(axis=1) - mean**2).sum()
        if hess >= -1e-12:
            break
        new = min(max(beta - grad / hess, 0.0), 20.0)
        if abs(new - beta) < 1e-6:
            beta = new
            break
        beta = new
    return float(beta)
