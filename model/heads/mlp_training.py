"""Training the taxonomy heads: the sum over levels of cross-entropy on cached embeddings.

The targets are the per-level class indices ``(N, L)`` of :meth:`model.taxonomy.Taxonomy.encode_many`
(``IGNORE`` where an annotator gave only a prefix). Training keeps every tensor in memory and walks shuffled index
batches, so 10k x 512 embeddings train in seconds on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from model.arrays import FloatArray, IntArray
from model.errors import DataError
from model.heads.heads import HeadsConfig, TaxonomyHeads
from model.heads.threads import one_thread_when_small
from model.taxonomy import IGNORE, Taxonomy

__all__ = ["train_heads"]


def _validate(emb: Tensor, targets: Tensor, num_classes: Sequence[int]) -> None:
    if emb.ndim != 2 or targets.ndim != 2 or emb.shape[0] != targets.shape[0]:
        raise DataError(
            f"Heads train on embeddings (N, D) and targets (N, L) with the same N; got {tuple(emb.shape)} and "
            f"{tuple(targets.shape)}. Pass Taxonomy.encode_many(paths) for the labelled rows only."
        )
    if targets.shape[1] != len(num_classes):
        raise DataError(
            f"Targets have {targets.shape[1]} levels but the heads have {len(num_classes)}; encode the paths "
            "with the same taxonomy the heads are built for."
        )
    for k, kk in enumerate(num_classes):
        col = targets[:, k]
        bad = (col != IGNORE) & ((col < 0) | (col >= kk))
        if bool(bad.any()):
            raise DataError(
                f"Level {k} targets must be IGNORE (-1) or in [0, {kk}); found {col[bad][:5].tolist()}. "
                "Re-encode the paths with the current taxonomy."
            )
    if not bool(torch.isfinite(emb).all()):
        raise DataError("Embeddings contain NaN or inf; recompute them (the embedding cache may be corrupt).")


def _class_weights(col: Tensor, k: int) -> Tensor:
    """Inverse-frequency weights ``(K,)`` for one level's targets; unseen classes get weight 1."""
    counts = torch.bincount(col[col != IGNORE], minlength=k).float()  # (K,)
    present = counts > 0
    weights = torch.ones(k)
    weights[present] = counts[present].sum() / (present.sum() * counts[present])
    return weights


def _sample_weights(targets: Tensor) -> Tensor:
    """Per-sample draw weights ``(N,)`` inversely proportional to the count of the sample's target row."""
    _, inverse, counts = torch.unique(targets, dim=0, return_inverse=True, return_counts=True)
    weights: Tensor = 1.0 / counts[inverse].float()
    return weights


def train_heads(
    emb: FloatArray | Tensor,
    targets: IntArray | Tensor,
    num_classes: Sequence[int] | Taxonomy,
    cfg: HeadsConfig | None = None,
    progress: bool = False,
    device: str | torch.device = "cpu",
) -> TaxonomyHeads:
    """Train one head per level with the sum over levels of cross-entropy (``ignore_index=IGNORE``).

    Args:
        emb: embeddings of the labelled images, ``(N, D)`` float.
        targets: per-level class indices ``(N, L)`` from ``Taxonomy.encode_many``; rows whose every level is
            IGNORE are dropped.
        num_classes: classes per level (or the taxonomy, whose ``num_classes(k)`` is used).
        cfg: hyper-parameters; defaults to ``HeadsConfig()``.
        progress: show a progress bar over optimiser steps.
        device: where to train ("cpu", "cuda", ...); the data is small enough to live there whole. Runs are
            bit-reproducible per seed on the CPU.

    Returns:
        The trained heads, in eval mode, on the CPU.

    Raises:
        DataError: shapes disagree, targets out of range, non-finite embeddings, or no labelled row.
    """
    values = int(emb.numel()) if isinstance(emb, Tensor) else int(np.asarray(emb).size)
    with one_thread_when_small(values, device):
        return _train_heads(emb, targets, num_classes, cfg, progress, device)


def _train_heads(
    emb: FloatArray | Tensor,
    targets: IntArray | Tensor,
    num_classes: Sequence[int] | Taxonomy,
    cfg: HeadsConfig | None,
    progress: bool,
    device: str | torch.device,
) -> TaxonomyHeads:
    cfg = cfg or HeadsConfig()
    if isinstance(num_classes, Taxonomy):
        num_classes = [num_classes.num_classes(k) for k in range(num_classes.depth)]
    x = torch.as_tensor(np.asarray(emb) if not isinstance(emb, Tensor) else emb).float().cpu()  # (N, D)
    y = torch.as_tensor(np.asarray(targets) if not isinstance(targets, Tensor) else targets).long().cpu()  # (N, L)
    _validate(x, y, num_classes)
    keep = (y != IGNORE).any(dim=1)
    x, y = x[keep], y[keep]
    if x.shape[0] == 0:
        raise DataError("No labelled embeddings to train the heads on; label at least two images of two classes.")

    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        heads = TaxonomyHeads(x.shape[1], num_classes, cfg.hidden, cfg.dropout, cfg.normalization)
    heads.fit_normalization(x)
    x = heads.normalize(x)  # (N, D) normalised once; the training loop skips the normalisation step
    weights = [_class_weights(y[:, k], kk) if cfg.class_weighted else None for k, kk in enumerate(num_classes)]
    device = torch.device(device)
    heads.to(device)
    x, y = x.to(device), y.to(device)
    weights = [w.to(device) if w is not None else None for w in weights]
    draw = _sample_weights(y) if cfg.oversample else None  # (N,)

    n = x.shape[0]
    batch = min(cfg.batch_size, n)
    steps_per_epoch = -(-n // batch)
    total_steps = max(cfg.min_steps, cfg.epochs * steps_per_epoch)
    opt = torch.optim.AdamW(heads.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=total_steps, pct_start=0.1, anneal_strategy="cos"
    )
    heads.train()
    order = torch.empty(0, dtype=torch.long)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)  # dropout masks
        for step in tqdm(range(total_steps), desc="heads", disable=not progress, leave=False):
            pos = (step % steps_per_epoch) * batch
            if pos == 0:  # a new epoch: a fresh order (or a fresh oversampled draw)
                if draw is None:
                    order = torch.randperm(n, generator=gen)
                else:
                    order = torch.multinomial(draw, n, replacement=True, generator=gen)
            idx = order[pos : pos + batch].to(device)
            xb, yb = x[idx], y[idx]  # (B, D), (B, L)
            loss = x.new_zeros(())
            for k, head in enumerate(heads.heads):
                if num_classes[k] < 2 or not bool((yb[:, k] != IGNORE).any()):
                    continue
                loss = loss + F.cross_entropy(
                    head(xb), yb[:, k], weight=weights[k], ignore_index=IGNORE, label_smoothing=cfg.label_smoothing
                )
            opt.zero_grad(set_to_none=True)
            if loss.requires_grad:
                loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
                opt.step()
            sched.step()
    heads.train_config = cfg
    return heads.cpu().eval()
