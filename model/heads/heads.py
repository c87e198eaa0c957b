"""One small MLP classifier per taxonomy level, trained on cached embeddings of a frozen encoder.

The heads never see images: they consume embeddings ``(N, D)`` and the per-level targets ``(N, L)`` of
:meth:`model.taxonomy.Taxonomy.encode_many` (``IGNORE`` where an annotator gave only a prefix). Training
keeps every tensor in memory and walks shuffled index batches, so 10k x 512 embeddings train in seconds on
a CPU. The normalisation statistics of the embeddings live in the heads' buffers, so a saved head is
self-contained.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from enum import Enum
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from model.arrays import FloatArray, IntArray
from model.errors import ConfigError, DataError
from model.heads.threads import one_thread_when_small
from model.taxonomy import IGNORE, Taxonomy

__all__ = [
    "HeadsConfig",
    "Normalization",
    "TaxonomyHeads",
    "changed_state",
    "frozen",
    "snapshot_state",
    "train_heads",
]


class Normalization(str, Enum):
    """How embeddings are normalised before the heads."""

    NONE = "none"
    L2 = "l2"  # unit length
    STANDARDIZE = "standardize"  # per-dimension zero mean, unit variance (training statistics)
    L2_STANDARDIZE = "l2+standardize"  # unit length, then standardised


@dataclass(frozen=True)
class HeadsConfig:
    """Hyper-parameters of the taxonomy heads.

    Attributes:
        hidden: width of each head's hidden layer.
        dropout: dropout after the hidden ReLU.
        epochs: passes over the labelled embeddings (fixed; the run is short and deterministic).
        min_steps: lower bound on optimiser steps, so a few dozen labels still get enough updates.
        lr: AdamW learning rate (cosine-decayed to 0 over the run).
        weight_decay: AdamW weight decay.
        batch_size: embeddings per optimiser step.
        oversample: draw each epoch's samples with probability inversely proportional to the frequency of
            their (known part of the) path, so minority classes are seen as often as majority ones.
        class_weighted: weight the cross-entropy of each level by inverse class frequency.
        label_smoothing: cross-entropy label smoothing (0 disables).
        normalization: embedding normalisation, see :class:`Normalization`.
        seed: seed of initialisation, shuffling, oversampling and dropout.
    """

    hidden: int = 256
    dropout: float = 0.2
    epochs: int = 5
    min_steps: int = 200
    lr: float = 2e-3
    weight_decay: float = 1e-4
    batch_size: int = 256
    oversample: bool = False
    class_weighted: bool = False
    label_smoothing: float = 0.0
    normalization: Normalization = Normalization.L2_STANDARDIZE
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hidden < 1 or self.epochs < 1 or self.batch_size < 1 or self.min_steps < 0:
            raise ConfigError(
                f"HeadsConfig needs hidden, epochs, batch_size >= 1 and min_steps >= 0 (got {self.hidden}, "
                f"{self.epochs}, {self.batch_size}, {self.min_steps}); set positive values."
            )
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(
                f"HeadsConfig dropout and label_smoothing must lie in [0, 1) (got {self.dropout}, "
                f"{self.label_smoothing}); choose e.g. 0.2 and 0.0."
            )
        if self.lr <= 0:
            raise ConfigError(f"HeadsConfig lr must be positive (got {self.lr}); the default is 2e-3.")
        object.__setattr__(self, "normalization", Normalization(self.normalization))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (for manifests)."""
        d = asdict(self)
        d["normalization"] = self.normalization.value
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HeadsConfig:
        """Inverse of :meth:`to_dict`; unknown keys are refused so a typo does not pass silently."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"Unknown heads settings {unknown}; valid ones are {sorted(names)}.")
        return cls(**dict(data))


class TaxonomyHeads(nn.Module):
    """One ``Linear -> ReLU -> Dropout -> Linear`` head (or one ``Linear``) per taxonomy level over shared
    normalised embeddings.

    Args:
        in_dim: embedding dimension D.
        num_classes: classes per level, ``K_k = taxonomy.num_classes(k)``; a level with one class is allowed
            (its softmax is constant 1).
        hidden: hidden width of each head; 0 makes each head one ``Linear`` layer (a linear model, e.g. the
            prototypes or logistic-regression heads of ``model.heads.linear``).
        dropout: dropout probability after the hidden ReLU.
        normalization: embedding normalisation; standardisation statistics are buffers ``mean``/``std``
            (set by :func:`train_heads`, identity until then).
    """

    mean: Tensor  # (D,) buffer
    std: Tensor  # (D,) buffer

    def __init__(
        self,
        in_dim: int,
        num_classes: Sequence[int],
        hidden: int = 256,
        dropout: float = 0.2,
        normalization: Normalization | str = Normalization.L2_STANDARDIZE,
    ) -> None:
        super().__init__()
        if in_dim < 1 or not num_classes or min(num_classes) < 1 or hidden < 0:
            raise ConfigError(
                f"Heads need an embedding dimension >= 1, >= 1 class per level and hidden >= 0 (got D={in_dim}, "
                f"classes {list(num_classes)}, hidden {hidden}); check the taxonomy and the encoder output."
            )
        self.in_dim = int(in_dim)
        self.num_classes = [int(k) for k in num_classes]
        self.hidden = int(hidden)
        self.dropout = float(dropout)
        self.train_config: HeadsConfig | None = None  # set by train_heads
        self.normalization = Normalization(normalization)
        self.register_buffer("mean", torch.zeros(in_dim))  # (D,)
        self.register_buffer("std", torch.ones(in_dim))  # (D,)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, k))
            if hidden > 0
            else nn.Sequential(nn.Linear(in_dim, k))
            for k in self.num_classes
        )

    def normalize(self, emb: Tensor) -> Tensor:
        """Apply the embedding normalisation. ``emb``: ``(N, D)``; returns ``(N, D)``."""
        x = emb.float()
        if self.normalization in (Normalization.L2, Normalization.L2_STANDARDIZE):
            x = F.normalize(x, dim=1)
        if self.normalization in (Normalization.STANDARDIZE, Normalization.L2_STANDARDIZE):
            x = (x - self.mean) / self.std
        return x

    def forward(self, emb: Tensor) -> list[Tensor]:
        """Logits per level. ``emb``: ``(N, D)``; returns L tensors ``(N, K_k)``."""
        x = self.normalize(emb)  # (N, D)
        return [head(x) for head in self.heads]

    def architecture(self) -> dict[str, Any]:
        """The constructor arguments (JSON-able), enough to rebuild the module before loading its weights."""
        return {
            "in_dim": self.in_dim,
            "num_classes": list(self.num_classes),
            "hidden": self.hidden,
            "dropout": self.dropout,
            "normalization": self.normalization.value,
        }

    def fit_normalization(self, emb: Tensor) -> None:
        """Set the standardisation statistics from training embeddings ``(N, D)`` (after L2 if configured)."""
        if self.normalization not in (Normalization.STANDARDIZE, Normalization.L2_STANDARDIZE):
            return
        x = F.normalize(emb.float(), dim=1) if self.normalization is Normalization.L2_STANDARDIZE else emb.float()
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0, unbiased=False).clamp_min(1e-6))


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


# ----- frozen-encoder sanity ----------------------------------------------------------------------------


def snapshot_state(module: nn.Module) -> dict[str, Tensor]:
    """A detached copy of every parameter and buffer (BatchNorm running stats included)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed_state(module: nn.Module, snapshot: Mapping[str, Tensor]) -> list[str]:
    """Names of parameters/buffers of ``module`` that differ from ``snapshot`` (or were added/removed)."""
    now = module.state_dict()
    names = sorted(set(now) ^ set(snapshot))
    names += [k for k in now if k in snapshot and not torch.equal(now[k], snapshot[k])]
    return names


@contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Use ``module`` (an encoder) strictly read-only: eval mode, no grads, and verified unchanged on exit.

    Raises:
        RuntimeError: when any weight or BatchNorm statistic changed inside the block (a training bug).
    """
    before = snapshot_state(module)
    was_training = module.training
    flags = [p.requires_grad for p in module.parameters()]
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield module
    finally:
        module.train(was_training)
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)
    changed = changed_state(module, before)
    if changed:
        raise RuntimeError(f"The frozen encoder changed during head training: {changed[:10]}")
