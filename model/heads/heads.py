"""One small MLP classifier per taxonomy level on cached embeddings of a frozen encoder: the module and its
hyper-parameters.

The heads never see images: they consume embeddings ``(N, D)`` and give one logit vector per level. The
normalisation statistics of the embeddings live in the heads' buffers, so a saved head is self-contained. They are
trained by :func:`model.heads.mlp_training.train_heads`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.errors import ConfigError

__all__ = ["HeadsConfig", "Normalization", "TaxonomyHeads"]


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
